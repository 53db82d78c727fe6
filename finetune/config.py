"""The workflow's configuration, resolved before any job is scheduled (rules/config.smk
calls these in order):

1. `expand_sweeps`: each grid of `sweeps:` becomes runs named {sweep}-{key}{value}-...;
2. `merge_run_defaults`: each run is run_defaults updated with its own keys;
3. `check_before_defaults`: what validation would hide once it fills in defaults;
4. (the Snakefile validates the config against the schema, filling in defaults);
5. `resolve_runs`: each run's base model (another run's trained model, for a chained run)
   and datasets, and the cross-references and combinations a schema cannot express (and
   whether GGUF can hold the model of a run that writes it);
6. `check_base_models`, `check_fused_experts` and `check_hub_token`: what the machine
   must have (a local folder, a cached Hub model when offline, a token for uploads) and
   whether peft can train what a run targets in a mixture of experts.

Every problem is a ValueError that names the run, sweep, base model or dataset.
"""
import json
import os

from finetune.settings import fill_objective_defaults, run_conflicts
from finetune.sweeps import grid_runs

def check_sweep(sweep, spec, run_settings):
    base, grid = (spec or {}).get("base") or {}, (spec or {}).get("grid")
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


def expand_sweeps(config, run_settings):
    """Add each sweep's runs to config['runs'] (run_defaults < base < grid values); {sweep: {run: values}}."""
    sweeps = config.get("sweeps") or {}
    if not isinstance(sweeps, dict):
        raise ValueError("sweeps: expected a mapping of sweep names to {base, grid}")
    config["runs"] = dict(config.get("runs") or {})
    expanded = {}
    for sweep, spec in sweeps.items():
        check_sweep(sweep, spec, run_settings)
        expanded[sweep] = {}
        for name, values in grid_runs(sweep, spec):
            if name in config["runs"]:
                owner = next((s for s, runs in expanded.items() if name in runs), None)
                raise ValueError(f"sweep '{sweep}': its run '{name}' ({values}) collides with "
                                 + (f"a run of sweep '{owner}'" if owner else "a run listed under runs"))
            config["runs"][name] = {**(spec.get("base") or {}), **values}
            expanded[sweep][name] = values
    return expanded


def merge_run_defaults(config):
    defaults = config.get("run_defaults") or {}
    for name, run in (config.get("runs") or {}).items():
        config["runs"][name] = {**defaults, **(run or {})}


def check_before_defaults(config):
    """Settings that do not apply, caught before validation fills in their defaults; the defaults that depend
    on a run's objective (x-default-for in the schema), filled in before it does."""
    for name, run in (config.get("runs") or {}).items():
        fill_objective_defaults(run)
        if run.get("method") == "full" and run.get("merge"):
            raise ValueError(f"run '{name}': merge does not apply to method full (its trained folder is a whole "
                             "model already); remove merge or set it to false")
        weights = run["datasets"] if isinstance(run.get("datasets"), dict) else {}
        for dataset, weight in weights.items():
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight <= 0:
                raise ValueError(f"run '{name}': datasets: the weight of '{dataset}' must be a number > 0, "
                                 f"got {weight!r} (leave a dataset out to not train on it)")
    for model, spec in (config.get("base_models") or {}).items():
        pretrain = ((spec or {}).get("build_tiny") or {}).get("pretrain") or {}
        if pretrain.get("method", "full") != "full":
            raise ValueError(f"base model '{model}': pretraining is always method full, not {pretrain['method']}")
        for key in ("base_model", "datasets", "merge", "hub"):
            if key in pretrain:
                raise ValueError(f"base model '{model}': build_tiny.pretrain.{key} does not apply to pretraining")


def pretraining_corpora(config):
    corpora = set()
    for model, spec in config["base_models"].items():
        if "build_tiny" in spec:
            corpus = spec["build_tiny"]["corpus"]
            if corpus not in config["datasets"]:
                raise ValueError(f"base model '{model}': build_tiny.corpus '{corpus}' is not a dataset "
                                 f"(configured: {', '.join(config['datasets'])})")
            corpora.add(corpus)
    return corpora


