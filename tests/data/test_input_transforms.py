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
