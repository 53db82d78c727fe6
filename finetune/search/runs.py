"""A search's trials as runs of the config: checked before any job, resolved exactly as a run listed under
`runs:` with the same settings would be (run_defaults < the search's base < the trial's values, then the
workflow's validation and resolution), so that a trial is an ordinary run.
"""
import copy
import re

from finetune.config import check_before_defaults, merge_run_defaults, resolve_runs
from finetune.search.space import probes, space_problems, trial_name


def check_searches(config, run_declarations):
    """The `search:` entries, before validation: each space (unknown settings, empty choices, low >= high, log
    with low <= 0, a setting also in base) and the run names of its trials. ValueError naming the search."""
    searches = config.get("search") or {}
    if not isinstance(searches, dict):
        raise ValueError("search: expected a mapping of search names to {base, space, objective, ...}")
    runs = config.get("runs") or {}
    for name, spec in searches.items():
        if not isinstance(spec, dict):
            raise ValueError(f"search '{name}': expected {{base, space, objective, trials, parallel}}")
        base = spec.get("base") or {}
        problems = [f"base key '{key}' is not a run setting" for key in base if key not in run_declarations]
        problems += space_problems(spec.get("space"), base, run_declarations)
        if not isinstance(spec.get("objective"), dict) or "metric" not in spec["objective"]:
            problems.append("give objective: {metric: NAME, direction: minimize|maximize}")
        if problems:
            raise ValueError(f"search '{name}': " + "; ".join(problems))
        taken = [trial_name(name, number) for number in range(spec.get("trials", 12)) if trial_name(name, number) in runs]
        if taken:
            raise ValueError(f"search '{name}': its trial run '{taken[0]}' collides with a run of the config "
                             "(rename the search or the run)")


def chain_of(raw_config, run):
    """The configured runs a run starts from (base_model {run: NAME}), by name."""
    runs, defaults, found = raw_config.get("runs") or {}, raw_config.get("run_defaults") or {}, {}
    merged = {**defaults, **run}
    while isinstance(merged.get("base_model"), dict) and merged["base_model"].get("run") in runs:
        parent = merged["base_model"]["run"]
        if parent in found:
            break
        found[parent] = runs[parent]
        merged = {**defaults, **(runs[parent] or {})}
    return found


def resolve_trial(raw_config, search, name, values, validate):
    """(the trial run's resolved settings, the base models its resolution knows): raw_config is the config as
    given (sweeps expanded, nothing filled in); validate(config) validates and fills in the schema's defaults."""
    run = {**(raw_config["search"][search].get("base") or {}), **values}
    config = copy.deepcopy({key: value for key, value in raw_config.items() if key not in ("runs", "search")})
    config["runs"] = {**copy.deepcopy(chain_of(raw_config, run)), name: copy.deepcopy(run)}
    merge_run_defaults(config)
    check_before_defaults(config)
    validate(config)
    resolve_runs(config)
    return config["runs"][name], config["base_models"]


def reason(problem, name):
    """What a validation error or a run check says, in a line (the schema's reason and the setting it is about)."""
    text = str(problem).replace(f"run '{name}': ", "")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    found = next((line[len("ValidationError: "):] for line in lines if line.startswith("ValidationError: ")), None)
    if found is None:
        return lines[0] if lines else type(problem).__name__
    where = next((line for line in lines if line.startswith("On instance[")), "")
    setting = re.findall(r"\['([^']+)'\]", where)[2:3]
    return f"{setting[0]}: {found}" if setting else found


def check_trials(config, raw_config, validate):
    """Resolve each search's trials at the corners of its space before any job, so that a value the run schema
    or the run checks refuse stops the workflow naming the search and the setting; a pruned search needs held-out
    losses during training. Adds the base models a chained search's trials start from."""
    for search, spec in (config.get("search") or {}).items():
        trial = None
        for values in probes(spec["space"]):
            try:
                trial, models = resolve_trial(raw_config, search, trial_name(search, "probe"), values, validate)
            except Exception as problem:  # the schema's validation error, or the workflow's ValueError
                raise ValueError(f"search '{search}': a trial with {values} is no valid run: "
                                 f"{reason(problem, trial_name(search, 'probe'))}") from None
            for model, model_spec in models.items():
                config["base_models"].setdefault(model, model_spec)
        if spec["pruning"] != "none" and not trial["eval_every"]:
            raise ValueError(f"search '{search}': pruning {spec['pruning']} compares held-out losses during training: "
                             "set eval_every (steps between them) in its base or run_defaults")