# The record formats each objective trains on (a dataset of format auto may be any).
OBJECTIVE_FORMATS = {"sft": ("alpaca", "chat", "completion"), "kto": ("unpaired",),
                     "grpo": ("alpaca", "chat", "completion", "preference", "unpaired")}
PREFERENCE_FORMATS = ("preference",)


def objective_formats(objective):
    return OBJECTIVE_FORMATS.get(objective, PREFERENCE_FORMATS)


def chained_base_model(run_name):
    """The name under base_models of the model a run trains: what a run with base_model {run: NAME} starts from."""
    return f"{run_name}.tuned"


def parent_chain(config, name):
    """The runs `name` starts from, nearest first; ValueError naming an unknown run or a cycle."""
    chain, run = [], config["runs"][name]
    while isinstance(run.get("base_model"), dict):
        parent = run["base_model"]["run"]
        if parent not in config["runs"]:
            raise ValueError(f"run '{chain[-1] if chain else name}': base_model names run '{parent}', which is not "
                             f"a run (runs: {', '.join(config['runs'])})")
        if parent == name or parent in chain:
            raise ValueError(f"run '{name}': its base models form a cycle: {' -> '.join([name, *chain, parent])}")
        chain.append(parent)
        run = config["runs"][parent]
    return chain


def resolve_chains(config):
    """Each run whose base_model is {run: NAME} starts from that run's trained model: a base model of its own
    (NAME.tuned: its merged weights, or for method full its model), with the root base model's tokenizer and
    prompt settings. Resolved before the runs' other references, so that a chained run is a run like any other."""
    for name in list(config["runs"]):
        chain = parent_chain(config, name)
        if not chain:
            continue
        root = config["runs"][chain[-1]].get("base_model") or next(iter(config["base_models"]))  # checked below
        if root not in config["base_models"]:
            raise ValueError(f"run '{chain[-1]}': unknown base model '{root}' "
                             f"(configured: {', '.join(config['base_models'])})")
        derived = chained_base_model(chain[0])
        spec = config["base_models"].get(derived)
        if spec is not None and spec.get("run") != chain[0]:
            raise ValueError(f"base model '{derived}': the name is taken for the model run '{chain[0]}' trains "
                             "(base_model {run: " + chain[0] + "}); rename the base model")
        prompt_settings = {key: value for key, value in config["base_models"][root].items()
                           if key in ("template", "chat_template", "trust_remote_code")}
        config["base_models"][derived] = {**prompt_settings, "run": chain[0], "root": root}
        config["runs"][name]["base_model"] = derived


def default_datasets(config, name, run, corpora):
    """A run's datasets when it names none: every dataset that is no pretraining corpus and whose format its
    objective trains on (format auto counts as SFT data; grpo takes the SFT datasets by default, a run cannot
    mix records of several kinds)."""
    sft_data = run["objective"] in ("sft", "grpo")
    formats = objective_formats("sft" if sft_data else run["objective"])
    found = [dataset for dataset, spec in config["datasets"].items()
             if dataset not in corpora and (spec.get("format", "auto") in formats
                                            or (spec.get("format", "auto") == "auto" and sft_data))]
    if not found:
        raise ValueError(f"run '{name}': objective {run['objective']} trains on datasets of format "
                         f"{' or '.join(formats)}, and none is configured (set a dataset's format)")
    return found


def dataset_format_problems(config, run):
    formats = objective_formats(run["objective"])
    return [f"dataset '{dataset}' has format {config['datasets'][dataset]['format']}, but objective "
            f"{run['objective']} trains on {' or '.join(formats)} records"
            for dataset in run["datasets"] if dataset in config["datasets"]
            and config["datasets"][dataset].get("format", "auto") not in ("auto", *formats)]


