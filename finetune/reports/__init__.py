"""Reports: the HTML pages of runs and sweeps."""
