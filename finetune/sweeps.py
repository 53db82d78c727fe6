"""Grid sweeps: the runs a sweep's grid expands to, named after their values. The config's
resolution (config.py) adds them to the runs; the sweep report plots them by the settings they vary."""
import itertools
import re


def sweep_value_name(value):
    """A grid value as it appears in a run name: 0.0002, 16, true, all-linear, q_proj_v_proj."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return format(value, "g")
    if isinstance(value, (list, tuple)):
        return "_".join(map(sweep_value_name, value))
    if isinstance(value, dict):
        return "_".join(f"{key}{sweep_value_name(item)}" for key, item in value.items())
    return str(value)


def grid_runs(sweep, spec):
    """[(run name, its grid values)] of one sweep, every combination in the grid's key order."""
    grid = (spec or {}).get("grid") or {}
    runs = []
    for combination in itertools.product(*grid.values()):
        values = dict(zip(grid, combination))
        name = "-".join([sweep] + [f"{key}{sweep_value_name(value)}" for key, value in values.items()])
        runs.append((re.sub(r"[^A-Za-z0-9_.-]", "_", name), values))
    return runs
