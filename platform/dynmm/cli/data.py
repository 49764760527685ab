"""``dynmm data prepare KIND --out DIR [--src PATH] ...`` converts a dataset users bring (or generates a
built-in one) into the platform's Parquet layout; ``dynmm data show DIR`` checks its files against the
metadata (exit 2 naming a damaged file) and prints it."""

from __future__ import annotations

import argparse

from dynmm.data.convert import CONVERTERS, prepare_dataset
from dynmm.data.format import SPLITS, read_meta, verify_dataset
from dynmm.data.readers import BUILTIN_DATASETS
from dynmm.data.synthetic import BUILTIN_NUM_SAMPLES

OPTION_NAMES = ("nonfinite", "boundaries", "valid_size", "num_samples", "size", "overwrite")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("data", help="prepare and inspect datasets")
    commands = parser.add_subparsers(dest="data_command", required=True)

    prepare = commands.add_parser("prepare", help="convert a dataset (or generate a built-in one) to Parquet")
    prepare.add_argument(
        "kind",
        choices=[*CONVERTERS, *BUILTIN_DATASETS],
        help=f"convert {', '.join(CONVERTERS)} (needs --src) or generate {', '.join(BUILTIN_DATASETS)}",
    )
    prepare.add_argument("--src", default=None, help="source file or folder (mosei, mmimdb, avmnist, nyuv2)")
    prepare.add_argument("--out", required=True, help="output dataset folder (written atomically)")
    prepare.add_argument(
        "--nonfinite",
        choices=["fail", "replace"],
        default=None,
        help="NaN/inf in features: fail (default) or replace with 0",
    )
    prepare.add_argument(
        "--boundaries",
        type=int,
        nargs=2,
        metavar=("TRAIN_END", "VALID_END"),
        default=None,
        help="mmimdb: first row of valid and of test (default 15552 18160)",
    )
    prepare.add_argument(
        "--valid-size",
        type=int,
        default=None,
        help="avmnist, nyuv2: rows at the end of train used as valid (default 5000 and 80)",
    )
    prepare.add_argument(
        "--size",
        type=int,
        nargs=2,
        metavar=("HEIGHT", "WIDTH"),
        default=None,
        help="nyuv2: resize every image (RGB bilinear, depth and labels nearest; default: as stored)",
    )
    prepare.add_argument(
        "--num-samples",
        type=int,
        default=None,
        help=f"synthetic-mosei: number of samples (default {BUILTIN_NUM_SAMPLES})",
    )
    prepare.add_argument(
        "--overwrite",
        action="store_true",
        default=None,
        help="replace an existing output folder (only once the new one is complete)",
    )
    prepare.set_defaults(handler=run_prepare)

    show = commands.add_parser("show", help="check a dataset's files and print its metadata and split sizes")
    show.add_argument("directory", help="dataset folder (holding dataset.json)")
    show.set_defaults(handler=run_show)


def run_prepare(args: argparse.Namespace) -> int:
    options = {name: getattr(args, name) for name in OPTION_NAMES if getattr(args, name) is not None}
    for name in ("boundaries", "size"):
        if name in options:
            options[name] = tuple(options[name])
    out_dir = prepare_dataset(args.kind, args.src, args.out, **options)
    print(f"wrote {out_dir}")
    print(format_meta(out_dir))
    return 0


def run_show(args: argparse.Namespace) -> int:
    checksums_verified = verify_dataset(args.directory)
    print(format_meta(args.directory))
    print()
    if checksums_verified:
        print("files      verified (present, rows, schema, SHA-256 as written)")
    else:
        print("files      present, rows and schema checked; checksums not verified (none recorded: written "
              "before dynmm kept them; prepare it again to record them)")
    return 0


def format_meta(directory: str) -> str:
    meta = read_meta(directory)
    lines = [
        f"name       {meta.name}{'  (synthetic)' if meta.synthetic else ''}",
        f"task       {meta.task}" + (f", {meta.num_classes} classes" if meta.num_classes else ""),
        f"label      {meta.label_dtype} {tuple(meta.label_shape)}"
        + (f" in [{meta.label_range[0]:g}, {meta.label_range[1]:g}]" if meta.label_range else ""),
        f"source     {meta.source}",
        "",
        f"{'modality':<12} {'shape':<16} dtype",
        *(f"{name:<12} {str(tuple(spec.shape)):<16} {spec.dtype}" for name, spec in meta.modalities.items()),
        "",
        f"{'split':<12} {'rows':>8}",
        *(f"{split:<12} {meta.splits.get(split, 0):>8}" for split in SPLITS),
        f"{'total':<12} {sum(meta.splits.values()):>8}",
    ]
    if meta.params:
        lines += ["", *(f"{key:<24} {value}" for key, value in meta.params.items())]
    return "\n".join(lines)
