"""``dynmm data prepare KIND --out DIR [--src PATH] ...`` converts a dataset users bring (``table``: any
Parquet or CSV table) or generates a built-in one into the platform's Parquet layout; ``dynmm data show DIR``
checks its files against the metadata (exit 2 naming a damaged file) and prints it."""

from __future__ import annotations

import argparse

from dynmm.data.convert import CONVERTERS, prepare_dataset
from dynmm.data.format import SPLITS, read_meta, verify_dataset
from dynmm.data.readers import BUILTIN_DATASETS
from dynmm.data.synthetic import BUILTIN_NUM_SAMPLES
from dynmm.data.table import convert_table
from dynmm.data.table_plan import TASKS, TableRequest
from dynmm.errors import DatasetError

OPTION_NAMES = ("nonfinite", "boundaries", "valid_size", "num_samples", "size", "overwrite")
TABLE_OPTIONS = ("label", "task", "modalities", "split_column", "split", "seed", "id_column", "standardize",
                 "drop_incomplete")
TABLE = "table"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("data", help="prepare and inspect datasets")
    commands = parser.add_subparsers(dest="data_command", required=True)

    prepare = commands.add_parser("prepare", help="convert a dataset (or generate a built-in one) to Parquet")
    prepare.add_argument(
        "kind",
        choices=[*CONVERTERS, TABLE, *BUILTIN_DATASETS],
        help=f"convert {', '.join(CONVERTERS)} or a Parquet/CSV {TABLE} (needs --src) or generate "
        f"{', '.join(BUILTIN_DATASETS)}",
    )
    prepare.add_argument("--src", default=None, help="source file or folder (mosei, mmimdb, avmnist, nyuv2, table)")
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
    _add_table_options(prepare.add_argument_group("table: a Parquet or CSV file, one row per sample"))
    prepare.set_defaults(handler=run_prepare)

    show = commands.add_parser("show", help="check a dataset's files and print its metadata and split sizes")
    show.add_argument("directory", help="dataset folder (holding dataset.json)")
    show.set_defaults(handler=run_show)


def _add_table_options(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--label", help="the label column (multilabel: one column of 0/1 lists, or several 0/1 "
                       "columns, comma-separated)")
    group.add_argument("--task", metavar="|".join(TASKS), help="what the label is")
    group.add_argument("--modality", dest="modalities", action="append", metavar="NAME=COLUMN[,COLUMN...][:AxB]",
                       help="repeatable: numeric columns forming one vector, or one list column; a trailing "
                       ":50x74 reshapes it to a sequence (T, D), :3x32x32 to an image (C, H, W)")
    group.add_argument("--split-column", help="a column of train/valid/test saying where each row goes")
    group.add_argument("--split", help="train,valid,test fractions (default 0.7,0.15,0.15; stratified by class)")
    group.add_argument("--seed", type=int, help="seed of the split (default 0)")
    group.add_argument("--id-column", help="the sample ids (default: the row number in the file)")
    group.add_argument("--no-standardize", dest="standardize", action="store_false", default=None,
                       help="store the numbers as given (default: standardised with the train split's mean/std)")
    group.add_argument("--drop-incomplete", action="store_true", default=None,
                       help="drop rows with NaN, inf or missing cells (default: refuse the table)")


def run_prepare(args: argparse.Namespace) -> int:
    table_options = [name for name in TABLE_OPTIONS if getattr(args, name) is not None]
    if args.kind == TABLE:
        return run_prepare_table(args)
    if table_options:
        raise DatasetError(f"option(s) {table_options} apply only to {TABLE!r}, not to {args.kind!r}")
    options = {name: getattr(args, name) for name in OPTION_NAMES if getattr(args, name) is not None}
    for name in ("boundaries", "size"):
        if name in options:
            options[name] = tuple(options[name])
    out_dir = prepare_dataset(args.kind, args.src, args.out, **options)
    print(f"wrote {out_dir}")
    print(format_meta(out_dir))
    return 0


def run_prepare_table(args: argparse.Namespace) -> int:
    others = [name for name in OPTION_NAMES if name != "overwrite" and getattr(args, name) is not None]
    if others:
        raise DatasetError(f"option(s) {others} do not apply to {TABLE!r}")
    missing = [flag for flag, name in (("--src", "src"), ("--label", "label"), ("--task", "task"),
                                       ("--modality", "modalities")) if getattr(args, name) is None]
    if missing:
        raise DatasetError(f"dynmm data prepare {TABLE} needs {', '.join(missing)}")
    request = TableRequest(task=args.task, label=args.label, modalities=args.modalities, id_column=args.id_column,
                           split_column=args.split_column, split=args.split, seed=args.seed or 0)
    out_dir = convert_table(args.src, args.out, request, standardize=args.standardize is not False,
                            drop_incomplete=bool(args.drop_incomplete), overwrite=bool(args.overwrite))
    dropped = read_meta(out_dir).params.get("dropped_incomplete_rows")
    print(f"wrote {out_dir}")
    if dropped is not None:
        print(f"dropped {dropped} row(s) with NaN, inf or missing cells")
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
        *([f"labels     {_shortened(meta.label_names)}"] if meta.label_names else []),
        "",
        f"{'modality':<12} {'shape':<16} {'dtype':<8} {'source columns' if meta.source_table else ''}".rstrip(),
        *(f"{name:<12} {str(tuple(spec.shape)):<16} {spec.dtype:<8} {_source_columns(meta, name)}".rstrip()
          for name, spec in meta.modalities.items()),
        "",
        f"{'split':<12} {'rows':>8}",
        *(f"{split:<12} {meta.splits.get(split, 0):>8}" for split in SPLITS),
        f"{'total':<12} {sum(meta.splits.values()):>8}",
    ]
    if meta.params:
        lines += ["", *(f"{key:<24} {value}" for key, value in meta.params.items())]
    return "\n".join(lines)


def _shortened(values: list, limit: int = 8) -> str:
    shown = ", ".join(repr(value) for value in values[:limit])
    return shown + (f", ... ({len(values)} in all)" if len(values) > limit else "")


def _source_columns(meta, name: str) -> str:
    if meta.source_table is None:
        return ""
    source = meta.source_table.modalities[name]
    return ("list " if source.vector_column else "") + _shortened(list(source.columns), limit=4)
