from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from dynmm.data.convert import convert_avmnist, convert_mmimdb, convert_mosei, prepare_dataset
from dynmm.data.format import read_meta
from dynmm.data.readers import load_split
from dynmm.errors import DatasetError


def nothing_written(tmp_path) -> bool:
    """Only the fixtures' ``source`` folder exists: no output and no temporary folder."""
    return sorted(path.name for path in tmp_path.iterdir()) == ["source"]


# ---------------------------------------------------------------- CMU-MOSEI


def test_mosei_converts_features_labels_and_ids_exactly(tmp_path, mosei_source):
    source, data = mosei_source()
    out = convert_mosei(source, tmp_path / "mosei")
    meta = read_meta(out)
    assert meta.splits == {"train": 5, "valid": 3, "test": 3}
    assert (meta.task, meta.label_range, meta.synthetic) == ("regression", (-3, 3), False)
    train = load_split(out, "train")
    for key in ("vision", "audio", "text"):
        assert train[key].dtype == torch.float32
        assert torch.equal(train[key], torch.from_numpy(data["train"][key]))
    assert torch.equal(train["label"], torch.from_numpy(data["train"]["labels"].reshape(5)))
    assert train["sample_id"][2] == "video0-2_2_3"


def test_mosei_audio_minus_infinity_becomes_zero(tmp_path, mosei_source):
    def add_missing_audio(data):
        data["valid"]["audio"][1, 3, :5] = -np.inf

    source, data = mosei_source(add_missing_audio)
    audio = load_split(convert_mosei(source, tmp_path / "mosei"), "valid")["audio"]
    assert torch.all(audio[1, 3, :5] == 0)
    assert torch.equal(audio[0], torch.from_numpy(data["valid"]["audio"][0]))


def test_mosei_drops_samples_whose_text_is_all_zeros_and_counts_them(tmp_path, mosei_source):
    def blank_text(data):
        data["train"]["text"][[1, 3]] = 0

    source, data = mosei_source(blank_text)
    out = convert_mosei(source, tmp_path / "mosei")
    assert read_meta(out).params["dropped_text_all_zero"] == {"train": 2, "valid": 0, "test": 0}
    train = load_split(out, "train")
    assert train["sample_id"] == ["video0-0_0_1", "video0-2_2_3", "video0-4_4_5"]
    assert torch.equal(train["vision"], torch.from_numpy(data["train"]["vision"][[0, 2, 4]]))


def test_mosei_wrong_shape_names_file_split_key_and_shapes(tmp_path, mosei_source):
    def wider_vision(data):
        data["train"]["vision"] = np.zeros((5, 50, 36), dtype=np.float32)

    source, _ = mosei_source(wider_vision)
    with pytest.raises(DatasetError) as error:
        convert_mosei(source, tmp_path / "mosei")
    assert (
        str(error.value)
        == "mosei_senti_data.pkl: split 'train', key 'vision': expected shape (N, 50, 35), got (5, 50, 36)"
    )
    assert nothing_written(tmp_path)


def test_mosei_missing_key_is_named_with_its_split(tmp_path, mosei_source):
    source, _ = mosei_source(lambda data: data["valid"].pop("audio"))
    with pytest.raises(
        DatasetError, match=r"mosei_senti_data.pkl: split 'valid': missing key\(s\) \['audio'\]"
    ):
        convert_mosei(source, tmp_path / "mosei")


def test_mosei_missing_split_is_named(tmp_path, mosei_source):
    source, _ = mosei_source(lambda data: data.pop("test"))
    with pytest.raises(DatasetError, match=r"mosei_senti_data.pkl: missing key\(s\) \['test'\]"):
        convert_mosei(source, tmp_path / "mosei")


def test_mosei_missing_file_is_named(tmp_path):
    with pytest.raises(DatasetError, match=r"nothing\.pkl: file not found"):
        convert_mosei(tmp_path / "nothing.pkl", tmp_path / "mosei")


