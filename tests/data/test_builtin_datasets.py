from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dynmm.data.digits import prepare_digits
from dynmm.data.format import read_meta
from dynmm.data.readers import load_split, resolve_dataset
from dynmm.data.synthetic import FEATURES, generate_synthetic_mosei
from dynmm.errors import DatasetError


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory) -> Path:
    return resolve_dataset("digits", tmp_path_factory.mktemp("datasets"))


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory) -> Path:
    return generate_synthetic_mosei(
        tmp_path_factory.mktemp("synthetic") / "syn", num_samples=400, chunk_rows=64
    )


def test_digits_is_prepared_under_the_data_root_on_first_use(digits_dir):
    assert digits_dir.name == "digits"
    meta = read_meta(digits_dir)
    assert (meta.task, meta.num_classes, meta.synthetic) == ("multiclass", 10, False)
    assert {name: spec.shape for name, spec in meta.modalities.items()} == {"top": (4, 8), "bottom": (4, 8)}


def test_digits_splits_are_60_20_20_of_all_1797_images(digits_dir):
    assert read_meta(digits_dir).splits == {"train": 1077, "valid": 360, "test": 360}
    ids = [
        sample
        for split in ("train", "valid", "test")
        for sample in load_split(digits_dir, split)["sample_id"]
    ]
    assert sorted(ids) == [f"digits-{index:04d}" for index in range(1797)]


def test_digits_splits_are_stratified(digits_dir):
    counts = {
        split: np.bincount(load_split(digits_dir, split)["label"].numpy(), minlength=10)
        for split in ("train", "valid", "test")
    }
    total = sum(counts.values())
    for split, fraction in (("train", 0.6), ("valid", 0.2), ("test", 0.2)):
        assert np.all(np.abs(counts[split] - fraction * total) <= 1.5), split


def test_digits_views_are_the_top_and_bottom_rows_scaled_to_unit_range(digits_dir):
    from sklearn.datasets import load_digits

    digits = load_digits()
    split = load_split(digits_dir, "valid")
    index = [int(sample.removeprefix("digits-")) for sample in split["sample_id"]]
    images = torch.from_numpy((digits.images[index] / 16).astype(np.float32))
    assert torch.equal(split["top"], images[:, :4])
    assert torch.equal(split["bottom"], images[:, 4:])
    assert torch.equal(split["label"], torch.from_numpy(digits.target[index]).long())


def test_digits_split_is_reproducible_for_a_seed(tmp_path, digits_dir):
    again = prepare_digits(tmp_path / "again")
    assert load_split(again, "test")["sample_id"] == load_split(digits_dir, "test")["sample_id"]


def test_synthetic_mosei_metadata_says_synthetic_with_mosei_shapes(synthetic_dir):
    meta = read_meta(synthetic_dir)
    assert meta.synthetic is True
    assert meta.task == "regression" and meta.num_classes is None and meta.label_range == (-3, 3)
    assert {name: spec.shape for name, spec in meta.modalities.items()} == {
        "vision": (50, 35),
        "audio": (50, 74),
        "text": (50, 300),
    }
    assert meta.splits == {"train": 280, "valid": 60, "test": 60}
    assert meta.params["text_only_fraction"] == 0.8


def test_synthetic_mosei_tensors_have_mosei_shapes_and_labels_in_range(synthetic_dir):
    split = load_split(synthetic_dir, "valid")
    for name, features in FEATURES.items():
        assert split[name].shape == (60, 50, features) and split[name].dtype == torch.float32
    assert split["label"].dtype == torch.float32
    assert split["label"].abs().max() <= 3
    assert split["sample_id"][0] == "synthetic-mosei-000280"


def test_synthetic_mosei_sequences_are_front_zero_padded(synthetic_dir):
    text = load_split(synthetic_dir, "train")["text"]
    real_steps = (text.abs().sum(dim=2) != 0).int()
    assert torch.all(real_steps[:, -1] == 1)
    assert torch.all(real_steps[:, 1:] >= real_steps[:, :-1])
    assert real_steps.sum(dim=1).min() >= 10


def test_synthetic_mosei_text_answers_most_samples_and_audio_vision_the_rest(synthetic_dir):
    from dynmm.data.synthetic import SIGNAL, _Streams

    split = load_split(synthetic_dir, "train")
    directions = _Streams(0).directions
    steps = (split["text"].abs().sum(dim=2) != 0).sum(dim=1)

    def encoded(name: str) -> torch.Tensor:
        """Mean projection of the real steps on the modality's direction, in units of its encoded value."""
        return (split[name] @ torch.from_numpy(directions[name])).sum(dim=1) / steps / SIGNAL

    text_error = (3 * encoded("text") - split["label"]).abs()
    assert 0.8 <= (text_error < 1).float().mean() <= 0.95
    text_misleads = text_error > 1.5
    fused_error = (1.5 * (encoded("audio") + encoded("vision")) - split["label"]).abs()
    assert text_misleads.sum() > 10
    assert fused_error[text_misleads].median() < 0.25


def test_synthetic_mosei_depends_on_the_seed_not_on_the_chunk_size(tmp_path):
    small_chunks = generate_synthetic_mosei(tmp_path / "a", num_samples=40, chunk_rows=3)
    one_chunk = generate_synthetic_mosei(tmp_path / "b", num_samples=40, chunk_rows=100)
    other_seed = generate_synthetic_mosei(tmp_path / "c", num_samples=40, chunk_rows=100, seed=1)
    first, second, third = (load_split(path, "test") for path in (small_chunks, one_chunk, other_seed))
    assert all(torch.equal(first[name], second[name]) for name in (*FEATURES, "label"))
    assert not torch.equal(first["label"], third["label"])


def test_synthetic_mosei_refuses_a_sample_count_that_leaves_a_split_empty(tmp_path):
    with pytest.raises(DatasetError, match="leaves a split empty"):
        generate_synthetic_mosei(tmp_path / "out", num_samples=3)
    assert list(tmp_path.iterdir()) == []


def test_a_builtin_dataset_prepared_by_an_older_version_is_prepared_again(tmp_path, capsys):
    """A digits folder without the input transform (written before it travelled with models) would register
    models that serve raw pixels wrongly: it is rewritten, and the output says so."""
    import json

    from dynmm.data.format import META_FILE

    out_dir = resolve_dataset("digits", tmp_path)
    meta_path = out_dir / META_FILE
    old = json.loads(meta_path.read_text())
    old.pop("input_transforms", None)
    old.pop("files", None)
    meta_path.write_text(json.dumps(old))
    assert not read_meta(out_dir).input_transforms

    assert resolve_dataset("digits", tmp_path) == out_dir
    assert "prepared by an older version (its input transforms differ)" in capsys.readouterr().err
    meta = read_meta(out_dir)
    assert set(meta.input_transforms) == {"top", "bottom"} and meta.files
    assert resolve_dataset("digits", tmp_path) == out_dir
    assert "older version" not in capsys.readouterr().err  # current now: reused as it is
