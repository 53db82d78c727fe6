# The configuration: each run is run_defaults updated with its own keys, then
# everything is validated against schemas/config.schema.yaml (which also fills
# in the defaults), then the cross-references a schema cannot express are
# checked. All of this happens before any job is scheduled.
import itertools
import json
import os
import re

from snakemake.utils import update_config, validate


def replace_the_config_in_cluster_jobs_too():
    """Snakemake (9.27) does not pass --replace-workflow-config on to the jobs it submits to a
    cluster: they would see config/config.yaml merged into the config they were given, and
    compute other settings than the workflow that submitted them. Replace it there too."""
    if workflow.config_settings.replace_workflow_config:
        os.environ.update(FINETUNE_WORKFLOW_CONFIG_REPLACED="1")
    elif workflow.remote_exec and os.environ.get("FINETUNE_WORKFLOW_CONFIG_REPLACED") == "1":
        config.clear()
        update_config(config, workflow.config_settings.overwrite_config)


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


def expand_sweeps():
    """Each sweep's grid as runs: {sweep}-{key}{value}-... for every combination of values, in
    the grid's key order, each run_defaults < base < its grid values. Returns {sweep: {run: values}}."""
    sweeps = config.get("sweeps") or {}
    if not isinstance(sweeps, dict):
        raise ValueError("sweeps: expected a mapping of sweep names to {base, grid}")
    run_settings = SETTINGS.load_schema()["$defs"]["run"]["properties"]
    config["runs"] = dict(config.get("runs") or {})
    expanded = {}
    for sweep, spec in sweeps.items():
        base, grid = dict((spec or {}).get("base") or {}), (spec or {}).get("grid")
        if not isinstance(grid, dict) or not grid:
            raise ValueError(f"sweep '{sweep}': grid is empty; give at least one run setting and its values")
        for key, values in grid.items():
            if key not in run_settings:
                raise ValueError(f"sweep '{sweep}': grid key '{key}' is not a run setting "
                                 f"(run settings: {', '.join(run_settings)})")
            if not isinstance(values, list) or not values:
                raise ValueError(f"sweep '{sweep}': grid key '{key}' has no values (give a non-empty list)")
            if key in base:
                raise ValueError(f"sweep '{sweep}': '{key}' is set in both base and grid; keep one")
        for key in base:
            if key not in run_settings:
                raise ValueError(f"sweep '{sweep}': base key '{key}' is not a run setting")
        expanded[sweep] = {}
        for combination in itertools.product(*grid.values()):
            values = dict(zip(grid, combination))
            name = "-".join([sweep] + [f"{key}{sweep_value_name(value)}" for key, value in values.items()])
            name = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
            if name in config["runs"]:
                owner = next((s for s, runs in expanded.items() if name in runs), None)
                raise ValueError(f"sweep '{sweep}': its run '{name}' ({values}) collides with "
                                 + (f"a run of sweep '{owner}'" if owner else "a run listed under runs"))
            config["runs"][name] = {**base, **values}
            expanded[sweep][name] = values
    return expanded


def merge_run_defaults():
    defaults = config.get("run_defaults") or {}
    for run_name, run in (config.get("runs") or {}).items():
        config["runs"][run_name] = {**defaults, **(run or {})}


def check_what_schema_defaults_would_hide():
    """Settings that do not apply, caught before validation fills in their defaults."""
    for run_name, run in (config.get("runs") or {}).items():
        if run.get("method") == "full" and run.get("merge"):
            raise ValueError(f"run '{run_name}': merge does not apply to method full (its trained folder is a whole "
                             "model already); remove merge or set it to false")
        weights = run["datasets"] if isinstance(run.get("datasets"), dict) else {}
        for dataset, weight in weights.items():
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight <= 0:
                raise ValueError(f"run '{run_name}': datasets: the weight of '{dataset}' must be a number > 0, "
                                 f"got {weight!r} (leave a dataset out to not train on it)")
    for model, spec in (config.get("base_models") or {}).items():
        pretrain = ((spec or {}).get("build_tiny") or {}).get("pretrain") or {}
        if pretrain.get("method", "full") != "full":
            raise ValueError(f"base model '{model}': pretraining is always method full, not {pretrain['method']}")
        for key in ("base_model", "datasets", "merge", "hub"):
            if key in pretrain:
                raise ValueError(f"base model '{model}': build_tiny.pretrain.{key} does not apply to pretraining")


