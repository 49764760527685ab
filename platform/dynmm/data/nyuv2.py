"""Converter of NYU Depth V2 in the ESANet layout (docs/DYNMM.md) to the dataset format.

Source folder::

    train.txt, test.txt                  one sample id per line
    {train,test}/rgb/ID.png              uint8 (H, W, 3)
    {train,test}/depth/ID.png            uint16 millimetres (0 = no measurement)
    {train,test}/labels_40/ID.png        uint8, 0 = void, 1..40 classes

Written columns: ``rgb`` float32 (3, H, W) with the stored 0..255 values, ``depth`` float32 (1, H, W) in
millimetres, ``label`` uint8 (H, W). valid = the last ``valid_size`` ids of train.txt (ESANet has no
validation split; model selection must not use test). ``size`` resizes every image (RGB bilinear, depth
and labels nearest neighbour, so no label or depth value is invented).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from dynmm.data.format import DatasetMeta, ModalitySpec
from dynmm.data.writer import dataset_writer
from dynmm.errors import DatasetError

NYUV2_CLASSES = 40
NYUV2_VALID_SIZE = 80
CHUNK_ROWS = 16
PARTS = ("train", "test")


def nyuv2_meta(source: Path, size: tuple[int, int], valid_size: int, resized: bool) -> DatasetMeta:
    height, width = size
    return DatasetMeta(
        name="nyuv2",
        task="segmentation",
        num_classes=NYUV2_CLASSES,
        modalities={"rgb": ModalitySpec(shape=(3, height, width)), "depth": ModalitySpec(shape=(1, height, width))},
        label_shape=(height, width),
        source=str(source),
        params={
            "valid_size": valid_size,
            "size": [height, width],
            "resized": resized,
            "values": "rgb 0..255 as stored; depth in millimetres (0 = no measurement); label 0 = void",
        },
    )


def read_ids(src_dir: Path, part: str) -> list[str]:
    """The sample ids listed in ``<part>.txt``, in file order."""
    path = src_dir / f"{part}.txt"
    if not path.is_file():
        raise DatasetError(f"{path}: file not found; the ESANet layout has train.txt and test.txt")
    ids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise DatasetError(f"{path}: lists no sample ids")
    return ids


def _open_png(path: Path) -> Image.Image:
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    try:
        image = Image.open(path)
        image.load()
    except (OSError, UnidentifiedImageError) as error:
        raise DatasetError(f"{path}: not a readable image ({error})") from None
    return image


def _resized(image: Image.Image, size: tuple[int, int] | None, resample: Image.Resampling) -> Image.Image:
    if size is None or image.size == (size[1], size[0]):
        return image
    return image.resize((size[1], size[0]), resample=resample)


def read_rgb(path: Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """(3, H, W) float32 with the stored 0..255 values."""
    image = _open_png(path)
    if image.mode != "RGB":
        raise DatasetError(f"{path}: expected an 8-bit RGB image, got mode {image.mode}")
    array = np.asarray(_resized(image, size, Image.Resampling.BILINEAR))
    return np.ascontiguousarray(array.transpose(2, 0, 1), dtype=np.float32)


def read_depth(path: Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """(1, H, W) float32 millimetres."""
    image = _open_png(path)
    if image.mode not in ("I;16", "I;16B", "I", "L"):
        raise DatasetError(f"{path}: expected a single-channel 16-bit depth image (millimetres), got mode {image.mode}")
    depth = np.asarray(image).astype(np.float32)
    if depth.min() < 0:
        raise DatasetError(f"{path}: expected depth >= 0 millimetres, got {depth.min():g}")
    resized = _resized(Image.fromarray(depth), size, Image.Resampling.NEAREST)
    return np.asarray(resized, dtype=np.float32)[np.newaxis]


def read_label(path: Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """(H, W) uint8, 0 = void and 1..40 the classes."""
    image = _open_png(path)
    if image.mode not in ("L", "P"):
        raise DatasetError(f"{path}: expected a single-channel 8-bit label image, got mode {image.mode}")
    label = np.asarray(_resized(image, size, Image.Resampling.NEAREST), dtype=np.uint8)
    if label.max() > NYUV2_CLASSES:
        raise DatasetError(f"{path}: expected class ids 0..{NYUV2_CLASSES} (0 = void), got {int(label.max())}")
    return label


def _read_sample(
    src_dir: Path, part: str, sample_id: str, resize: tuple[int, int] | None, expected: tuple[int, int]
) -> dict[str, np.ndarray]:
    folder = src_dir / part
    sample = {
        "rgb": read_rgb(folder / "rgb" / f"{sample_id}.png", resize),
        "depth": read_depth(folder / "depth" / f"{sample_id}.png", resize),
        "label": read_label(folder / "labels_40" / f"{sample_id}.png", resize),
    }
    for name, subfolder in (("rgb", "rgb"), ("depth", "depth"), ("label", "labels_40")):
        image_size = sample[name].shape[-2:]
        if tuple(image_size) != tuple(expected):
            raise DatasetError(
                f"{folder / subfolder / f'{sample_id}.png'}: expected {expected[0]}x{expected[1]} pixels, got "
                f"{image_size[0]}x{image_size[1]}; all images must share one size (or pass --size HEIGHT WIDTH)"
            )
    return sample


def convert_nyuv2(
    src_dir: str | Path,
    out_dir: str | Path,
    *,
    size: tuple[int, int] | None = None,
    valid_size: int = NYUV2_VALID_SIZE,
    overwrite: bool = False,
) -> Path:
    """Convert the ESANet NYU Depth V2 folder; ``size`` = (height, width) resizes, default: as stored.
    Sample ids are the ids of train.txt / test.txt."""
    src_dir = Path(src_dir)
    if not src_dir.is_dir():
        raise DatasetError(f"{src_dir}: folder not found; expected the ESANet NYU Depth V2 folder with train.txt")
    if size is not None and (len(size) != 2 or min(size) < 1):
        raise DatasetError(f"size must be (height, width) with positive sizes, got {size}")
    ids = {part: read_ids(src_dir, part) for part in PARTS}
    if not 0 < valid_size < len(ids["train"]):
        raise DatasetError(
            f"valid_size must be between 1 and {len(ids['train']) - 1} (train.txt lists {len(ids['train'])} ids), "
            f"got {valid_size}"
        )
    first = ids["train"][0]
    stored_size = read_rgb(src_dir / "train" / "rgb" / f"{first}.png").shape[1:]
    out_size = tuple(size) if size is not None else tuple(stored_size)
    splits = {
        "train": ("train", ids["train"][:-valid_size]),
        "valid": ("train", ids["train"][-valid_size:]),
        "test": ("test", ids["test"]),
    }
    meta = nyuv2_meta(src_dir, out_size, valid_size, resized=size is not None)
    with dataset_writer(out_dir, meta, overwrite=overwrite, source_name=src_dir.name) as writer:
        for split, (part, split_ids) in splits.items():
            for start in range(0, len(split_ids), CHUNK_ROWS):
                chunk_ids = split_ids[start : start + CHUNK_ROWS]
                samples = [_read_sample(src_dir, part, sample_id, size, out_size) for sample_id in chunk_ids]
                columns = {name: np.stack([sample[name] for sample in samples]) for name in ("rgb", "depth", "label")}
                columns["sample_id"] = chunk_ids
                writer.write(split, columns)
    return Path(out_dir)
