"""Write one run's report: a loss-curve plot and a self-contained HTML page that
opens with what was learned (the configured prompts: reference, base answer,
tuned answer, marked right or wrong), then exact match per task, the eval
table, the loss curve, the answers over training, the settings, and every
held-out generation.

    python scripts/report_run.py --run-name r8 --manifest results/runs/r8/manifest.json \
        --metrics results/runs/r8/metrics.jsonl --summary results/runs/r8/train_summary.json \
        --eval-json results/runs/r8/eval.json --generations results/runs/r8/generations.jsonl \
        --samples results/runs/r8/samples.jsonl --plot results/runs/r8/loss_curve.png --html results/runs/r8/report.html
"""
import argparse
import html
import json
from pathlib import Path

import matplotlib

from finetune.evaluation.metrics import PREFERENCE_METRICS, is_exact_match
from finetune.export.manifest import describe_link, summary_rows
from finetune.files import read_json, read_jsonl
from finetune.reports.html import Mark, image, page, table

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

def plot_loss(metrics, path, title, summary=None):
    """Train and held-out loss over steps, with the step whose weights were kept (keep: best)
    and the step where early stopping ended the run marked; for grpo, the reward over steps beside it."""
    summary = summary or {}
    rewarded = any("reward" in m for m in metrics)
    fig, axes = plt.subplots(1, 2 if rewarded else 1, figsize=(12 if rewarded else 7, 4), dpi=100, squeeze=False)
    ax = axes[0][0]
    if rewarded:
        plot_reward(axes[0][1], metrics)
    ax.plot([m["step"] for m in metrics], [m["loss"] for m in metrics], label="train loss")
    evals = [m for m in metrics if "eval_loss" in m]
    if evals:
        ax.plot([m["step"] for m in evals], [m["eval_loss"] for m in evals], "o-", label="eval loss")
    if summary.get("best_step") is not None:
        kept = " (kept)" if summary.get("kept") == "best" else ""
        best = "highest held-out reward" if rewarded else "lowest eval loss"
        ax.axvline(summary["best_step"], color="tab:green", linestyle="--",
                   label=f"{best}{kept}: step {summary['best_step']}")
    if summary.get("stop_reason", "max_steps") != "max_steps" and summary.get("stopped_at_step") is not None:
        why = "pruned" if summary["stop_reason"].startswith("pruned") else "early stop"
        ax.axvline(summary["stopped_at_step"], color="tab:red", linestyle=":",
                   label=f"{why}: step {summary['stopped_at_step']}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("policy loss" if rewarded else "loss per trained token")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_reward(ax, metrics):
    """grpo: the mean reward of the sampled completions (with its std), and of the held-out greedy ones."""
    rows = [m for m in metrics if "reward" in m]
    steps, means = [m["step"] for m in rows], [m["reward"] for m in rows]
    spread = [m.get("reward_std", 0.0) for m in rows]
    ax.plot(steps, means, label="reward of sampled completions")
    ax.fill_between(steps, [a - b for a, b in zip(means, spread)], [a + b for a, b in zip(means, spread)], alpha=0.2)
    evals = [m for m in metrics if "eval_reward" in m]
    if evals:
        ax.plot([m["step"] for m in evals], [m["eval_reward"] for m in evals], "o-", label="held-out reward (greedy)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("reward")
    ax.set_title("reward")
    ax.grid(alpha=0.3)
    ax.legend()


def marked(text, reference):
    """An answer marked right or wrong against its reference (unmarked without one)."""
    return Mark(text, "" if not reference.strip() else ("right" if is_exact_match(text, reference) else "wrong"))


def learned_table(generations):
    """The configured prompts first: reference, base answer and tuned answer, each marked right or wrong."""
    prompts = [g for g in generations if g["source"] == "prompt"]
    rows = [[g.get("question") or g["prompt"], g["reference"], marked(g["base"], g["reference"]),
             marked(g["tuned"], g["reference"])] for g in prompts]
    return table(["prompt", "reference", "base answer", "tuned answer"], rows) if rows else ""


def rollouts_table(samples):
    """grpo: a group of sampled completions at several steps, each with its reward (and each reward's score)."""
    rollouts = [s for s in samples if s.get("kind") == "rollout"]
    if not rollouts:
        return ""
    rows = [[s["step"], s["prompt"], s["reference"], marked(s["answer"], s["reference"]), s["reward"],
             ", ".join(f"{name} {value:.3g}" for name, value in s["scores"].items())] for s in rollouts]
    return ("<h2>Sampled completions and their rewards</h2>"
            + table(["step", "prompt", "reference", "completion", "reward", "scores"], rows))


def samples_table(samples):
    """Answers to the configured prompts over training: one row per sampled step."""
    samples = [s for s in samples if s.get("kind") != "rollout"]
    if not samples:
        return "<p>No samples during training (set <code>sample_every</code> and <code>eval.prompts</code>).</p>"
    prompts = list(dict.fromkeys(s["prompt"] for s in samples))
    by_step = {}
    for sample in samples:
        by_step.setdefault(sample["step"], {})[sample["prompt"]] = sample
    headers = ["step"] + [f"prompt {i + 1}" for i in range(len(prompts))]
    rows = [[step] + [marked(answers[p]["answer"], answers[p]["reference"]) if p in answers else "" for p in prompts]
            for step, answers in sorted(by_step.items())]
    return table(headers, rows)


def sources_table(sources):
    """The datasets the run trained on: weight, records, examples per epoch, examples trained."""
    rows = [[name, spec["weight"], spec["train_records"], spec["per_epoch"], spec["examples_trained"]]
            for name, spec in sources.items()]
    return table(["dataset", "weight", "training records", "examples per epoch", "examples trained"], rows)


def manifest_section(manifest):
    return (table(["manifest", "value"], summary_rows(manifest))
            + "<details><summary>manifest.json (the resolved settings under <code>settings</code>)</summary>"
            + f"<pre>{html.escape(json.dumps(manifest, indent=1))}</pre></details>")


def objective_line(settings, chain):
    """What the run optimized, and from which model (the base: the run before it, for a chained run)."""
    objective = settings.get("objective", "sft")
    what = {"sft": "supervised fine-tuning"}.get(objective, f"preference tuning ({objective}, beta "
                                                             f"{settings.get('beta')})")
    if objective == "grpo":
        rewards = ", ".join(r if isinstance(r, str) else f"{r['reward']} x {r.get('weight', 1)}"
                            for r in settings.get("rewards", []))
        what = (f"reinforcement learning (grpo, rewards {rewards}; {settings.get('num_generations')} completions "
                f"per prompt, loss {settings.get('loss_type')}, beta {settings.get('beta')})")
    start = f"trained after {chain}" if chain else f"from base model {settings.get('base_model')}"
    return f"Objective: {what}, method {settings.get('method')}, {start}."


def harness_section(harness):
    """lm-evaluation-harness's figures (eval.harness): each task's metrics, base beside tuned."""
    if not harness:
        return ""
    rows = [[task, metric, harness["base"].get(task, {}).get(metric), value]
            for task, values in harness["tuned"].items() for metric, value in values.items()]
    limit = f", at most {harness['limit']} records per task" if harness["limit"] else ""
    return (f"<h2>Standard benchmarks (lm-evaluation-harness {html.escape(harness['lm_eval'])})</h2>"
            f"<p>{harness['num_fewshot']}-shot{limit}; records: "
            f"{html.escape(', '.join(f'{task} {n}' for task, n in harness['samples'].items()))}.</p>"
            + table(["task", "metric", "base", "tuned"], rows))


def render_html(run_name, summary, evaluation, generations, samples, plot_png, manifest):
    base, tuned = evaluation["base"], evaluation["tuned"]
    eval_rows = [[metric, base.get(metric), tuned.get(metric)]
                 for metric in ("loss", "perplexity", "exact_match", "rouge_l", "bleu", "chrf", *PREFERENCE_METRICS)
                 if metric in tuned]
    preference = evaluation.get("preference")
    if preference:
        eval_rows += [[name.replace("_", " "), None, preference[name]]
                      for name in ("reward_accuracy_vs_base", "reward_margin_vs_base") if name in preference]
    tasks = sorted(tuned.get("exact_match_by_task", {}))
    task_rows = [[task, base["exact_match_by_task"].get(task), tuned["exact_match_by_task"][task],
                  *[side.get("preference_accuracy_by_task", {}).get(task) for side in (base, tuned)]] for task in tasks]
    task_headers = ["task", "exact match base", "exact match tuned"]
    task_headers += ["preference accuracy base", "preference accuracy tuned"] if "preference_accuracy" in tuned else []
    heldout = [g for g in generations if g["source"] == "heldout"]
    exact = (f"exact match base {base['exact_match']:.3f}, tuned <b>{tuned['exact_match']:.3f}</b>; "
             if tuned.get("exact_match") is not None else "")
    if "preference_accuracy" in tuned:
        exact += (f"preference accuracy base {base['preference_accuracy']:.3f}, tuned "
                  f"<b>{tuned['preference_accuracy']:.3f}</b> on {preference['pairs']} held-out pairs; ")
    chain = " -> ".join(describe_link(link) for link in manifest.get("chain", []))
    return page(f"Run {run_name}", [
        f"<h1>Run <code>{html.escape(run_name)}</code></h1>",
        f"<p>{html.escape(objective_line(manifest['settings'], chain))}</p>",
        f"<p>On {evaluation['eval_records']} held-out records ({evaluation['eval_tokens']} trained tokens): {exact}"
        f"loss base {base['loss']:.4f}, tuned {tuned['loss']:.4f}.</p>",
        "<h2>What was learned</h2>", learned_table(generations),
        f"<h2>{'Exact match and preference accuracy' if len(task_headers) > 3 else 'Exact match'} per task</h2>",
        table(task_headers, [row[:len(task_headers)] for row in task_rows]) if task_rows else "",
        "<h2>Evaluation</h2>", table(["metric", "base", "tuned"], eval_rows),
        harness_section(evaluation.get("harness")),
        f"<h2>Loss {'and reward ' if manifest['settings'].get('objective') == 'grpo' else ''}curve</h2>",
        image("loss curve", plot_png),
        "<h2>Answers over training</h2>", samples_table(samples), rollouts_table(samples),
        "<h2>Training</h2>", table(["setting", "value"], sorted(manifest["settings"].items())),
        table(["summary", "value"], sorted((k, v) for k, v in summary.items() if not isinstance(v, dict))),
        "<h2>Data</h2>", sources_table(summary.get("sources", {})),
        "<h2>Reproducibility</h2>", manifest_section(manifest),
        f"<h2>Held-out generations</h2><details><summary>{len(heldout)} held-out records</summary>",
        table(["task", "prompt", "reference", "base", "tuned"],
              [[g.get("task"), g["prompt"], g["reference"], marked(g["base"], g["reference"]),
                marked(g["tuned"], g["reference"])] for g in heldout]),
        "</details>",
    ])


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-name", required=True)
    parser.add_argument("--manifest", type=Path, required=True, help="manifest.json of the run (with its settings)")
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--summary", type=Path, required=True)
    parser.add_argument("--eval-json", type=Path, required=True)
    parser.add_argument("--generations", type=Path, required=True)
    parser.add_argument("--samples", type=Path, required=True, help="samples.jsonl: answers over training")
    parser.add_argument("--plot", type=Path, required=True)
    parser.add_argument("--html", type=Path, required=True)
    return parser.parse_args(argv)


def failed_page(run_name, failure, plot_png, manifest):
    """The page of a search trial whose training failed: the error, its settings, what it logged before."""
    return page(f"Run {run_name}", [
        f"<h1>Run <code>{html.escape(run_name)}</code>: training failed</h1>",
        f"<p>{html.escape(failure.get('error') or '')} (exit code {failure.get('exit_code')}). The search told its "
        "study the trial failed and went on; the job's log is under results/logs/train/.</p>",
        "<h2>Loss curve (until it failed)</h2>", image("loss curve", plot_png),
        "<h2>Settings</h2>", table(["setting", "value"], sorted(manifest.get("settings", {}).items())),
    ])


def main(argv=None):
    args = parse_args(argv)
    summary = read_json(args.summary)
    plot_loss(list(read_jsonl(args.metrics)), args.plot, f"run {args.run_name}", summary)
    evaluation = read_json(args.eval_json)
    if evaluation.get("failed"):
        failed = failed_page(args.run_name, evaluation["failed"], args.plot.read_bytes(), read_json(args.manifest))
        args.html.write_text(failed, encoding="utf-8")
        print(f"report of the failed run written to {args.html}")
        return
    html_page = render_html(args.run_name, summary, read_json(args.eval_json), list(read_jsonl(args.generations)),
                            list(read_jsonl(args.samples)), args.plot.read_bytes(), read_json(args.manifest))
    args.html.write_text(html_page, encoding="utf-8")
    print(f"report written to {args.html}")


if __name__ == "__main__":
    main()
