"""Write one run's report: a loss-curve plot and a self-contained HTML page with
the run's settings, base-vs-tuned eval table, and generations beside their
references.

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

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 4px 10px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
pre { white-space: pre-wrap; margin: 0; font-size: 0.9em; }
.better { color: #0a7a2f; font-weight: bold; }
"""


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_loss(metrics, path, title):
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot([m["step"] for m in metrics], [m["loss"] for m in metrics], label="train loss")
    evals = [m for m in metrics if "eval_loss" in m]
    if evals:
        ax.plot([m["step"] for m in evals], [m["eval_loss"] for m in evals], "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss per trained token")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def table(headers, rows):
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def cell(value):
    if isinstance(value, float):
        return f'<td class="num">{value:.4g}</td>'
    if isinstance(value, int):
        return f'<td class="num">{value:,}</td>'
    return f"<td><pre>{html.escape('' if value is None else str(value))}</pre></td>"


def render_html(run_name, settings, summary, evaluation, generations, plot_png):
    base, tuned = evaluation["base"], evaluation["tuned"]
    verdict = "better" if tuned["loss"] < base["loss"] else "not better"
    eval_rows = [[metric, base.get(metric), tuned.get(metric)]
                 for metric in ("loss", "perplexity", "exact_match", "rouge_l", "bleu", "chrf")]
    image = base64.b64encode(plot_png).decode()
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>Run {html.escape(run_name)}</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>Run <code>{html.escape(run_name)}</code></h1>",
        f"<p>Held-out loss: base {base['loss']:.4f}, tuned {tuned['loss']:.4f} &mdash; "
        f"<span class='{'better' if verdict == 'better' else ''}'>tuned is {verdict}</span> "
        f"on {evaluation['eval_records']} held-out records ({evaluation['eval_tokens']} trained tokens).</p>",
        "<h2>Evaluation</h2>", table(["metric", "base", "tuned"], eval_rows),
        "<h2>Loss curve</h2>", f"<img alt='loss curve' src='data:image/png;base64,{image}'>",
        "<h2>Training</h2>", table(["setting", "value"], sorted(settings.items())),
        table(["summary", "value"], sorted(summary.items())),
        "<h2>Generations</h2>",
        table(["source", "prompt", "reference", "base", "tuned"],
              [[g["source"], g["prompt"], g["reference"], g["base"], g["tuned"]] for g in generations]),
        "</body></html>",
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
    parser.add_argument("--plot", type=Path, required=True)
    parser.add_argument("--html", type=Path, required=True)
    args = parser.parse_args()
    plot_loss(read_jsonl(args.metrics), args.plot, f"run {args.run_name}")
    page = render_html(args.run_name, args.settings, json.loads(args.summary.read_text()),
                       json.loads(args.eval_json.read_text()), read_jsonl(args.generations), args.plot.read_bytes())
    args.html.write_text(page, encoding="utf-8")
    print(f"report written to {args.html}")


if __name__ == "__main__":
    main()