def check_references():
    names = {"base model": config["base_models"], "dataset": config["datasets"]}
    corpora = set()
    for model, spec in config["base_models"].items():
        if "build_tiny" in spec:
            corpus = spec["build_tiny"]["corpus"]
            if corpus not in config["datasets"]:
                raise ValueError(f"base model '{model}': build_tiny.corpus '{corpus}' is not a dataset "
                                 f"(configured: {', '.join(config['datasets'])})")
            corpora.add(corpus)
    for run_name, run in config["runs"].items():
        if "base_model" not in run:
            if len(config["base_models"]) != 1:
                raise ValueError(f"run '{run_name}': set base_model (one of {', '.join(config['base_models'])})")
            run["base_model"] = next(iter(config["base_models"]))
        run.setdefault("datasets", [name for name in config["datasets"] if name not in corpora])
        for kind, value in [("base model", run["base_model"])] + [("dataset", d) for d in run["datasets"]]:
            if value not in names[kind]:
                raise ValueError(f"run '{run_name}': unknown {kind} '{value}' "
                                 f"(configured: {', '.join(names[kind])})")
        if run["method"] == "full":
            run["merge"] = False
        check_run_conflicts(run_name, run)
        check_hub_target(run_name, run)
    for model, spec in config["base_models"].items():
        path = os.path.expanduser(spec.get("name_or_path", ""))
        looks_local = os.path.isabs(path) or path.startswith(os.curdir)
        if looks_local and not os.path.isdir(path):
            raise ValueError(f"base model '{model}': name_or_path {path} is not a directory")
        check_remote_code(model, spec, path)


def check_run_conflicts(run_name, run):
    problems = SETTINGS.run_conflicts(run)
    if problems:
        raise ValueError(f"run '{run_name}': " + "; ".join(problems))


def check_remote_code(model, spec, path):
    """A local model folder that ships its own code (an auto_map) needs trust_remote_code:
    stop before any job. (A Hub id is refused by transformers in its first job, the same way.)"""
    if spec.get("trust_remote_code") or not os.path.isdir(path):
        return
    for name in ("config.json", "tokenizer_config.json"):
        file = os.path.join(path, name)
        if os.path.isfile(file):
            with open(file) as f:
                if json.load(f).get("auto_map"):
                    raise ValueError(f"base model '{model}': {path} runs its own Python code (auto_map in {name}), "
                                     "not code from transformers; read it, then set trust_remote_code: true on "
                                     "this base model to allow it")


def check_hub_target(run_name, run):
    """What a run uploads: its adapter (or merged model), or for method full its model."""
    if not run.get("hub"):
        return
    hub = run["hub"]
    hub.setdefault("what", "model" if run["method"] == "full" else "adapter")
    allowed = ["model"] if run["method"] == "full" else ["adapter", "merged"]
    if hub["what"] not in allowed:
        raise ValueError(f"run '{run_name}': hub.what '{hub['what']}' does not fit method {run['method']} "
                         f"(use {' or '.join(allowed)})")
    if hub["what"] == "merged" and not run["merge"]:
        raise ValueError(f"run '{run_name}': hub.what is 'merged' but merge is false")


def check_hub_token():
    """Fail before any job when an upload is configured and no token could authorize it."""
    uploading = [name for name, run in config["runs"].items() if run.get("hub")]
    if not uploading:
        return
    from huggingface_hub import get_token

    if get_token() is None:
        raise ValueError(f"run(s) {', '.join(uploading)} upload to the Hugging Face Hub, but no token is available: "
                         "set HF_TOKEN or run `huggingface-cli login` (a token is never read from the config)")


replace_the_config_in_cluster_jobs_too()
SWEEPS = expand_sweeps()
merge_run_defaults()
check_what_schema_defaults_would_hide()
validate(config, "../schemas/config.schema.yaml")
check_references()
check_hub_token()
RUNS = config["runs"]