def resolve_runs(config):
    """Fill in each run's base model and datasets, and check what they refer to and how they combine."""
    resolve_chains(config)
    names = {"base model": config["base_models"], "dataset": config["datasets"]}
    corpora = pretraining_corpora(config)
    configured = [model for model, spec in config["base_models"].items() if "run" not in spec]
    for name, run in config["runs"].items():
        if "base_model" not in run:
            if len(configured) != 1:
                raise ValueError(f"run '{name}': set base_model (one of {', '.join(configured)})")
            run["base_model"] = configured[0]
        if "datasets" not in run:
            run["datasets"] = default_datasets(config, name, run, corpora)
        for kind, value in [("base model", run["base_model"])] + [("dataset", d) for d in run["datasets"]]:
            if value not in names[kind]:
                raise ValueError(f"run '{name}': unknown {kind} '{value}' (configured: {', '.join(names[kind])})")
        problems = dataset_format_problems(config, run)
        if problems:
            raise ValueError(f"run '{name}': " + "; ".join(problems))
        if run["method"] == "full":
            run["merge"] = False
        problems = run_conflicts(run) + hub_target_problems(run) + gguf_problems(config, run)
        if run["objective"] == "grpo":
            from finetune.training.rewards import reward_problems
            problems += reward_problems(run["rewards"])
        if problems:
            raise ValueError(f"run '{name}': " + "; ".join(problems))


def hub_target_problems(run):
    """What a run uploads: its adapter (or merged model), or for method full its model."""
    if not run.get("hub"):
        return []
    hub = run["hub"]
    hub.setdefault("what", "model" if run["method"] == "full" else "adapter")
    if hub["what"] == "gguf" and not run.get("gguf"):
        return ["hub.what is 'gguf' but the run writes no GGUF files (set gguf, e.g. [q8_0])"]
    allowed = (["model"] if run["method"] == "full" else ["adapter", "merged"]) + ["gguf"]
    if hub["what"] not in allowed:
        return [f"hub.what '{hub['what']}' does not fit method {run['method']} (use {' or '.join(allowed)})"]
    if hub["what"] == "merged" and not run["merge"]:
        return ["hub.what is 'merged' but merge is false"]
    return []


def gguf_problems(config, run):
    """A run that writes GGUF files needs a whole model (its merged model; for method full its trained one) of
    a family and tokenizer GGUF can hold. Checked on the root base model's files where they are here (a local
    folder; config.json, and tokenizer.json if cached, of a Hub model in the local cache); a built tiny model
    is a Llama with a byte-level BPE tokenizer; anything else the gguf job checks before it writes."""
    if not run.get("gguf"):
        return []
    if run["method"] != "full" and not run["merge"]:
        return ["gguf is written from the merged model, but merge is false (set merge: true)"]
    root = config["base_models"][run["base_model"]].get("root", run["base_model"])
    path = os.path.expanduser(config["base_models"][root].get("name_or_path", ""))
    if not path:
        return []
    local = os.path.isabs(path) or path.startswith(os.curdir) or os.path.isdir(path)
    folder = path if local else os.path.dirname(hub_config_file(path) or "")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        return []
    from finetune.export.gguf import problem

    found = problem(folder, need_tokenizer=False)
    return [f"base model '{root}' ({path}): {found}"] if found else []


def hub_offline():
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def check_base_models(config):
    """Each base model a run uses can be loaded here: a local folder exists (and may run its own code
    only when allowed); a Hub id is in the local cache when the Hub is offline."""
    used = {run["base_model"] for run in config["runs"].values()}
    for model, spec in config["base_models"].items():
        path = os.path.expanduser(spec.get("name_or_path", ""))
        if "name_or_path" not in spec:  # built by the workflow, or trained by a run (base_model {run: NAME})
            continue
        if os.path.isabs(path) or path.startswith(os.curdir) or os.path.isdir(path):
            if not os.path.isdir(path):
                raise ValueError(f"base model '{model}': name_or_path {path} is not a directory")
            check_remote_code(model, spec, path)
        elif model in used and hub_offline() and not hub_config_file(path):
            raise ValueError(
                f"base model '{model}': {path} is not in the local Hugging Face cache, and the Hub cannot be "
                f"reached offline (HF_HUB_OFFLINE is set). Download it where there is a network "
                f"(`hf download {path}` fills the cache), or copy the model to a folder and set this base "
                f"model's name_or_path to that folder")


