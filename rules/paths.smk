# Where each file lives. Only the rules and these helpers know file names; the
# scripts get explicit paths. Every path is relative to the working directory,
# so a project that is moved or copied keeps its provenance and reruns nothing.
import hashlib
import json
import os
import re

# Files of a local model folder that only document it: editing them reruns nothing.
DOCUMENTATION = re.compile(r"(?i)^(readme|license|licence|notice|use_policy)(\..*)?$|\.md$")
# Files a tokenizer is loaded from (config.json names the tokenizer class of some models).
TOKENIZER_FILES = re.compile(r"^(tokenizer.*|special_tokens_map\.json|added_tokens\.json|vocab\..*|merges\.txt"
                             r"|chat_template\..*|.*\.model|.*\.tiktoken|config\.json)$")


def project_path(path):
    """A path as rules record it: relative when it lies inside the project, so that it moves with it."""
    absolute = os.path.abspath(os.path.expanduser(path))
    relative = os.path.relpath(absolute)
    return absolute if relative.startswith("..") else relative


# Where the Snakefile is, for the manifest's git commit: relative when inside the project.
WORKFLOW_DIR = project_path(os.path.dirname(workflow.main_snakefile))


def built(model):
    return "build_tiny" in config["base_models"][model]


def pretraining(model):
    """The settings of a built model's pretraining run, or None when it keeps its random weights."""
    if not built(model) or "pretrain" not in config["base_models"][model]["build_tiny"]:
        return None
    return {**config["base_models"][model]["build_tiny"]["pretrain"], "method": "full", "base_model": model}


def base_model_path(model):
    """What from_pretrained loads: the built (and pretrained) model's folder, a local folder, or a Hub id."""
    if built(model):
        return f"results/base_models/{model}" if pretraining(model) else f"results/pretrain/{model}/init"
    path = config["base_models"][model]["name_or_path"]
    return project_path(path) if os.path.isdir(os.path.expanduser(path)) else path


def tokenizer_path(model):
    """Where the tokenizer is read: a built model's is made with its initial weights (pretraining keeps it)."""
    return f"results/pretrain/{model}/init" if built(model) else base_model_path(model)


def base_model_files(model, tokenizer_only=False):
    """The base model as an input of the rules that load it: the built folder, or the files of a local folder, so
    that replacing its weights reruns what used them. A Hub id is no file: none."""
    if built(model):
        return [tokenizer_path(model) if tokenizer_only else base_model_path(model)]
    folder = base_model_path(model)
    if not os.path.isdir(folder):
        return []
    wanted = TOKENIZER_FILES if tokenizer_only else re.compile(".")
    return sorted(os.path.join(folder, name) for name in os.listdir(folder)
                  if os.path.isfile(os.path.join(folder, name)) and not name.startswith(".")
                  and not DOCUMENTATION.search(name) and wanted.match(name))


def tokenization(run):
    """Names the shards of one tokenization: the base model and the run's settings that
    tokenization receives. Runs that agree on these share shards; a change makes new ones."""
    model = config["base_models"][run["base_model"]]
    received = SETTINGS.script_settings("tokenize_data")
    identity = {name: (run if section == "run" else model).get(name)
                for name, (section, _) in received.items() if section in ("run", "base_model")}
    identity["tokenizer"] = tokenizer_path(run["base_model"])
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]
    return f"{run['base_model']}-{run['max_length']}-{digest}"


TOKENIZATION_OF_RUN = {name: tokenization(run) for name, run in RUNS.items()}
TOKENIZATIONS = {TOKENIZATION_OF_RUN[name]: run for name, run in RUNS.items()}


def shards(run_name):
    return [f"results/tokens/{TOKENIZATION_OF_RUN[run_name]}/{dataset}.arrow" for dataset in RUNS[run_name]["datasets"]]


def mix_weights(run_name):
    """The train flag of a run whose datasets carry weights, in the order of its shards."""
    datasets = RUNS[run_name]["datasets"]
    return "--weights " + " ".join(str(datasets[name]) for name in datasets) if isinstance(datasets, dict) else ""


def normalized_records(run_name):
    return [f"results/data/{dataset}.jsonl" for dataset in RUNS[run_name]["datasets"]]


def token_stats(dataset):
    """The stats of every tokenization of a dataset that some run, or some pretraining, uses."""
    names = sorted({TOKENIZATION_OF_RUN[name] for name, run in RUNS.items() if dataset in run["datasets"]})
    pretrained = [model for model in config["base_models"]
                  if pretraining(model) and config["base_models"][model]["build_tiny"]["corpus"] == dataset]
    return ([f"results/tokens/{name}/{dataset}.stats.json" for name in names]
            + [f"results/pretrain/{model}/corpus.stats.json" for model in pretrained])


def published(run_name):
    """The folder a run publishes (with its model card): its adapter, or for method full its model."""
    return "model" if RUNS[run_name]["method"] == "full" else "adapter"


def dataset_stats_files(run_name):
    return [f"results/data/{dataset}.stats.json" for dataset in RUNS[run_name]["datasets"]]


def final_outputs():
    outputs = [f"results/data/{dataset}.stats.json" for dataset in config["datasets"]]
    for name, run in RUNS.items():
        outputs += [f"results/runs/{name}/eval.json", f"results/runs/{name}/report.html",
                    f"results/runs/{name}/{published(name)}"]
        outputs += [f"results/runs/{name}/merged"] if run["merge"] else []
        outputs += [f"results/runs/{name}/upload.json"] if run.get("hub") else []
    return outputs + ["results/report/sweep.html"]
