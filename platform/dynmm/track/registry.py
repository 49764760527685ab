"""The Pareto-aware model registry: every front member is a version of ``<pipeline>-dynmm``.

Versions carry their trade-off as tags (lambda, tau, quality, GFLOPs per sample, reduction, study,
trial); ``pareto`` says whether the version is on the current front. Aliases ``max-quality``,
``min-compute`` and ``knee`` point at front members and move when a resumed or extended study changes
the front. ``pick`` answers "the best model that fits this compute / latency budget / quality floor"; versions of a
study that measured latency also carry ``latency_ms_per_sample``, ``latency_device`` and ``latency_batch_size``.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from dynmm.errors import UserError
from dynmm.track.runs import redact_credentials

ALIASES = ("max-quality", "min-compute", "knee")


def registered_name(pipeline: str) -> str:
    return f"{pipeline}-dynmm"


@dataclass(frozen=True)
class FrontModel:
    """One front member as the registry sees it (plain data, from the study)."""

    trial_id: str
    run_id: str
    quality: float
    gflops: float
    reduction: float
    tags: dict[str, str]  # lambda, tau, test quality, ...


@dataclass(frozen=True)
class Version:
    """One registered version as read back: its trade-off as numbers, and the tags ``register_front`` gave it."""

    version: str
    aliases: tuple[str, ...]
    pareto: bool
    quality: float
    gflops: float
    reduction: float
    tags: dict[str, str]

    name: str = ""

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    @property
    def quality_metric(self) -> str:
        return self.tags.get("quality_metric", "quality")

    @property
    def test_quality(self) -> float:
        """The quality on the test split (NaN when the study did not evaluate it)."""
        return as_number(self.tags.get(f"test_{self.quality_metric}"))

    @property
    def resource_lambda(self) -> float:
        return as_number(self.tags.get("lambda"))

    @property
    def tau(self) -> str:
        return self.tags.get("tau", "-")

    @property
    def trial_id(self) -> str:
        return self.tags.get("trial_id", "-")

    @property
    def latency_ms(self) -> float:
        """Expected ms per sample on validation (NaN where latency was not measured for the study)."""
        return as_number(self.tags.get("latency_ms_per_sample"))

    @property
    def latency_measured_at(self) -> str:
        """Where the latency was measured, e.g. "cpu, batch 32" ("-" where it was not)."""
        if "latency_device" not in self.tags:
            return "-"
        return f"{self.tags['latency_device']}, batch {self.tags.get('latency_batch_size', '?')}"


@dataclass(frozen=True)
class RegisteredModel:
    name: str
    version_count: int
    aliases: dict[str, str]  # alias -> version


def register_front(
    tracking_uri: str,
    name: str,
    study: str,
    quality_metric: str,
    members: Sequence[FrontModel],
    knee_trial_id: str | None,
    log_model: Callable[[FrontModel], str],
) -> dict[str, str]:
    """Register each member once (a resumed study reuses its versions), mark the front, move the aliases.

    ``log_model(member)`` logs the member's pyfunc into its trial run and returns the model URI; it is
    called only for members not registered yet. Returns alias -> version."""
    client = MlflowClient(tracking_uri)
    _ensure_registered_model(client, name, quality_metric)
    existing = {(v.tags.get("study"), v.tags.get("trial_id")): v for v in client.search_model_versions(
        f"name = '{name}'")}
    on_front: dict[str, str] = {}
    for member in members:
        version = existing.get((study, member.trial_id))
        if version is None:
            mlflow.set_tracking_uri(tracking_uri)
            model_uri = log_model(member)
            with contextlib.redirect_stderr(io.StringIO()):  # MLflow prints "Created version ..." itself
                version = mlflow.register_model(
                    model_uri, name,
                    tags={"study": study, "trial_id": member.trial_id, "quality_metric": quality_metric,
                          "quality": f"{member.quality:.6g}", "gflops_per_sample": f"{member.gflops:.6g}",
                          "reduction": f"{member.reduction:.4f}", **member.tags},
                )
            client.update_model_version(name, version.version, f"Pareto member {member.trial_id} of study {study}")
        on_front[member.trial_id] = str(version.version)
    for key, version in existing.items():
        if key[0] != study or key[1] not in on_front:
            client.set_model_version_tag(name, version.version, "pareto", "false")
    for version in on_front.values():
        client.set_model_version_tag(name, version, "pareto", "true")
    aliases = choose_aliases(members, knee_trial_id)
    moved = {alias: on_front[trial_id] for alias, trial_id in aliases.items()}
    for alias, version in moved.items():
        client.set_registered_model_alias(name, alias, version)
    return moved


def choose_aliases(members: Sequence[FrontModel], knee_trial_id: str | None) -> dict[str, str]:
    """alias -> trial id: best quality (ties: cheaper), least compute (ties: better), the knee."""
    if not members:
        return {}
    best = max(members, key=lambda m: (m.quality, -m.gflops))
    cheapest = min(members, key=lambda m: (m.gflops, -m.quality))
    chosen = {"max-quality": best.trial_id, "min-compute": cheapest.trial_id}
    if knee_trial_id in {m.trial_id for m in members}:
        chosen["knee"] = knee_trial_id
    return chosen


def _ensure_registered_model(client: MlflowClient, name: str, quality_metric: str) -> None:
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(
            name, tags={"quality_metric": quality_metric},
            description="DynMM Pareto models: pick one by compute budget (dynmm models pick NAME --max-gflops X).",
        )


def list_versions(tracking_uri: str, name: str) -> list[Version]:
    client = MlflowClient(tracking_uri)
    try:
        model = client.get_registered_model(name)
    except MlflowException:
        known = [m.name for m in client.search_registered_models()]
        hint = f"registered models: {', '.join(known)}" if known else "no model is registered yet (run dynmm tune)"
        raise UserError(f"no registered model {name!r} in {redact_credentials(tracking_uri)}; {hint}") from None
    aliases_of: dict[str, list[str]] = {}
    for alias, version in (model.aliases or {}).items():
        aliases_of.setdefault(str(version), []).append(alias)
    versions = []
    for v in client.search_model_versions(f"name = '{name}'"):
        tags = dict(v.tags or {})
        versions.append(Version(
            version=str(v.version), aliases=tuple(sorted(aliases_of.get(str(v.version), []))),
            pareto=tags.get("pareto") == "true", quality=as_number(tags.get("quality")),
            gflops=as_number(tags.get("gflops_per_sample")), reduction=as_number(tags.get("reduction")), tags=tags,
            name=name,
        ))
    return sorted(versions, key=lambda v: int(v.version))


def list_models(tracking_uri: str) -> list[RegisteredModel]:
    """Every registered model with its number of versions and its aliases."""
    client = MlflowClient(tracking_uri)
    return [
        RegisteredModel(model.name, len(client.search_model_versions(f"name = '{model.name}'")),
                        {alias: str(version) for alias, version in (model.aliases or {}).items()})
        for model in client.search_registered_models()
    ]


def pick(
    versions: Sequence[Version],
    max_gflops: float | None = None,
    min_quality: float | None = None,
    max_latency_ms: float | None = None,
) -> Version:
    """The best current-front version within the limits: most quality under a compute or latency budget, least
    compute above a quality floor alone."""
    if max_gflops is None and min_quality is None and max_latency_ms is None:
        raise UserError("pick: give --max-gflops X and/or --min-quality Y (or --max-latency-ms Z)")
    front = [v for v in versions if v.pareto and not math.isnan(v.quality) and not math.isnan(v.gflops)]
    if not front:
        raise UserError("pick: no version is on the current Pareto front (run dynmm tune first)")
    if max_latency_ms is not None:
        front = _with_latency(front)
    fits = [v for v in front if (max_gflops is None or v.gflops <= max_gflops)
            and (max_latency_ms is None or v.latency_ms <= max_latency_ms)
            and (min_quality is None or v.quality >= min_quality)]
    if not fits:
        raise UserError(_nothing_fits(front, max_gflops, min_quality, max_latency_ms))
    if max_latency_ms is not None:
        return max(fits, key=lambda v: (v.quality, -v.latency_ms, -v.gflops))
    if max_gflops is not None:
        return max(fits, key=lambda v: (v.quality, -v.gflops))
    return min(fits, key=lambda v: (v.gflops, -v.quality))


def _with_latency(front: list[Version]) -> list[Version]:
    measured = [v for v in front if not math.isnan(v.latency_ms)]
    if not measured:
        raise UserError(
            "pick: no version on the current front has a latency_ms_per_sample tag (latency is measured when "
            "model.cost is latency or a search objective is latency); pick by --max-gflops instead"
        )
    return measured


def _nothing_fits(front: list[Version], max_gflops, min_quality, max_latency_ms) -> str:
    limits = _limits(max_gflops, min_quality, max_latency_ms)
    best = max(front, key=lambda v: v.quality)
    if max_latency_ms is not None:
        fastest = min(front, key=lambda v: v.latency_ms)
        return (f"pick: no model fits{limits}; the front spans {fastest.latency_ms:.4g} ms per sample "
                f"(version {fastest.version}, quality {fastest.quality:.4f}, {fastest.latency_measured_at}) to "
                f"quality {best.quality:.4f} (version {best.version}, {best.latency_ms:.4g} ms per sample)")
    cheapest = min(front, key=lambda v: v.gflops)
    return (f"pick: no model fits{limits}; the front spans {cheapest.gflops:.4g} GFLOPs "
            f"(version {cheapest.version}, quality {cheapest.quality:.4f}) to quality {best.quality:.4f} "
            f"(version {best.version}, {best.gflops:.4g} GFLOPs)")


def _limits(max_gflops: float | None, min_quality: float | None, max_latency_ms: float | None = None) -> str:
    parts = []
    if max_gflops is not None:
        parts.append(f" --max-gflops {max_gflops:g}")
    if max_latency_ms is not None:
        parts.append(f" --max-latency-ms {max_latency_ms:g}")
    if min_quality is not None:
        parts.append(f" --min-quality {min_quality:g}")
    return "".join(parts)


def as_number(text: str | None) -> float:
    try:
        return float(text) if text is not None else math.nan
    except ValueError:
        return math.nan