def test_mosei_file_that_is_not_a_pickle_is_refused(tmp_path):
    source = tmp_path / "mosei_senti_data.pkl"
    source.write_text("not a pickle")
    with pytest.raises(DatasetError, match="mosei_senti_data.pkl: not a readable pickle"):
        convert_mosei(source, tmp_path / "mosei")


def test_mosei_non_numeric_features_are_refused(tmp_path, mosei_source):
    def text_as_strings(data):
        data["test"]["text"] = np.full((3, 50, 300), "x")

    source, _ = mosei_source(text_as_strings)
    with pytest.raises(DatasetError, match=r"split 'test', key 'text': expected a .* array, got dtype <U1"):
        convert_mosei(source, tmp_path / "mosei")


def test_mosei_nan_fails_by_default_with_count_and_first_row(tmp_path, mosei_source):
    def add_nan(data):
        data["train"]["text"][3, 10, :2] = np.nan

    source, _ = mosei_source(add_nan)
    with pytest.raises(DatasetError) as error:
        convert_mosei(source, tmp_path / "mosei")
    assert str(error.value).startswith(
        "mosei_senti_data.pkl: split 'train', key 'text': expected finite values, "
        "found 2 NaN/inf value(s), first at row 3"
    )
    assert nothing_written(tmp_path)


def test_mosei_nan_replace_policy_writes_zeros(tmp_path, mosei_source):
    def add_nan(data):
        data["train"]["vision"][4, 0, 0] = np.nan

    source, _ = mosei_source(add_nan)
    out = convert_mosei(source, tmp_path / "mosei", nonfinite="replace")
    assert load_split(out, "train")["vision"][4, 0, 0].item() == 0
    assert read_meta(out).params["nonfinite_replaced"] == {"train/vision": 1}


def test_mosei_label_outside_minus_three_to_three_is_refused(tmp_path, mosei_source):
    def too_positive(data):
        data["test"]["labels"][2, 0, 0] = 3.5

    source, _ = mosei_source(too_positive)
    with pytest.raises(DatasetError) as error:
        convert_mosei(source, tmp_path / "mosei")
    assert (
        str(error.value)
        == "mosei_senti_data.pkl: split 'test', key 'labels': expected labels in [-3, 3], got 3.5 at row 2"
    )
    assert nothing_written(tmp_path)


def test_mosei_labels_of_the_wrong_shape_are_refused(tmp_path, mosei_source):
    def two_labels(data):
        data["train"]["labels"] = np.zeros((5, 2), dtype=np.float32)

    source, _ = mosei_source(two_labels)
    with pytest.raises(
        DatasetError, match=r"split 'train', key 'labels': expected shape \(N, 1, 1\), got \(5, 2\)"
    ):
        convert_mosei(source, tmp_path / "mosei")


def test_mosei_split_left_empty_by_dropping_is_refused(tmp_path, mosei_source):
    def blank_valid(data):
        data["valid"]["text"][:] = 0

    source, _ = mosei_source(blank_valid)
    with pytest.raises(DatasetError, match="mosei_senti_data.pkl: split 'valid' is empty"):
        convert_mosei(source, tmp_path / "mosei")
    assert nothing_written(tmp_path)


def test_mosei_rows_that_disagree_between_keys_are_refused(tmp_path, mosei_source):
    source, _ = mosei_source(lambda data: data["train"].update(id=data["train"]["id"][:4]))
    with pytest.raises(DatasetError, match=r"split 'train': expected the same number of rows N in every key"):
        convert_mosei(source, tmp_path / "mosei")


# ---------------------------------------------------------------- MM-IMDB


def test_mmimdb_converts_rows_at_the_boundaries_to_multilabel(tmp_path, mmimdb_source):
    source, arrays = mmimdb_source()
    out = convert_mmimdb(source, tmp_path / "mmimdb", boundaries=(6, 8))
    meta = read_meta(out)
    assert meta.splits == {"train": 6, "valid": 2, "test": 2}
    assert (meta.task, meta.num_classes, meta.label_shape) == ("multilabel", 23, (23,))
    valid = load_split(out, "valid")
    assert torch.equal(valid["text"], torch.from_numpy(arrays["features"][6:8]))
    assert torch.equal(valid["image"], torch.from_numpy(arrays["vgg_features"][6:8]))
    assert valid["label"].dtype == torch.float32
    assert torch.equal(valid["label"], torch.from_numpy(arrays["genres"][6:8].astype(np.float32)))
    assert valid["sample_id"] == ["mmimdb-00006", "mmimdb-00007"]


