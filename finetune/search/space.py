"""A search's space, checked before any job, and as Optuna's distributions.

A searched setting is `{type: float, low, high, log}`, `{type: int, low, high, log, step}` or a list of
choices (any values a run setting takes: numbers, strings, lists such as target_modules). Optuna keeps
choices that are not None, bool, int, float or str as their JSON text; `decoded` turns a trial's
parameters back into run settings.
"""
import json
import math

SCALARS = (type(None), bool, int, float, str)


def trial_name(search, number):
    """The run a trial is: named after its search and its number in the study (0, 1, ...)."""
    return f"{search}-trial{number}"


def round_sizes(trials, parallel):
    """How many trials each round proposes: `parallel` each, the last round the rest."""
    return [min(parallel, trials - start) for start in range(0, trials, parallel)]


def round_numbers(trials, parallel, round_number):
    """The trial numbers of a round (rounds count from 1)."""
    start = (round_number - 1) * parallel
    return list(range(start, start + round_sizes(trials, parallel)[round_number - 1]))


def range_problems(key, spec, declared_type):
    """Why a {type, low, high, ...} range cannot be searched, as messages."""
    kind, low, high = spec.get("type"), spec.get("low"), spec.get("high")
    if kind not in ("float", "int"):
        return [f"'{key}': type must be float or int, or give a list of choices"]
    numbers = [value for value in (low, high) if isinstance(value, (int, float)) and not isinstance(value, bool)]
    if len(numbers) < 2:
        return [f"'{key}': give low and high (numbers)"]
    found = []
    if kind == "int" and not all(float(value).is_integer() for value in numbers):
        found.append(f"'{key}': type int needs whole numbers for low and high, got {low} and {high}")
    if low >= high:
        found.append(f"'{key}': low ({low}) must be below high ({high})")
    if spec.get("log") and low <= 0:
        found.append(f"'{key}': log needs low > 0, got {low}")
    if spec.get("log") and spec.get("step") is not None:
        found.append(f"'{key}': log and step do not go together (Optuna samples one or the other)")
    if declared_type == "integer" and kind == "float":
        found.append(f"'{key}' is a whole number (an integer setting): use type int")
    if declared_type not in ("integer", "number", None):
        found.append(f"'{key}' is not a number setting: give a list of choices")
    return found


def space_problems(space, base, run_settings):
    """Why a search's space cannot be searched (run_settings: {name: its schema declaration}), as messages."""
    if not isinstance(space, dict) or not space:
        return ["space is empty; give at least one run setting and its range or choices"]
    found = []
    for key, spec in space.items():
        if key not in run_settings:
            found.append(f"'{key}' is not a run setting")
            continue
        if key in (base or {}):
            found.append(f"'{key}' is set in both base and space; keep one")
        if isinstance(spec, list):
            found += [f"'{key}': the list of choices is empty"] if not spec else []
            found += [f"'{key}': the choice {choice!r} is given twice" for i, choice in enumerate(spec)
                      if choice in spec[:i]]
        elif isinstance(spec, dict):
            found += range_problems(key, spec, run_settings[key].get("type"))
        else:
            found.append(f"'{key}': give {{type: float|int, low, high}} or a list of choices, got {spec!r}")
    return found


def encoded(choice):
    return choice if isinstance(choice, SCALARS) else json.dumps(choice)


def distributions(space):
    """{setting: Optuna distribution} of a checked space."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    found = {}
    for key, spec in space.items():
        if isinstance(spec, list):
            found[key] = CategoricalDistribution([encoded(choice) for choice in spec])
        elif spec["type"] == "int":
            found[key] = IntDistribution(int(spec["low"]), int(spec["high"]), log=spec.get("log", False),
                                         step=int(spec.get("step") or 1))
        else:
            found[key] = FloatDistribution(float(spec["low"]), float(spec["high"]), log=spec.get("log", False),
                                           step=spec.get("step"))
    return found


def decoded(space, params):
    """A trial's parameters as run settings: each choice as given in the space (lists as lists)."""
    settings = {}
    for key, value in params.items():
        spec = space[key]
        if isinstance(spec, list):
            value = next(choice for choice in spec if encoded(choice) == value)
        settings[key] = value
    return settings


def probes(space):
    """Trial settings at the corners of the space (every low, every high, each choice with the rest low), to
    resolve before any job: a value the run schema refuses is named before a trial proposes it."""
    def low(spec):
        return spec[0] if isinstance(spec, list) else (int(spec["low"]) if spec["type"] == "int" else spec["low"])

    def high(spec):
        return spec[-1] if isinstance(spec, list) else (int(spec["high"]) if spec["type"] == "int" else spec["high"])

    lows = {key: low(spec) for key, spec in space.items()}
    found = [lows, {key: high(spec) for key, spec in space.items()}]
    for key, spec in space.items():
        found += [{**lows, key: choice} for choice in (spec if isinstance(spec, list) else [])]
    return found


def objective_value(evaluation, metric):
    """The objective in an eval.json: a key (or dotted path) of its tuned results, else a dotted path from its
    top. KeyError naming what there is when neither holds a number."""
    for root, label in ((evaluation.get("tuned") or {}, "tuned"), (evaluation, "eval.json")):
        value = root
        for part in metric.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    numbers = sorted(key for key, value in (evaluation.get("tuned") or {}).items()
                     if isinstance(value, (int, float)) and not isinstance(value, bool))
    raise KeyError(f"objective metric '{metric}' is not a number in eval.json (tuned metrics: {', '.join(numbers)}; "
                   "a dotted path reaches deeper, e.g. exact_match_by_task.NAME)")


def is_nan(value):
    return value is None or (isinstance(value, float) and math.isnan(value))
