# What the rules look up by wildcards: a run's settings, shards, base model and code,
# a dataset's source, a stage's settings file, how a training job starts and what it
# asks of the scheduler. Uses config.smk, paths.smk, code.smk and trials.smk; the rule
# files use it.
from finetune.files import read_json
from finetune.settings import stages
from finetune.training.rewards import reward_files

SETTINGS_STAGES = "|".join(stages(SCHEMA))  # the stages that read a settings file


def run_of(wildcards):
    return RUNS[wildcards.run]


def run_shards(wildcards):
    return shards(wildcards.run)


def run_base_model(wildcards):
    return base_model_path(run_of(wildcards)["base_model"])


def run_base_model_files(wildcards):
    return base_model_files(run_of(wildcards)["base_model"])


def run_reference_files(wildcards):
    return reference_files(wildcards.run)


def parent_manifest(wildcards):
    """The manifest of the run a chained run starts from (none for a run on a configured base model)."""
    parent = trained_by(run_of(wildcards)["base_model"])
    return [f"results/runs/{parent}/manifest.json"] if parent else []


def run_root_model(wildcards):
    """A chained run's root base model (what its evaluation scores preferences against too); none otherwise."""
    model = run_of(wildcards)["base_model"]
    return [base_model_path(root_model(model))] if trained_by(model) else []


def run_root_model_files(wildcards):
    model = run_of(wildcards)["base_model"]
    return base_model_files(root_model(model)) if trained_by(model) else []


def reference_model(wildcards):
    return base_model_path(REFERENCES[wildcards.reference]["base_model"])


def reference_model_files(wildcards):
    return base_model_files(REFERENCES[wildcards.reference]["base_model"])


def reference_gpus(wildcards):
    return min(REFERENCES[wildcards.reference]["gpus"], 1)


def normalized_records(wildcards):
    return [f"results/data/{dataset}.jsonl" for dataset in run_datasets(wildcards.run)]


def run_stats(wildcards):
    return [f"results/data/{dataset}.stats.json" for dataset in run_datasets(wildcards.run)]


def uploaded_folder(wildcards):
    return f"results/runs/{wildcards.run}/{run_of(wildcards)['hub']['what']}"


def dataset_source(wildcards):
    return config["datasets"][wildcards.dataset]["path"]


def dataset_source_files(wildcards):
    return dataset_files(wildcards.dataset)


def tokenizer_files(wildcards):
    return base_model_files(TOKENIZATIONS[wildcards.tokenization]["base_model"], tokenizer_only=True)


def tokenizer_of(wildcards):
    return tokenizer_path(TOKENIZATIONS[wildcards.tokenization]["base_model"])


def tokenization_stats(wildcards):
    return token_stats(wildcards.dataset)


def corpus_records(wildcards):
    return f"results/data/{corpus(wildcards.model)}.jsonl"


def corpus_source(wildcards):
    return config["datasets"][corpus(wildcards.model)]["path"]


def samples(run):
    """Whether a run answers the eval prompts during training."""
    return bool(run.get("sample_every") and config["eval"]["prompts"])


def training_code(wildcards):
    """train.py's code; the code that answers prompts during training only for runs that do, and the
    preference objectives and GRPO only for runs that optimize one."""
    run = run_of(wildcards)
    leave_out = (() if samples(run) else SAMPLING) + (PREFERENCE if run["objective"] in ("sft", "grpo") else ())
    leave_out += () if pruned_trial(wildcards.run) else PRUNING
    return code_of("train", leave_out=leave_out + (() if run["objective"] == "grpo" else GRPO))


def run_records(wildcards):
    """A grpo run's validated records (its prompts and their answers); none for other objectives."""
    return normalized_records(wildcards) if run_of(wildcards)["objective"] == "grpo" else []


def run_reward_files(wildcards):
    """The project files whose functions a grpo run's rewards name: editing one reruns the run."""
    run = run_of(wildcards)
    return reward_files(run["rewards"]) if run["objective"] == "grpo" else []


def evaluation_code(wildcards):
    """evaluate.py's code; the code that scores held-out pairs only for runs with a preference objective, and
    lm-evaluation-harness's (with the workflow's own tasks) only when eval.harness is set."""
    sft, harness = run_of(wildcards)["objective"] == "sft", bool(config["eval"].get("harness"))
    leave_out = (("finetune.evaluation.preference",) if sft else ()) + (() if harness else HARNESS)
    return code_of("evaluate", leave_out=leave_out) + harness_task_files()


