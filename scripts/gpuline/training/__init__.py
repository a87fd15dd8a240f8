"""The training side of the orchestrator: supervising the trainer, checkpoints, datasets, preflight checks."""
