"""Building blocks of the training loop: loss, schedule, checkpoints, metrics, manifest, progress."""
