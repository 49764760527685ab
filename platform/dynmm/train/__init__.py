"""Ray Train: the per-worker loop (plain PyTorch + a few Ray calls), stages, metrics all-reduced across
ranks, checkpoints, and the TorchTrainer factory. Must not import dynmm.tune or dynmm.cluster."""
