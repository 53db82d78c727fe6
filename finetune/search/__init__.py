"""Searches beyond grids: Optuna studies whose trials are ordinary runs of the workflow (docs/search.md)."""