def harness_task_files():
    """The workflow's own lm-evaluation-harness tasks (YAML and Python), when eval.harness is set."""
    if not config["eval"].get("harness"):
        return []
    folder = SOURCE_DIR / "finetune" / "evaluation" / "harness_tasks"
    return sorted(os.path.relpath(path) for path in folder.iterdir() if path.suffix in (".yaml", ".py"))


def harness_check(wildcards):
    """The check of eval.harness's tasks (resolved, data here), when it is set: an input of every evaluation."""
    return [HARNESS_TASKS] if config["eval"].get("harness") else []


def launcher(gpus, nodes=1):
    """How the training script starts: one process per GPU (python, or accelerate for several;
    finetune/launch.py); a run over several nodes starts one launcher per node (srun)."""
    command = f"python -m finetune.launch --processes {gpus} --nodes {nodes} --"
    return f"srun --nodes {nodes} --ntasks-per-node 1 --kill-on-bad-exit=1 {command}" if nodes > 1 else command


def training_resources(name):
    """A training job's resource `name`. On one node: `gpu` GPUs (bounded by --resources gpu=N).
    Over several nodes (SLURM): that many nodes with `gpus` each (gres is per node), one task
    per node, and the job's own srun (the mpi resource) instead of the executor's."""

    def resource(wildcards):
        run = run_of(wildcards)
        if run["nodes"] == 1:
            return {"gpu": run["gpus"]}.get(name)
        several = {"nodes": run["nodes"], "gres": f"gpu:{run['gpus']}", "tasks": run["nodes"], "tasks_per_gpu": 0}
        return {**several, "mpi": "srun"}.get(name)

    return resource


def pretraining_gpus(wildcards):
    return pretraining(wildcards.model)["gpus"]


def evaluation_gpus(wildcards):
    return min(run_of(wildcards)["gpus"], 1)


def reported(path, category, caption, figure, per_run=False, per=None):
    """An output shown in `snakemake --report`, under its category (and its run, or the wildcard `per` names),
    with its caption."""
    per = "run" if per_run else per
    labels = {per: f"{{{per}}}", "figure": figure} if per else {"figure": figure}
    subcategory = f"{{{per}}}" if per else None
    return report(path, category=category, subcategory=subcategory, caption=f"captions/{caption}.rst", labels=labels)


def run_sections(run):
    """The config objects a run's stages take their settings from."""
    return {
        "run": run,
        "hub": run.get("hub") or {},
        "base_model": config["base_models"][run["base_model"]],
        "eval": config["eval"],
        "model_card": config["model_card"],
    }


def settings_sections(subject):
    """The config objects of a settings folder: runs/{run}, pretrain/{model}, data/{dataset},
    tokens/{tokenization}/{dataset}, reference/{reference} or report."""
    kind, _, name = subject.partition("/")
    if kind == "runs":
        return run_sections(RUNS[name])
    if kind == "pretrain":  # a built model: its build, and its pretraining run (defaults when it has none)
        model = config["base_models"][name]
        return {
            **run_sections(pretraining(name) or {"method": "full", "base_model": name}),
            "build_tiny": model["build_tiny"],
            "dataset": config["datasets"][corpus(name)],
        }
    if kind == "data":
        return {"dataset": config["datasets"][name]}
    if kind == "reference":
        return reference_sections(REFERENCES[name])
    if kind == "harness":
        return {"eval": config["eval"]}
    if kind == "search":
        return {"search": SEARCHES[name]}
    if kind == "tokens":
        tokenization, dataset = name.split("/")
        return {**run_sections(TOKENIZATIONS[tokenization]), "dataset": config["datasets"][dataset]}
    return {"config": config}


def settings_text(subject, stage):
    """A stage's share of the settings, as the text of its settings file. Training takes the eval
    section's settings only to answer prompts during training: a run that does not (pretraining
    never does) gets their defaults, so that editing them does not retrain it."""
    sections = settings_sections(subject)
    if stage == "train" and not samples(sections["run"]):
        sections["eval"] = {}
    return json.dumps(share(stage, SCHEMA, **sections), indent=1)


def stage_settings(wildcards):
    return settings_text(wildcards.subject, wildcards.stage)


