"""The training loop: optimiser, schedule, early stopping, checkpoints, seeding, resume."""
