"""Training: partial-label losses, schedules, the pre-training loop (single process and DDP)."""
