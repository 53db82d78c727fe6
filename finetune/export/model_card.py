"""A model card (README.md with YAML metadata) for an adapter, merged or fully fine-tuned
model folder, from the run's own files: its settings (in its manifest), training summary,
evaluation and dataset stats."""
from pathlib import Path

import yaml

from finetune.evaluation.metrics import PREFERENCE_METRICS
from finetune.export.manifest import summary_rows
from finetune.settings import declared


def training_settings(settings):
    """The run's settings that shape what was learned: those tokenization and training receive."""
    received = {**declared("tokenize_data"), **declared("train")}
    objective = settings.get("objective", "sft")
    # The settings of other objectives change nothing (grpo's beta is its KL weight).
    ignored = (() if objective not in ("sft", "grpo") else PREFERENCE_SETTINGS[objective == "grpo":]) \
        + (() if objective == "grpo" else GRPO_SETTINGS)
    received = {name: spec for name, spec in received.items() if name not in ignored}
    return [(name, settings[name]) for name, (section, _) in received.items() if section == "run" and name in settings]


PREFERENCE_SETTINGS = ("beta", "simpo_gamma", "orpo_lambda", "desirable_weight", "undesirable_weight", "sft_weight")
GRPO_SETTINGS = ("rewards", "num_generations", "max_completion_length", "sampling_temperature", "sampling_top_p",
                 "iterations", "epsilon", "epsilon_high", "loss_type", "scale_rewards", "dynamic_sampling",
                 "reward_eval_prompts")


# What the folder holds, by kind: the adapter; the adapter merged into its base; a fully fine-tuned model.
DESCRIPTIONS = {"adapter": "{method} adapter", "merged": "model with the {method} adapter merged into its base weights",
                "model": "fully fine-tuned model (every parameter trained)"}


def metadata(kind, base_model, settings, datasets, license_id):
    method = settings.get("method", "lora")
    tags = [method] + (["lora", "peft"] if method != "full" else []) + ["snakemake"]
    meta = {
        "base_model": base_model,
        "library_name": "peft" if kind == "adapter" else "transformers",
        "pipeline_tag": "text-generation",
        "tags": list(dict.fromkeys(tags + (["merged"] if kind == "merged" else []))),
        "datasets": datasets,
    }
    if license_id:
        meta["license"] = license_id
    return meta


def usage(kind, base_model, repo_hint, summary):
    remote = ", trust_remote_code=True" if summary.get("trust_remote_code") else ""
    if kind == "adapter":
        # A pad token added to a tokenizer that had none needs its row in the base's embeddings.
        grow = "base.resize_token_embeddings(len(tokenizer))\n" if summary.get("added_pad_token") else ""
        return (f"from peft import PeftModel\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                f"tokenizer = AutoTokenizer.from_pretrained({repo_hint!r}{remote})\n"
                f"base = AutoModelForCausalLM.from_pretrained({base_model!r}{remote})\n{grow}"
                f"model = PeftModel.from_pretrained(base, {repo_hint!r})")
    return (f"from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f"model = AutoModelForCausalLM.from_pretrained({repo_hint!r}{remote})\n"
            f"tokenizer = AutoTokenizer.from_pretrained({repo_hint!r}{remote})")


def number(value):
    return f"{value:.4g}" if isinstance(value, float) else ("–" if value is None else str(value))


