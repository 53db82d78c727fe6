"""Write one run's report: a loss-curve plot and a self-contained HTML page that
opens with what was learned (the configured prompts: reference, base answer,
tuned answer, marked right or wrong), then exact match per task, the eval
table, the loss curve, the answers over training, the settings, and every
held-out generation.

    python scripts/report_run.py --run-name r8 --settings '{"r": 8}' \
        --metrics results/runs/r8/metrics.jsonl --summary results/runs/r8/train_summary.json \
        --eval-json results/runs/r8/eval.json --generations results/runs/r8/generations.jsonl \
        --plot results/runs/r8/loss_curve.png --html results/runs/r8/report.html
"""
import argparse
import base64
import html
import json
from pathlib import Path

import matplotlib

from manifest import summary_rows
from metrics import is_exact_match

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 4px 10px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
pre { white-space: pre-wrap; margin: 0; font-size: 0.9em; }
td.right { background: #eaf7ee; }
td.wrong { background: #fbeaea; }
"""


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_loss(metrics, path, title, summary=None):
    """Train and held-out loss over steps, with the step whose weights were kept (keep: best)
    and the step where early stopping ended the run marked."""
    summary = summary or {}
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot([m["step"] for m in metrics], [m["loss"] for m in metrics], label="train loss")
    evals = [m for m in metrics if "eval_loss" in m]
    if evals:
        ax.plot([m["step"] for m in evals], [m["eval_loss"] for m in evals], "o-", label="eval loss")
    if summary.get("best_step") is not None:
        kept = " (kept)" if summary.get("kept") == "best" else ""
        ax.axvline(summary["best_step"], color="tab:green", linestyle="--",
                   label=f"lowest eval loss{kept}: step {summary['best_step']}")
    if summary.get("stop_reason", "max_steps") != "max_steps":
        ax.axvline(summary["stopped_at_step"], color="tab:red", linestyle=":",
                   label=f"early stop: step {summary['stopped_at_step']}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss per trained token")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def table(headers, rows, row_classes=None):
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    row_classes = row_classes or [""] * len(rows)
    body = "".join(f"<tr class='{c}'>" + "".join(cell(v) for v in row) + "</tr>" for row, c in zip(rows, row_classes))
    return f"<table><tr>{head}</tr>{body}</table>"


def cell(value):
    if isinstance(value, bool):
        return f"<td>{'true' if value else 'false'}</td>"
    if isinstance(value, float):
        return f'<td class="num">{value:.4g}</td>'
    if isinstance(value, int):
        return f'<td class="num">{value:,}</td>'
    if isinstance(value, Mark):
        return f"<td class='{value.verdict}'><pre>{html.escape(value.text)}</pre></td>"
    if isinstance(value, (list, dict)):
        value = json.dumps(value)
    return f"<td><pre>{html.escape('' if value is None else str(value))}</pre></td>"


class Mark:
    """An answer shown as right or wrong against its reference (unmarked without one)."""

    def __init__(self, text, reference):
        self.verdict = "" if not reference.strip() else ("right" if is_exact_match(text, reference) else "wrong")
        self.text = {"right": "✓ ", "wrong": "✗ ", "": ""}[self.verdict] + text


def learned_table(generations):
    """The configured prompts first: reference, base answer and tuned answer, each marked right or wrong."""
    prompts = [g for g in generations if g["source"] == "prompt"]
    rows = [[g.get("question") or g["prompt"], g["reference"], Mark(g["base"], g["reference"]),
             Mark(g["tuned"], g["reference"])] for g in prompts]
    return table(["prompt", "reference", "base answer", "tuned answer"], rows) if rows else ""


def samples_table(samples):
    """Answers to the configured prompts over training: one row per sampled step."""
    if not samples:
        return "<p>No samples during training (set <code>sample_every</code> and <code>eval.prompts</code>).</p>"
    prompts = list(dict.fromkeys(s["prompt"] for s in samples))
    by_step = {}
    for sample in samples:
        by_step.setdefault(sample["step"], {})[sample["prompt"]] = sample
    headers = ["step"] + [f"prompt {i + 1}" for i in range(len(prompts))]
    rows = [[step] + [Mark(answers[p]["answer"], answers[p]["reference"]) if p in answers else "" for p in prompts]
            for step, answers in sorted(by_step.items())]
    return table(headers, rows)


def sources_table(sources):
    """The datasets the run trained on: weight, records, examples per epoch, examples trained."""
    rows = [[name, spec["weight"], spec["train_records"], spec["per_epoch"], spec["examples_trained"]]
            for name, spec in sources.items()]
    return table(["dataset", "weight", "training records", "examples per epoch", "examples trained"], rows)


def manifest_section(manifest):
    if not manifest:
        return ""
    return (table(["manifest", "value"], summary_rows(manifest))
            + "<details><summary>manifest.json (the resolved settings under <code>settings</code>)</summary>"
            + f"<pre>{html.escape(json.dumps(manifest, indent=1))}</pre></details>")


def render_html(run_name, settings, summary, evaluation, generations, samples, plot_png, manifest=None):
    base, tuned = evaluation["base"], evaluation["tuned"]
    eval_rows = [[metric, base.get(metric), tuned.get(metric)]
                 for metric in ("loss", "perplexity", "exact_match", "rouge_l", "bleu", "chrf")]
    tasks = sorted(tuned.get("exact_match_by_task", {}))
    task_rows = [[task, base["exact_match_by_task"].get(task), tuned["exact_match_by_task"][task]] for task in tasks]
    heldout = [g for g in generations if g["source"] == "heldout"]
    image = base64.b64encode(plot_png).decode()
    exact = (f"exact match base {base['exact_match']:.3f}, tuned <b>{tuned['exact_match']:.3f}</b>; "
             if tuned.get("exact_match") is not None else "")
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>Run {html.escape(run_name)}</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>Run <code>{html.escape(run_name)}</code></h1>",
        f"<p>On {evaluation['eval_records']} held-out records ({evaluation['eval_tokens']} trained tokens): {exact}"
        f"loss base {base['loss']:.4f}, tuned {tuned['loss']:.4f}.</p>",
        "<h2>What was learned</h2>", learned_table(generations),
        "<h2>Exact match per task</h2>", table(["task", "base", "tuned"], task_rows) if task_rows else "",
        "<h2>Evaluation</h2>", table(["metric", "base", "tuned"], eval_rows),
        "<h2>Loss curve</h2>", f"<img alt='loss curve' src='data:image/png;base64,{image}'>",
        "<h2>Answers over training</h2>", samples_table(samples),
        "<h2>Training</h2>", table(["setting", "value"], sorted(settings.items())),
        table(["summary", "value"], sorted((k, v) for k, v in summary.items() if not isinstance(v, dict))),
        "<h2>Data</h2>", sources_table(summary.get("sources", {})),
        "<h2>Reproducibility</h2>", manifest_section(manifest),
        f"<h2>Held-out generations</h2><details><summary>{len(heldout)} held-out records</summary>",
        table(["task", "prompt", "reference", "base", "tuned"],
              [[g.get("task"), g["prompt"], g["reference"], Mark(g["base"], g["reference"]),
                Mark(g["tuned"], g["reference"])] for g in heldout]),
        "</details></body></html>",
    ]
    return "\n".join(parts)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-name", required=True)
    parser.add_argument("--settings", type=json.loads, default={}, help="the run's settings as JSON")
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--summary", type=Path, required=True)
    parser.add_argument("--eval-json", type=Path, required=True)
    parser.add_argument("--generations", type=Path, required=True)
    parser.add_argument("--samples", type=Path, default=None, help="samples.jsonl: answers over training")
    parser.add_argument("--manifest", type=Path, default=None, help="manifest.json of the run")
    parser.add_argument("--plot", type=Path, required=True)
    parser.add_argument("--html", type=Path, required=True)
    args = parser.parse_args()
    summary = json.loads(args.summary.read_text())
    plot_loss(read_jsonl(args.metrics), args.plot, f"run {args.run_name}", summary)
    page = render_html(args.run_name, args.settings, summary,
                       json.loads(args.eval_json.read_text()), read_jsonl(args.generations),
                       read_jsonl(args.samples) if args.samples else [], args.plot.read_bytes(),
                       json.loads(args.manifest.read_text()) if args.manifest else None)
    args.html.write_text(page, encoding="utf-8")
    print(f"report written to {args.html}")


if __name__ == "__main__":
    main()
