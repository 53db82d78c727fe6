"""Training: setup and state of a run, adapters and optimizers, checkpoints, FSDP, preflight checks, selection, logging, samples, the summary."""
