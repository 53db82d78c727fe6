"""Export: the run manifest and model cards."""