def test_mmimdb_genres_that_are_not_multi_hot_are_refused(tmp_path, mmimdb_source):
    def bad_genre(arrays):
        arrays["genres"][3, 5] = 2

    source, _ = mmimdb_source(bad_genre)
    with pytest.raises(DatasetError) as error:
        convert_mmimdb(source, tmp_path / "mmimdb", boundaries=(6, 8))
    message = str(error.value)
    assert message == (
        "multimodal_imdb.hdf5: split 'train', key 'genres': "
        "expected multi-hot labels (0 or 1), got 2 at row 3"
    )
    assert nothing_written(tmp_path)


def test_mmimdb_boundaries_must_fit_the_rows(tmp_path, mmimdb_source):
    source, _ = mmimdb_source()
    with pytest.raises(DatasetError, match=r"boundaries must satisfy .* N = 10, got \(6, 12\)"):
        convert_mmimdb(source, tmp_path / "mmimdb", boundaries=(6, 12))
    assert nothing_written(tmp_path)


def test_mmimdb_missing_dataset_key_is_named(tmp_path, mmimdb_source):
    source, _ = mmimdb_source(lambda arrays: arrays.pop("vgg_features"))
    with pytest.raises(DatasetError, match=r"multimodal_imdb.hdf5: missing key\(s\) \['vgg_features'\]"):
        convert_mmimdb(source, tmp_path / "mmimdb", boundaries=(6, 8))


def test_mmimdb_wrong_feature_width_is_named(tmp_path, mmimdb_source):
    source, _ = mmimdb_source(lambda arrays: arrays.update(features=np.zeros((10, 299), dtype=np.float32)))
    with pytest.raises(DatasetError, match=r"key 'features': expected shape \(N, 300\), got \(10, 299\)"):
        convert_mmimdb(source, tmp_path / "mmimdb", boundaries=(6, 8))


def test_mmimdb_nan_in_image_features_names_split_and_row(tmp_path, mmimdb_source):
    def add_nan(arrays):
        arrays["vgg_features"][9, 100] = np.nan

    source, _ = mmimdb_source(add_nan)
    with pytest.raises(
        DatasetError, match=r"split 'test', key 'vgg_features': .* 1 NaN/inf value\(s\), first at row 9"
    ):
        convert_mmimdb(source, tmp_path / "mmimdb", boundaries=(6, 8))


def test_mmimdb_file_that_is_not_hdf5_is_refused(tmp_path):
    pytest.importorskip("h5py")
    source = tmp_path / "multimodal_imdb.hdf5"
    source.write_text("not hdf5")
    with pytest.raises(DatasetError, match="multimodal_imdb.hdf5: not a readable HDF5 file"):
        convert_mmimdb(source, tmp_path / "mmimdb")


def test_mosei_ragged_key_is_refused(tmp_path, mosei_source):
    source, _ = mosei_source(lambda data: data["valid"].update(id=[["a"], ["b", "c"], ["d"]]))
    with pytest.raises(
        DatasetError, match="split 'valid', key 'id': expected an array with one row per sample"
    ):
        convert_mosei(source, tmp_path / "mosei")


def test_mmimdb_without_h5py_says_which_extra_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(DatasetError, match=r"pip install 'dynmm-platform\[hdf5\]'"):
        convert_mmimdb(tmp_path / "multimodal_imdb.hdf5", tmp_path / "mmimdb")


# ---------------------------------------------------------------- AV-MNIST


