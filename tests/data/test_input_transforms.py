"""``DatasetMeta.input_transforms``: the map from a source's values to the stored ones, recorded so that a served
model can take the source's values."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError
from sklearn.datasets import load_digits

from dynmm.data.digits import prepare_digits
from dynmm.data.format import DatasetMeta, InputTransform, ModalitySpec, read_meta
from dynmm.data.readers import load_split


def test_digits_records_the_map_from_source_pixels_to_stored_values(tmp_path):
    directory = prepare_digits(tmp_path / "digits")
    transforms = read_meta(directory).input_transforms
    assert set(transforms) == {"top", "bottom"} and transforms["top"].source_range == (0, 16)
    split = load_split(directory, "test")
    rows = [int(sample.removeprefix("digits-")) for sample in split["sample_id"]]
    source = load_digits().images[rows]
    for name, source_view in (("top", source[:, :4]), ("bottom", source[:, 4:])):
        transform = transforms[name]
        np.testing.assert_array_equal(split[name].numpy(), (source_view * transform.scale + transform.offset)
                                      .astype(np.float32))


def meta_with(input_transforms: dict) -> DatasetMeta:
    return DatasetMeta(name="d", task="binary", num_classes=2, modalities={"x": ModalitySpec(shape=(2,))},
                       input_transforms=input_transforms)


def test_input_transforms_must_name_modalities_and_be_invertible():
    assert meta_with({"x": InputTransform(scale=0.5)}).input_transforms["x"].scale == 0.5
    with pytest.raises(ValidationError, match=r"input_transforms name modalities \['y'\]"):
        meta_with({"y": InputTransform()})
    with pytest.raises(ValidationError, match="non-zero scale"):
        InputTransform(scale=0)
    with pytest.raises(ValidationError, match="finite numbers"):
        InputTransform(offset=float("inf"))
    with pytest.raises(ValidationError, match="low <= high"):
        InputTransform(source_range=(16, 0))


def test_a_standardize_transform_derives_scale_and_offset_from_the_train_statistics():
    transform = InputTransform(kind="standardize", mean=[1.0, -2.0], std=[2.0, 0.5])
    assert transform.scale == [0.5, 2.0] and transform.offset == [-0.5, 4.0]
    assert InputTransform.model_validate_json(transform.model_dump_json()) == transform
    source = np.random.default_rng(0).normal(size=(5, 4, 2))  # a sequence (T=4, D=2): per feature D
    np.testing.assert_allclose(transform.apply(source), (source - [1.0, -2.0]) / [2.0, 0.5], rtol=1e-6)
    image = InputTransform(kind="standardize", mean=[[[0.0]], [[10.0]]], std=[[[1.0]], [[5.0]]])  # (C, 1, 1)
    pixels = np.full((3, 2, 4, 4), 20.0)
    assert (image.apply(pixels)[:, 0] == 20).all() and (image.apply(pixels)[:, 1] == 2).all()


def test_the_stored_values_are_what_the_served_model_computes_to_the_bit():
    from dynmm.track.requests import model_values

    rng = np.random.default_rng(1)
    source = (rng.normal(1000, 3, size=(64, 3, 5)) * rng.uniform(0.1, 10, size=5)).astype(np.float32)
    mean, std = source.mean((0, 1), dtype=np.float64), source.std((0, 1), dtype=np.float64)
    for transform in (InputTransform(kind="standardize", mean=mean.tolist(), std=std.tolist()),
                      InputTransform(scale=1 / 16, offset=-0.5), InputTransform(neginf_as=0.0, scale=3.0)):
        served = model_values("x", source.astype(np.float64), transform.model_dump())
        np.testing.assert_array_equal(transform.apply(source), served)


@pytest.mark.parametrize(("fields", "words"), [
    ({"kind": "standardize", "mean": [0.0]}, "needs the per-feature mean and std"),
    ({"kind": "standardize", "mean": [0.0, 1.0], "std": [1.0, 0.0]}, "std must be positive"),
    ({"kind": "standardize", "mean": [0.0, 1.0], "std": [1.0]}, "shaped as mean"),
    ({"kind": "standardize", "mean": [[0.0], [1.0, 2.0]], "std": [1.0]}, "nested lists of numbers of one shape"),
    ({"mean": [0.0], "std": [1.0]}, "belong to a standardize transform"),
    ({"scale": [1.0, 0.0]}, "non-zero scale"),
])
def test_a_malformed_standardize_transform_is_refused(fields, words):
    with pytest.raises(ValidationError, match=words):
        InputTransform(**fields)
