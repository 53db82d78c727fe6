# Where each file lives, for the rules. Only the rules and these helpers know file
# names; the scripts get explicit paths. Every path is relative to the working
# directory, so a project that is moved or copied keeps its provenance and reruns
# nothing. Uses RUNS and config (config.smk).
import hashlib
import json
import os
import re

from finetune.data.sources import is_hub_dataset
from finetune.settings import declared, share

# Files of a local model folder that only document it: editing them reruns nothing.
DOCUMENTATION = re.compile(r"(?i)^(readme|license|licence|notice|use_policy)(\..*)?$|\.md$")
# Files a tokenizer is loaded from (config.json names the tokenizer class of some models).
TOKENIZER_FILES = re.compile(
    r"^(tokenizer.*|special_tokens_map\.json|added_tokens\.json|vocab\..*|merges\.txt"
    r"|chat_template\..*|.*\.model|.*\.tiktoken|config\.json)$"
)


def project_path(path):
    """A path as rules record it: relative when it lies inside the project, so that it moves with it."""
    absolute = os.path.abspath(os.path.expanduser(path))
    relative = os.path.relpath(absolute)
    return absolute if relative.startswith("..") else relative


# Where the Snakefile is, for the manifest's git commit: relative when inside the project.
WORKFLOW_DIR = project_path(os.path.dirname(workflow.main_snakefile))


def built(model):
    return "build_tiny" in config["base_models"][model]


def trained_by(model):
    """The run whose trained model a base model is (base_model {run: NAME}), or None."""
    return config["base_models"][model].get("run")


def root_model(model):
    """The configured base model a chained run's model descends from (itself for any other)."""
    return config["base_models"][model].get("root", model)


def pretraining(model):
    """The settings of a built model's pretraining run, or None when it keeps its random weights."""
    if not built(model) or "pretrain" not in config["base_models"][model]["build_tiny"]:
        return None
    return {**config["base_models"][model]["build_tiny"]["pretrain"], "method": "full", "base_model": model}


def corpus(model):
    """The dataset a built model's tokenizer is trained on (and it is pretrained on)."""
    return config["base_models"][model]["build_tiny"]["corpus"]


def base_model_path(model):
    """What from_pretrained loads: the built (and pretrained) model's folder, a local folder, or a Hub id."""
    if built(model):
        return f"results/base_models/{model}" if pretraining(model) else f"results/pretrain/{model}/init"
    if trained_by(model):
        parent = trained_by(model)
        return f"results/runs/{parent}/{'trained' if RUNS[parent]['method'] == 'full' else 'merged_weights'}"
    path = config["base_models"][model]["name_or_path"]
    return project_path(path) if os.path.isdir(os.path.expanduser(path)) else path


def tokenizer_path(model):
    """Where the tokenizer is read: a built model's is made with its initial weights (pretraining keeps it); a
    run's trained model has its root base model's."""
    model = root_model(model)
    return f"results/pretrain/{model}/init" if built(model) else base_model_path(model)


def base_model_files(model, tokenizer_only=False):
    """The base model as an input of the rules that load it: the built folder, or the files of a local folder, so
    that replacing its weights reruns what used them. A Hub id is no file: none."""
    if tokenizer_only and trained_by(model):
        return base_model_files(root_model(model), tokenizer_only)
    if built(model) or trained_by(model):
        return [tokenizer_path(model) if tokenizer_only else base_model_path(model)]
    folder = base_model_path(model)
    if not os.path.isdir(folder):
        return []
    wanted = TOKENIZER_FILES if tokenizer_only else re.compile(".")
    return sorted(
        os.path.join(folder, name)
        for name in os.listdir(folder)
        if os.path.isfile(os.path.join(folder, name))
        and not name.startswith(".")
        and not DOCUMENTATION.search(name)
        and wanted.match(name)
    )


def tokenization(run):
    """Names the shards of one tokenization: the base model and the run's settings that
    tokenization receives. Runs that agree on these share shards; a change makes new ones."""
    model = config["base_models"][run["base_model"]]
    identity = {
        name: (run if section == "run" else model).get(name)
        for name, (section, _) in declared("tokenize_data", SCHEMA).items()
        if section in ("run", "base_model")
    }
    identity["tokenizer"] = tokenizer_path(run["base_model"])
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]
    return f"{root_model(run['base_model'])}-{run['max_length']}-{digest}"


TOKENIZATION_OF_RUN = {name: tokenization(run) for name, run in RUNS.items()}
TOKENIZATIONS = {TOKENIZATION_OF_RUN[name]: run for name, run in RUNS.items()}


