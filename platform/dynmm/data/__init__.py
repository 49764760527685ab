"""Datasets: the Parquet layout and its metadata (``format``), readers for Ray Data and plain PyTorch
(``readers``), the built-in datasets (``digits``, ``synthetic``), converters of the datasets users bring
(``convert``, ``nyuv2``) and the import of any Parquet or CSV table (``table``, with the row <-> array functions a
served model shares in ``table_columns``). Every failure a user can fix is a ``DatasetError``.

Must not import dynmm.models, ray.train or mlflow; ``ray.data`` is imported only where a Ray dataset is
built, so the plain reader works without starting Ray.
"""

from dynmm.data.convert import convert_avmnist, convert_mmimdb, convert_mosei, prepare_dataset
from dynmm.data.digits import prepare_digits
from dynmm.data.format import SPLITS, DatasetMeta, InputTransform, ModalitySpec, SourceTable, read_meta, write_meta
from dynmm.data.lineage import dataset_digest
from dynmm.data.nyuv2 import convert_nyuv2
from dynmm.data.readers import BUILTIN_DATASETS, iter_batches, load_split, ray_dataset, resolve_dataset
from dynmm.data.synthetic import generate_synthetic_mosei
from dynmm.data.table import convert_table
from dynmm.data.table_columns import modality_arrays, user_labels
from dynmm.data.table_plan import TableRequest
from dynmm.data.writer import DatasetWriter, dataset_writer
from dynmm.errors import DatasetError

__all__ = [
    "BUILTIN_DATASETS",
    "SPLITS",
    "DatasetError",
    "DatasetMeta",
    "DatasetWriter",
    "InputTransform",
    "ModalitySpec",
    "SourceTable",
    "TableRequest",
    "convert_avmnist",
    "convert_mmimdb",
    "convert_mosei",
    "convert_nyuv2",
    "convert_table",
    "dataset_digest",
    "dataset_writer",
    "generate_synthetic_mosei",
    "iter_batches",
    "load_split",
    "modality_arrays",
    "prepare_dataset",
    "prepare_digits",
    "ray_dataset",
    "read_meta",
    "resolve_dataset",
    "user_labels",
    "write_meta",
]
