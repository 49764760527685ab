"""DynMM platform: train, tune and register Dynamic Multimodal Fusion models.

Sub-packages, in the direction data flows: ``spec`` (pipeline YAML), ``models`` (torch only),
``data`` (Parquet datasets), ``train`` (Ray Train), ``tune`` (Ray Tune + Optuna), ``track`` (MLflow),
``cluster`` (Ray Jobs). ``cli`` is a thin layer over them.
"""

__version__ = "0.1.0"