def test_avmnist_converts_images_to_28_by_28_and_takes_valid_from_the_end_of_train(tmp_path, avmnist_source):
    source, arrays = avmnist_source()
    out = convert_avmnist(source, tmp_path / "avmnist", valid_size=2)
    assert read_meta(out).splits == {"train": 4, "valid": 2, "test": 3}
    valid = load_split(out, "valid")
    assert valid["image"].shape == (2, 28, 28) and valid["audio"].shape == (2, 112, 112)
    assert torch.equal(
        valid["image"], torch.from_numpy(arrays["image/train_data.npy"][4:].reshape(2, 28, 28))
    )
    assert torch.equal(valid["audio"], torch.from_numpy(arrays["audio/train_data.npy"][4:]))
    assert torch.equal(valid["label"], torch.from_numpy(arrays["train_labels.npy"][4:]))
    assert valid["label"].dtype == torch.int64
    assert valid["sample_id"] == ["avmnist-train-00004", "avmnist-train-00005"]
    assert load_split(out, "test")["sample_id"][0] == "avmnist-test-00000"


def test_avmnist_label_outside_zero_to_nine_is_refused(tmp_path, avmnist_source):
    def bad_label(arrays):
        arrays["test_labels.npy"][1] = 10

    source, _ = avmnist_source(bad_label)
    with pytest.raises(DatasetError) as error:
        convert_avmnist(source, tmp_path / "avmnist", valid_size=2)
    assert (
        str(error.value)
        == "avmnist: split 'test', key 'test_labels.npy': expected class ids in 0..9, got 10 at row 1"
    )
    assert nothing_written(tmp_path)


def test_avmnist_float_labels_are_refused_with_their_dtype(tmp_path, avmnist_source):
    source, _ = avmnist_source(lambda arrays: arrays.update({"train_labels.npy": np.zeros(6)}))
    with pytest.raises(
        DatasetError,
        match=r"key 'train_labels.npy': expected a bool, signed integer .* array, got dtype float64",
    ):
        convert_avmnist(source, tmp_path / "avmnist", valid_size=2)


def test_avmnist_missing_file_is_named(tmp_path, avmnist_source):
    source, _ = avmnist_source()
    (source / "audio" / "test_data.npy").unlink()
    with pytest.raises(DatasetError, match=r"audio/test_data\.npy: file not found"):
        convert_avmnist(source, tmp_path / "avmnist", valid_size=2)


def test_avmnist_wrong_audio_shape_is_named(tmp_path, avmnist_source):
    source, _ = avmnist_source(lambda arrays: arrays.update({"audio/test_data.npy": np.zeros((3, 112, 100))}))
    with pytest.raises(DatasetError) as error:
        convert_avmnist(source, tmp_path / "avmnist", valid_size=2)
    assert (
        str(error.value)
        == "audio/test_data.npy: split 'test', key 'audio': expected shape (N, 112, 112), got (3, 112, 100)"
    )


def test_avmnist_valid_size_must_leave_training_rows(tmp_path, avmnist_source):
    source, _ = avmnist_source()
    with pytest.raises(DatasetError, match="valid_size must be between 1 and 5 .* got 6"):
        convert_avmnist(source, tmp_path / "avmnist", valid_size=6)


# ---------------------------------------------------------------- prepare_dataset


def test_prepare_dataset_dispatches_by_kind(tmp_path, avmnist_source):
    source, _ = avmnist_source()
    out = prepare_dataset("avmnist", source, tmp_path / "avmnist", valid_size=2)
    assert read_meta(out).name == "avmnist"


def test_prepare_dataset_lists_the_kinds_for_an_unknown_one(tmp_path):
    with pytest.raises(DatasetError, match=r"unknown dataset kind 'nyu'.*'mosei', 'mmimdb', 'avmnist'"):
        prepare_dataset("nyu", tmp_path, tmp_path / "out")


def test_prepare_dataset_refuses_options_of_another_kind(tmp_path, avmnist_source):
    source, _ = avmnist_source()
    with pytest.raises(DatasetError, match=r"option\(s\) \['boundaries'\] do not apply to 'avmnist'"):
        prepare_dataset("avmnist", source, tmp_path / "avmnist", boundaries=(1, 2))
