"""NYU Depth V2 in the ESANet layout -> the dataset format (tiny 48x64 images)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dynmm.cli import main
from dynmm.data.format import read_meta
from dynmm.data.nyuv2 import convert_nyuv2
from dynmm.data.readers import load_split
from dynmm.errors import DatasetError

HEIGHT, WIDTH = 48, 64
IDS = {"train": ["0003", "0005", "0007", "0010"], "test": ["0001", "0002"]}


def write_sample(folder: Path, sample_id: str, rng: np.random.Generator, size=(HEIGHT, WIDTH)) -> dict:
    arrays = {
        "rgb": rng.integers(0, 256, (*size, 3), dtype=np.uint8),
        "depth": rng.integers(0, 10_000, size, dtype=np.uint16),
        "labels_40": rng.integers(0, 41, size, dtype=np.uint8),
    }
    for name, array in arrays.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(folder / name / f"{sample_id}.png")
    return arrays


@pytest.fixture
def nyuv2_source(tmp_path: Path) -> Callable:
    """``make(edit=None) -> (folder, arrays)``: the ESANet layout; ``arrays[part][id][name]`` are the images
    written, ``edit(folder)`` may damage the folder afterwards."""

    def make(edit: Callable[[Path], None] | None = None) -> tuple[Path, dict]:
        folder = tmp_path / "source" / "nyuv2"
        rng = np.random.default_rng(0)
        arrays = {}
        for part, ids in IDS.items():
            (folder).mkdir(parents=True, exist_ok=True)
            (folder / f"{part}.txt").write_text("\n".join(ids) + "\n")
            arrays[part] = {sample_id: write_sample(folder / part, sample_id, rng) for sample_id in ids}
        if edit is not None:
            edit(folder)
        return folder, arrays

    return make


def nothing_written(tmp_path: Path) -> bool:
    return sorted(path.name for path in tmp_path.iterdir()) == ["source"]


def test_conversion_round_trips_rgb_depth_in_millimetres_and_uint8_labels(tmp_path, nyuv2_source):
    source, arrays = nyuv2_source()
    out = convert_nyuv2(source, tmp_path / "nyuv2", valid_size=1)
    meta = read_meta(out)
    assert (meta.task, meta.num_classes, meta.label_dtype) == ("segmentation", 40, "uint8")
    assert meta.splits == {"train": 3, "valid": 1, "test": 2}
    assert meta.modalities["rgb"].shape == (3, HEIGHT, WIDTH) and meta.label_shape == (HEIGHT, WIDTH)
    for split, part, ids in (("train", "train", IDS["train"][:3]), ("valid", "train", IDS["train"][3:]),
                             ("test", "test", IDS["test"])):
        data = load_split(out, split)
        assert data["sample_id"] == ids
        assert data["rgb"].dtype == torch.float32 and data["depth"].dtype == torch.float32
        assert data["label"].dtype == torch.uint8
        for row, sample_id in enumerate(ids):
            source_arrays = arrays[part][sample_id]
            assert torch.equal(data["rgb"][row], torch.from_numpy(source_arrays["rgb"].transpose(2, 0, 1)).float())
            assert torch.equal(data["depth"][row, 0], torch.from_numpy(source_arrays["depth"].astype(np.float32)))
            assert torch.equal(data["label"][row], torch.from_numpy(source_arrays["labels_40"]))


def test_resize_keeps_depth_and_label_values_by_nearest_neighbour(tmp_path, nyuv2_source):
    source, arrays = nyuv2_source()
    out = convert_nyuv2(source, tmp_path / "nyuv2", size=(24, 32), valid_size=1)
    test = load_split(out, "test")
    assert test["rgb"].shape == (2, 3, 24, 32) and test["depth"].shape == (2, 1, 24, 32)
    assert test["label"].shape == (2, 24, 32)
    original = arrays["test"]["0001"]
    assert set(test["label"][0].unique().tolist()) <= set(np.unique(original["labels_40"]).tolist())
    assert set(test["depth"][0].unique().tolist()) <= set(np.unique(original["depth"]).astype(float).tolist())
    assert read_meta(out).params["size"] == [24, 32]


def test_missing_image_is_named_and_nothing_is_written(tmp_path, nyuv2_source):
    source, _ = nyuv2_source(lambda folder: (folder / "test" / "depth" / "0002.png").unlink())
    with pytest.raises(DatasetError, match=r"test/depth/0002.png: file not found"):
        convert_nyuv2(source, tmp_path / "nyuv2", valid_size=1)
    assert nothing_written(tmp_path)


def test_missing_id_list_is_named(tmp_path, nyuv2_source):
    source, _ = nyuv2_source(lambda folder: (folder / "test.txt").unlink())
    with pytest.raises(DatasetError, match=r"test.txt: file not found; the ESANet layout has train.txt and test.txt"):
        convert_nyuv2(source, tmp_path / "nyuv2", valid_size=1)


def test_label_outside_the_40_classes_names_the_file(tmp_path, nyuv2_source):
    def bad_label(folder: Path) -> None:
        Image.fromarray(np.full((HEIGHT, WIDTH), 41, dtype=np.uint8)).save(folder / "train" / "labels_40" / "0005.png")

    source, _ = nyuv2_source(bad_label)
    with pytest.raises(DatasetError, match=r"train/labels_40/0005.png: expected class ids 0..40 \(0 = void\), got 41"):
        convert_nyuv2(source, tmp_path / "nyuv2", valid_size=1)
    assert nothing_written(tmp_path)


def test_rgb_depth_image_is_refused(tmp_path, nyuv2_source):
    def colour_depth(folder: Path) -> None:
        Image.fromarray(np.zeros((HEIGHT, WIDTH, 3), dtype=np.uint8)).save(folder / "test" / "depth" / "0001.png")

    source, _ = nyuv2_source(colour_depth)
    with pytest.raises(DatasetError, match=r"test/depth/0001.png: expected a single-channel 16-bit depth image"):
        convert_nyuv2(source, tmp_path / "nyuv2", valid_size=1)


def test_an_image_of_another_size_needs_resizing(tmp_path, nyuv2_source):
    source, _ = nyuv2_source(lambda folder: write_sample(folder / "test", "0002", np.random.default_rng(1), (40, 64)))
    with pytest.raises(DatasetError, match=r"test/rgb/0002.png: expected 48x64 pixels, got 40x64; .* --size"):
        convert_nyuv2(source, tmp_path / "nyuv2", valid_size=1)
    out = convert_nyuv2(source, tmp_path / "nyuv2", valid_size=1, size=(48, 64))
    assert load_split(out, "test")["rgb"].shape == (2, 3, 48, 64)


def test_valid_size_must_leave_train_samples(tmp_path, nyuv2_source):
    source, _ = nyuv2_source()
    with pytest.raises(DatasetError, match=r"valid_size must be between 1 and 3 \(train.txt lists 4 ids\), got 4"):
        convert_nyuv2(source, tmp_path / "nyuv2", valid_size=4)


def test_data_prepare_nyuv2_command_resizes(tmp_path, nyuv2_source, capsys):
    source, _ = nyuv2_source()
    out = tmp_path / "nyuv2"
    code = main(["data", "prepare", "nyuv2", "--src", str(source), "--out", str(out), "--size", "24", "32",
                 "--valid-size", "2"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "segmentation, 40 classes" in printed and "uint8 (24, 32)" in printed
    assert read_meta(out).splits == {"train": 2, "valid": 2, "test": 2}


def test_data_prepare_nyuv2_without_src_exits_2(tmp_path, capsys):
    code = main(["data", "prepare", "nyuv2", "--out", str(tmp_path / "nyuv2")])
    assert code == 2
    assert "needs the source path (--src)" in capsys.readouterr().err