def run_settings_text(wildcards):
    """A run's resolved settings, in the config's order (the order of its datasets is that of its shards); a
    chained run's base model as configured ({run: NAME}), so that the settings train it again under runs:."""
    run = run_of(wildcards)
    parent = trained_by(run["base_model"])
    return json.dumps({**run, "base_model": {"run": parent}} if parent else run, indent=1)


def print_exact_match(evaluation):
    """What a finished workflow prints last: each run's held-out exact match, overall and per task,
    beside its base model's (the full tables are in the reports). evaluation: eval.json's path pattern."""
    lines, records = [], set()
    for name in CONFIGURED_RUNS:
        path = evaluation.format(run=name)
        if not os.path.exists(path):
            continue
        with open(path) as f:
            result = json.load(f)
        tuned, base = result["tuned"], result["base"]
        if tuned.get("exact_match") is None:
            continue
        records.add(result["eval_records"])
        tasks = ", ".join(f"{task} {value:.2f}" for task, value in tuned.get("exact_match_by_task", {}).items())
        lines.append(
            f"  {name}: {tuned['exact_match']:.3f} (base {base['exact_match']:.3f})"
            + (f"; per task: {tasks}" if tasks else "")
        )
    if lines:
        sizes = "/".join(map(str, sorted(records)))
        print(f"Held-out exact match ({sizes} records; results/report/sweep.html has the tables):", *lines, sep="\n")
    for search in SEARCHES:
        told = last_told_file(search)
        best = read_json(told)["best"] if os.path.exists(told) else None
        if best:
            metric = SEARCHES[search]["objective"]["metric"]
            print(
                f"Search {search}: best {best['run']}, {metric} {best['value']:.4g}, with {best['params']} "
                f"(results/search/{search}/report.html)"
            )


def runs_on(model):
    return [name for name in CONFIGURED_RUNS if RUNS[name]["base_model"] == model]


def served_trained(wildcards):
    return [f"results/runs/{name}/trained" for name in runs_on(wildcards.model)]


def serving_manifest(wildcards):
    """What scripts/serve.py loads: the base model and every run trained on it (paths relative to the project)."""
    model = config["base_models"][wildcards.model]
    runs = [
        {"name": name, "method": RUNS[name]["method"], "trained": f"results/runs/{name}/trained"}
        for name in runs_on(wildcards.model)
    ]
    manifest = {
        "name": wildcards.model,
        "path": base_model_path(wildcards.model),
        "template": model.get("template", "auto"),
        "trust_remote_code": model.get("trust_remote_code", False),
        "runs": runs,
    }
    return json.dumps(manifest, indent=1)


VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def vllm_command(wildcards):
    """The equivalent vLLM commands: the base with every plain LoRA adapter (qlora's too) as --lora-modules;
    vLLM loads neither DoRA nor AdaLoRA adapters, so those runs are served from their merged weights, and a
    full fine-tune as a model of its own."""
    model = wildcards.model
    adapters = [n for n in runs_on(model) if RUNS[n]["method"] in ("lora", "qlora")]
    others = [n for n in runs_on(model) if n not in adapters]
    lines = ["#!/bin/sh", f"# vLLM serving base model {model} and the runs trained on it (GPU machines).", "set -e"]
    command = f"vllm serve {base_model_path(model)} --served-model-name {model}"
    if adapters:
        rank = max(max(RUNS[n]["r"] for n in adapters), 1)
        rank = next((allowed for allowed in VLLM_LORA_RANKS if allowed >= rank), rank)
        modules = " ".join(f"{n}=results/runs/{n}/trained" for n in adapters)
        command += f" --enable-lora --max-lora-rank {rank} --max-loras {len(adapters)} --lora-modules {modules}"
    lines.append(f'{command} --host 127.0.0.1 --port "${{PORT:-8000}}"')
    for port, name in enumerate(others, start=1):
        weights = "trained" if RUNS[name]["method"] == "full" else "merged_weights"
        note = "" if RUNS[name]["method"] == "full" or RUNS[name]["merge"] else "  # needs merge: true"
        lines.append(
            f"# {name} ({RUNS[name]['method']}): a server of its own\n# vllm serve results/runs/{name}/{weights}"
            f' --served-model-name {name} --host 127.0.0.1 --port "$((${{PORT:-8000}} + {port}))"{note}'
        )
    return "\n".join(lines)
