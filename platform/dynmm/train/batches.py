"""This worker's batches of a split: streamed from Ray Data every epoch, or read once and kept in memory.

The host (``dynmm.train.host``) hands this worker its shard of each dataset.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from dynmm.train.host import Host


@dataclass(frozen=True)
class RankShare:
    """This rank's rows of a split kept in memory; ``equal_rows``: the rows every rank has (split // ranks)."""

    columns: dict[str, torch.Tensor]
    rows: int
    equal_rows: int


@dataclass(frozen=True)
class LocalSplit:
    """A split read whole into this process (``datasets.local_datasets``): its tensor columns."""

    columns: dict[str, torch.Tensor]


def batches(
    host: Host,
    split: str,
    batch_size: int,
    seed: int | None = None,
    cache: dict[str, RankShare] | None = None,
    equal_shares: bool = False,
) -> Iterator[dict[str, torch.Tensor]]:
    """This worker's shard of ``split`` in batches, shuffled with ``seed`` when given.

    With a ``cache`` (small datasets) the shard is read from Ray Data once and kept in this worker's
    memory, so later epochs cost only compute: each rank keeps the same disjoint shard, as a
    DistributedSampler would. Otherwise every epoch streams the shard from Ray Data.

    ``equal_shares`` (training): every rank yields the same number of rows, hence of batches, so that DDP's
    gradient all-reduces pair up across ranks; a rank with one row more than the others leaves out one of
    its rows, a different one each epoch (shuffled first), as DistributedSampler(drop_last=True) does.
    Streamed training shards are equal already (Ray Train splits them with ``equal=True``). Without it
    (validation, which runs no collective per batch) every row is used, so metrics cover the whole split."""
    device = host.device
    if cache is None:
        shard = host.shard(split)
        shuffle = {"local_shuffle_buffer_size": 4 * batch_size, "local_shuffle_seed": seed} if seed is not None else {}
        yield from shard.iter_torch_batches(batch_size=batch_size, device=device, **shuffle)
        return
    if split not in cache:
        cache[split] = rank_share(host.shard(split), host)
    share = cache[split]
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    order = torch.arange(share.rows) if seed is None else torch.randperm(share.rows, generator=generator)
    order = order[: share.equal_rows if equal_shares else share.rows].to(device)
    for start in range(0, len(order), batch_size):
        chosen = order[start : start + batch_size]
        yield {key: values[chosen] for key, values in share.columns.items()}


def rank_share(whole_split, host: Host) -> RankShare:
    """This rank's contiguous share of a small split that every rank reads whole (datasets a worker keeps in
    memory are not split by Ray Train: a streaming split starts a coordinator actor per dataset, which costs
    seconds per run). Ranks see the same order, so the shares are disjoint and cover every row; their sizes
    differ by at most one row."""
    if isinstance(whole_split, LocalSplit):
        columns = whole_split.columns
    else:
        parts = list(whole_split.iter_torch_batches(batch_size=4096, device=host.device))
        if not parts:
            return RankShare({}, 0, 0)
        columns = {key: torch.cat([part[key] for part in parts]) for key in parts[0]}
    columns = {key: values.to(host.device) for key, values in columns.items()}
    rank, world_size = host.rank, host.world_size
    rows = len(next(iter(columns.values())))
    start, end = rank * rows // world_size, (rank + 1) * rows // world_size
    return RankShare({key: values[start:end] for key, values in columns.items()}, end - start, rows // world_size)
