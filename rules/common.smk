# Helpers shared by the rules: the merged per-run settings, where each file
# lives, and the command-line flags each script gets. Only this file and the
# rules know file names; the scripts get explicit paths.
import hashlib
import json
import os
import shlex

from snakemake.utils import validate


def _merge_run_defaults():
    defaults = config.get("run_defaults") or {}
    for run_name, run in (config.get("runs") or {}).items():
        config["runs"][run_name] = {**defaults, **(run or {})}


def _check_config():
    names = {"base model": config["base_models"], "dataset": config["datasets"]}
    for run_name, run in config["runs"].items():
        if "base_model" not in run:
            if len(config["base_models"]) != 1:
                raise ValueError(f"run '{run_name}': set base_model (one of {', '.join(config['base_models'])})")
            run["base_model"] = next(iter(config["base_models"]))
        run.setdefault("datasets", list(config["datasets"]))
        for kind, value in [("base model", run["base_model"])] + [("dataset", d) for d in run["datasets"]]:
            if value not in names[kind]:
                raise ValueError(f"run '{run_name}': unknown {kind} '{value}' "
                                 f"(configured: {', '.join(names[kind])})")
        if run.get("hub") and run["hub"]["what"] == "merged" and not run["merge"]:
            raise ValueError(f"run '{run_name}': hub.what is 'merged' but merge is false")
    _check_hub_token()


def _check_hub_token():
    """Fail before any job when an upload is configured and no token could authorize it."""
    uploading = [name for name, run in config["runs"].items() if run.get("hub")]
    if not uploading:
        return
    from huggingface_hub import get_token

    if get_token() is None:
        raise ValueError(f"run(s) {', '.join(uploading)} upload to the Hugging Face Hub, but no token is available: "
                         "set HF_TOKEN or run `huggingface-cli login` (a token is never read from the config)")


_merge_run_defaults()
validate(config, "../schemas/config.schema.yaml")
_check_config()
RUNS = config["runs"]
SCRIPTS = f"{workflow.basedir}/scripts"
COMMON_CODE = f"{SCRIPTS}/common.py"
# Wraps GPU jobs so that each gets its own devices (not an input: editing it must not retrain).
GPU_POOL = f"{SCRIPTS}/gpu_pool.py"
RECORD_SCHEMAS = [f"{workflow.basedir}/schemas/records/{fmt}.schema.json" for fmt in ("alpaca", "chat", "completion")]


def base_model_path(model):
    spec = config["base_models"][model]
    return f"results/base_models/{model}" if "build_tiny" in spec else spec["name_or_path"]


def base_model_input(model):
    """The model directory as a rule input when the workflow builds it, so a rebuild reruns what uses it."""
    return [base_model_path(model)] if "build_tiny" in config["base_models"][model] else []


def tokenizer_key(run):
    """Names the shards of one tokenization: base model, template, max_length and
    label masking. Runs that agree on these share shards; a change makes new ones."""
    model = config["base_models"][run["base_model"]]
    identity = {
        "model": model.get("name_or_path") or model["build_tiny"],
        "template": model["template"],
        "chat_template": model.get("chat_template"),
        "max_length": run["max_length"],
        "train_on_inputs": run["train_on_inputs"],
        "too_long": run["too_long"],
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]
    return f"{run['base_model']}-{run['max_length']}-{digest}"


TOKENIZATIONS = {tokenizer_key(run): run for run in RUNS.values()}


def shards(run_name):
    run = RUNS[run_name]
    return [f"results/tokens/{tokenizer_key(run)}/{dataset}.arrow" for dataset in run["datasets"]]


def normalized_records(run_name):
    return [f"results/data/{dataset}.jsonl" for dataset in RUNS[run_name]["datasets"]]


def token_stats(dataset):
    """The stats of every tokenization of a dataset that some run uses."""
    keys = {tokenizer_key(run) for run in RUNS.values() if dataset in run["datasets"]}
    return [f"results/tokens/{key}/{dataset}.stats.json" for key in sorted(keys)]


def chat_template_flag(model):
    template = config["base_models"][model].get("chat_template")
    return f"--chat-template {shlex.quote(template)}" if template else ""


def dataset_stats_files(run_name):
    return [f"results/data/{dataset}.stats.json" for dataset in RUNS[run_name]["datasets"]]


def card_flags(run_name, kind):
    """Model card inputs that are not files: base model, settings, license, where it will be published."""
    run = RUNS[run_name]
    hub = run.get("hub") or {}
    flags = [f"--base-model {shlex.quote(base_model_path(run['base_model']))}",
             f"--settings {shlex.quote(json.dumps(run, sort_keys=True))}"]
    if config["model_card"].get("license"):
        flags.append(f"--license {shlex.quote(config['model_card']['license'])}")
    if hub.get("what") == kind:
        flags.append(f"--repo-id {shlex.quote(hub['repo_id'])}")
    return " ".join(flags)


def cli_flags(settings, keys):
    """--flag value pairs for the given keys of a settings dict (booleans as bare flags)."""
    parts = []
    for key in keys:
        value, flag = settings[key], f"--{key.replace('_', '-')}"
        if isinstance(value, bool):
            parts += [flag] if value else []
        elif isinstance(value, list):
            parts.append(" ".join([flag] + [shlex.quote(str(v)) for v in value]))
        else:
            parts.append(f"{flag} {shlex.quote(str(value))}")
    return " ".join(parts)


TRAIN_SETTINGS = [
    "method", "r", "adalora_init_r", "alpha", "dropout", "target_modules", "bias", "use_rslora", "optimizer",
    "learning_rate", "weight_decay", "lr_scheduler", "warmup_ratio", "max_grad_norm", "epochs", "max_steps",
    "batch_size", "grad_accum", "gradient_checkpointing", "precision", "attn_implementation", "packing", "seed",
    "eval_every", "log_every", "checkpoint_every",
]


def train_launcher(run_name):
    """Plain python for one device; accelerate (DDP) for a run with gpus > 1."""
    gpus = RUNS[run_name]["gpus"]
    if gpus <= 1:
        return "python"
    return (f"accelerate launch --multi_gpu --num_processes {gpus} --num_machines 1 --dynamo_backend no "
            "--main_process_port $(python -c 'import socket; s = socket.socket(); s.bind((\"\", 0)); "
            "print(s.getsockname()[1])')")


def merged_runs():
    return [name for name, run in RUNS.items() if run["merge"]]


def final_outputs():
    outputs = [f"results/data/{dataset}.stats.json" for dataset in config["datasets"]]
    for name in RUNS:
        outputs += [f"results/runs/{name}/eval.json", f"results/runs/{name}/report.html"]
    outputs += [f"results/runs/{name}/adapter" for name in RUNS]
    outputs += [f"results/runs/{name}/merged" for name in merged_runs()]
    outputs += [f"results/runs/{name}/upload.json" for name, run in RUNS.items() if run.get("hub")]
    return outputs + ["results/report/sweep.html"]