def reference_sections(run):
    """The config objects the reference pass of a run takes its settings from; its quantization is how training
    loads the frozen base (qlora: 4bit)."""
    quantization = "4bit" if run["method"] == "qlora" else run["quantization"]
    return {
        "run": {**run, "quantization": quantization},
        "base_model": config["base_models"][run["base_model"]],
        "eval": config["eval"],
    }


def reference(run):
    """Names the reference log-probabilities a run compares with (objectives dpo, ipo and kto; else None): its
    base model, the settings the reference pass receives, and whether it runs on a GPU. Runs that agree on
    these (a sweep over beta) share one pass over each shard."""
    if run["objective"] not in ("dpo", "ipo", "kto"):
        return None
    identity = {**share("reference_logps", SCHEMA, **reference_sections(run)), "gpu": min(run["gpus"], 1)}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]
    return f"{run['base_model']}-{digest}"


REFERENCE_OF_RUN = {name: reference(run) for name, run in RUNS.items()}
REFERENCES = {REFERENCE_OF_RUN[name]: run for name, run in RUNS.items() if REFERENCE_OF_RUN[name]}


def add_run(name, run):
    """A run resolved after the config (a search's trial, once proposed): its settings, shards and reference."""
    RUNS[name] = run
    TOKENIZATION_OF_RUN[name] = tokenization(run)
    TOKENIZATIONS.setdefault(TOKENIZATION_OF_RUN[name], run)
    REFERENCE_OF_RUN[name] = reference(run)
    if REFERENCE_OF_RUN[name]:
        REFERENCES.setdefault(REFERENCE_OF_RUN[name], run)


def reference_files(run):
    """The reference's log-probabilities of each of a run's shards; none for objectives without a reference."""
    if not REFERENCE_OF_RUN[run]:
        return []
    return [
        f"results/reference/{REFERENCE_OF_RUN[run]}/{TOKENIZATION_OF_RUN[run]}/{dataset}.arrow"
        for dataset in run_datasets(run)
    ]


def dataset_files(dataset):
    """The files a dataset is read from, as the validate job's inputs: its file; every file of a
    datasets folder (editing any of them reruns it); none for a Hub dataset, whose source_split and
    revision are settings (changing them reruns it). A missing local path stays an input, so that
    Snakemake names it before any job runs."""
    path = config["datasets"][dataset]["path"]
    if is_hub_dataset(path):
        return []
    if not os.path.isdir(path):
        return [path]
    files = []
    for folder, subfolders, names in os.walk(path):
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        files += [os.path.join(folder, name) for name in sorted(names) if not name.startswith(".")]
    return files


def run_datasets(run):
    return list(RUNS[run]["datasets"])


def shards(run):
    return [f"results/tokens/{TOKENIZATION_OF_RUN[run]}/{dataset}.arrow" for dataset in run_datasets(run)]


def token_stats(dataset):
    """The stats of every tokenization of a dataset that some run, or some pretraining, uses."""
    names = sorted({TOKENIZATION_OF_RUN[name] for name, run in RUNS.items() if dataset in run["datasets"]})
    pretrained = [model for model in config["base_models"] if pretraining(model) and corpus(model) == dataset]
    return [f"results/tokens/{name}/{dataset}.stats.json" for name in names] + [
        f"results/pretrain/{model}/corpus.stats.json" for model in pretrained
    ]


def published(run):
    """The folders a run publishes (each with its model card): its adapter, or for method full its model;
    and the merged model when it merges."""
    if RUNS[run]["method"] == "full":
        return ["model"]
    return ["adapter", "merged"] if RUNS[run]["merge"] else ["adapter"]


# The check of eval.harness's lm-evaluation-harness tasks (rules/evaluate.smk).
HARNESS_TASKS = "results/harness/tasks.json"


# The runs of the config (grids expanded); a search's trials are added to RUNS as they are proposed.
CONFIGURED_RUNS = list(RUNS)


def final_outputs():
    """What `snakemake` makes: every configured run's results, published folders and serving manifest; the
    sweep page. A search's report and its trials' results follow its rounds (rules/common.smk)."""
    outputs = [f"results/data/{dataset}.stats.json" for dataset in config["datasets"]]
    for name in CONFIGURED_RUNS:
        run = RUNS[name]
        outputs += [f"results/runs/{name}/eval.json", f"results/runs/{name}/report.html"]
        outputs += [f"results/runs/{name}/{folder}" for folder in published(name)]
        outputs += [f"results/runs/{name}/gguf"] if run["gguf"] else []
        outputs += [f"results/runs/{name}/upload.json"] if run.get("hub") else []
    outputs += [
        f"results/serve/{model}.json" for model in sorted({RUNS[name]["base_model"] for name in CONFIGURED_RUNS})
    ]
    return outputs + ["results/report/sweep.html"]