def setting(value):
    """A setting as the config spells it: true/false, lists comma-separated."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return ", ".join(map(str, value)) if isinstance(value, list) else str(value)


def gguf_section(run_name, types):
    """The GGUF files written from this model (results/runs/{run}/gguf), for llama.cpp and Ollama."""
    files = ", ".join(f"`{run_name}-{kind}.gguf`" for kind in types)
    return ["## GGUF\n", f"This model is also written as GGUF for llama.cpp and Ollama: {files}, with an Ollama "
            f"`Modelfile` (FROM `{run_name}-{types[0]}.gguf`), in the run's `gguf` folder.\n",
            "```bash", f"llama-cli -m {run_name}-{types[0]}.gguf -p 'Hello'",
            f"ollama create {run_name} -f Modelfile && ollama run {run_name}", "```", ""]


def harness_lines(harness):
    """lm-evaluation-harness's figures (eval.harness), base beside fine-tuned."""
    if not harness:
        return []
    limit = f", at most {harness['limit']} records per task" if harness["limit"] else ""
    lines = ["", f"Standard benchmarks (lm-evaluation-harness {harness['lm_eval']}, {harness['num_fewshot']}-shot"
             f"{limit}):\n", "| task | metric | base model | fine-tuned |", "|---|---|---|---|"]
    return lines + [f"| {task} | {metric} | {number(harness['base'].get(task, {}).get(metric))} | {number(value)} |"
                    for task, values in harness["tuned"].items() for metric, value in values.items()]


def render(kind, run_name, base_model, settings, summary, evaluation, stats, license_id=None, repo_hint=".",
           manifest=None):
    datasets = [Path(s["file"]).stem for s in stats]
    front = yaml.safe_dump(metadata(kind, base_model, settings, datasets, license_id), sort_keys=False).strip()
    what = DESCRIPTIONS[kind].format(method=settings.get("method", "lora"))
    lines = [
        f"---\n{front}\n---\n",
        f"# {run_name}\n",
        f"A {what}, fine-tuned from `{base_model}` by the run `{run_name}` of a Snakemake fine-tuning workflow.\n",
        "## Evaluation\n",
        f"On {evaluation['eval_records']} held-out records ({evaluation['eval_tokens']} answer tokens):\n",
        "| metric | base model | fine-tuned |", "|---|---|---|",
    ]
    for metric in ("loss", "perplexity", "exact_match", "rouge_l", "bleu", "chrf", *PREFERENCE_METRICS):
        if metric in evaluation["tuned"]:
            lines.append(f"| {metric} | {number(evaluation['base'].get(metric))} | "
                         f"{number(evaluation['tuned'].get(metric))} |")
    for key in ("exact_match", "preference_accuracy"):
        for task, tuned in evaluation["tuned"].get(f"{key}_by_task", {}).items():
            lines.append(f"| {key}: {task} | {number(evaluation['base'][f'{key}_by_task'].get(task))} | "
                         f"{number(tuned)} |")
    preference = evaluation.get("preference")
    if preference:
        lines.append(f"| reward_accuracy_vs_base (the fine-tuned model's log-probability ratio to the base model "
                     f"favors the chosen answer) | | {number(preference['reward_accuracy_vs_base'])} |")
    lines += harness_lines(evaluation.get("harness"))
    lines += ["", "## Training\n", "| setting | value |", "|---|---|"]
    lines += [f"| {key} | {setting(value)} |" for key, value in training_settings(settings)]
    lines += [f"| trainable parameters | {summary['trainable_parameters']:,} of {summary['total_parameters']:,} |",
              f"| optimizer steps | {summary['steps']} |",
              f"| trust_remote_code | {setting(summary.get('trust_remote_code', False))} |",
              f"| wall time | {summary['wall_time_s']:.1f} s on {summary['processes']} process(es) |", ""]
    lines += ["## Data\n", "| dataset | records | rejected | duplicates |", "|---|---|---|---|"]
    lines += [f"| {Path(s['file']).name} | {s['records']} | {s['rejected']} | {s['duplicates']} |" for s in stats]
    lines += ["", "## Usage\n", "```python", usage(kind, base_model, repo_hint, summary), "```", ""]
    if kind != "adapter" and settings.get("gguf"):
        lines += gguf_section(run_name, settings["gguf"])
    if manifest:
        lines += ["## Reproducibility\n", "`manifest.json` beside this card has the full record: the resolved settings "
                  "(paste them under `runs:` to train this run again), library versions, device and content hashes.\n",
                  "| what | value |", "|---|---|"]
        lines += [f"| {what} | {value} |" for what, value in summary_rows(manifest)] + [""]
    return "\n".join(lines)
