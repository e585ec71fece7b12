"""Training: models, datasets, the trainer-based stages' shared sequence, evaluation, and CPU speedups for training."""