def hub_config_file(model_id):
    """The config.json of a Hub model in the local cache, or None (nothing is downloaded)."""
    from huggingface_hub import try_to_load_from_cache

    path = try_to_load_from_cache(model_id, "config.json")
    return path if isinstance(path, str) else None


def check_fused_experts(config):
    """A run whose adapter reaches the fused experts of a mixture-of-experts base model must be able to
    train them (training/experts.py); checked where the model's config.json is here (a local folder, the
    cache), else by the training job before it loads any weights."""
    for name, run in config["runs"].items():
        spec = config["base_models"][run["base_model"]]
        if run["method"] not in ("lora", "qlora", "dora") or "name_or_path" not in spec:
            continue
        path = os.path.expanduser(spec["name_or_path"])
        config_file = os.path.join(path, "config.json") if os.path.isdir(path) else hub_config_file(path)
        if not config_file or not os.path.isfile(config_file):
            continue
        from finetune.training.experts import fused_expert_problem, is_mixture_of_experts

        if not is_mixture_of_experts(config_file):
            continue
        from transformers import AutoConfig

        trust = spec.get("trust_remote_code", False)
        model_config = AutoConfig.from_pretrained(os.path.dirname(config_file), trust_remote_code=trust)
        problem = fused_expert_problem(model_config, run["method"], run["target_modules"], run["dropout"], trust)
        if problem:
            raise ValueError(f"run '{name}': {problem}")


def check_remote_code(model, spec, path):
    """A local model folder that ships its own code (an auto_map) needs trust_remote_code."""
    if spec.get("trust_remote_code"):
        return
    for name in ("config.json", "tokenizer_config.json"):
        file = os.path.join(path, name)
        if os.path.isfile(file):
            with open(file) as f:
                if json.load(f).get("auto_map"):
                    raise ValueError(f"base model '{model}': {path} runs its own Python code (auto_map in {name}), "
                                     "not code from transformers; read it, then set trust_remote_code: true on "
                                     "this base model to allow it")


def check_hub_token(config):
    """Fail before any job when an upload is configured and no token could authorize it."""
    uploading = [name for name, run in config["runs"].items() if run.get("hub")]
    if not uploading:
        return
    from huggingface_hub import get_token

    if get_token() is None:
        raise ValueError(f"run(s) {', '.join(uploading)} upload to the Hugging Face Hub, but no token is available: "
                         "set HF_TOKEN or run `huggingface-cli login` (a token is never read from the config)")


def check_harness(config):
    """eval.harness needs lm-evaluation-harness installed, and its workflow task (finetune_heldout, over the
    held-out records evaluate answers) needs eval.num_samples > 0: said before any job. Whether each task
    and its data are there is the harness_tasks job's check (importing lm_eval here would slow every plan)."""
    harness = config["eval"].get("harness")
    if not harness:
        return
    import importlib.util
    if importlib.util.find_spec("lm_eval") is None:
        raise ValueError("eval.harness: lm-evaluation-harness is not installed in this environment "
                         "(pip install 'lm-eval>=0.4.5'), or remove eval.harness")
    if "finetune_heldout" in harness["tasks"] and config["eval"]["num_samples"] == 0:
        raise ValueError("eval.harness: task finetune_heldout asks the held-out records evaluate answers, but "
                         "eval.num_samples is 0 (set it above 0, or remove the task)")

