"""Compare every run of the sweep: a sortable CSV and an HTML table with one row
per run (settings, cost, losses, task metrics), exact match per task kind, the
loss curves of all runs on one chart, eval loss against trainable parameters,
and, for each grid of the config's `sweeps`, the held-out loss and exact match
against each swept setting; with `search:`, each search's best trial and a link to its
report (its trials are among the runs). The best run is the one with the highest held-out exact match.

    python scripts/report_sweep.py --settings results/report/settings/report_sweep.json \
        --runs r8 r16 --run-settings results/runs/{r8,r16}/settings.json \
        --summaries results/runs/{r8,r16}/train_summary.json --evaluations results/runs/{r8,r16}/eval.json \
        --metrics results/runs/{r8,r16}/metrics.jsonl --csv results/report/sweep.csv \
        --html results/report/sweep.html --loss-plot results/report/loss_curves.png \
        --params-plot results/report/eval_loss_vs_parameters.png --swept-plot results/report/metrics_vs_swept.png
"""
import argparse
import csv
import html
import json
import os
from pathlib import Path

import matplotlib

from finetune.files import read_json, read_jsonl
from finetune.reports.html import image, page, table
from finetune.settings import read_settings
from finetune.sweeps import grid_runs

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HEADERS = {"target_modules": "target modules", "trainable_parameters": "trainable params", "wall_time_s": "wall s",
           "tokens_per_s": "tokens/s", "peak_memory_mb": "peak MiB", "final_train_loss": "final train loss",
           "base_eval_loss": "base eval loss", "eval_loss": "eval loss", "exact_match": "exact match",
           "rouge_l": "ROUGE-L", "bleu": "BLEU", "chrf": "chrF", "preference_accuracy": "preference accuracy",
           "base_preference_accuracy": "base preference accuracy", "reward_accuracy": "reward accuracy",
           "base_reward_accuracy": "base reward accuracy"}
COLUMNS = ["run", "objective", "method", "r", "alpha", "target_modules", "trainable_parameters", "wall_time_s",
           "tokens_per_s", "peak_memory_mb", "final_train_loss", "base_eval_loss", "eval_loss", "perplexity",
           "exact_match", "rouge_l", "bleu", "chrf", "base_preference_accuracy", "preference_accuracy",
           "base_reward_accuracy", "reward_accuracy"]
TASK_PREFIX = "exact_match:"  # one more column per task kind: its held-out exact match
HARNESS_PREFIX = "harness:"  # one more column per lm-evaluation-harness task and metric (eval.harness)
STYLE = """
th, td { padding: 4px 6px; }
td { white-space: nowrap; }
td.wrap { white-space: normal; min-width: 6em; }
.scroll { overflow-x: auto; }
th { cursor: pointer; user-select: none; vertical-align: bottom; font-weight: 600; }
tr.best td { background: #eaf7ee; }
"""


def run_row(name, settings, summary, evaluation, metrics):
    """One run's row of the sweep table."""
    tuned = evaluation["tuned"]
    adapter = settings.get("method") != "full"  # rank, alpha and targets mean nothing to a full fine-tune
    target = settings.get("target_modules") if adapter else None
    return {
        "run": name,
        "objective": settings.get("objective", "sft"),
        "method": settings.get("method"),
        "r": settings.get("r") if adapter else None,
        "alpha": settings.get("alpha") if adapter else None,
        "target_modules": target if isinstance(target, str) else " ".join(target or []),
        "trainable_parameters": summary["trainable_parameters"],
        "wall_time_s": round(summary["wall_time_s"], 2),
        "tokens_per_s": round(summary.get("session_tokens_per_s", 0.0)),
        "peak_memory_mb": round(summary["peak_memory_mb"]),
        "final_train_loss": metrics[-1]["loss"],
        "base_eval_loss": evaluation["base"]["loss"],
        "eval_loss": tuned["loss"],
        "perplexity": tuned["perplexity"],
        **{key: tuned.get(key) for key in ("exact_match", "rouge_l", "bleu", "chrf")},
        "base_preference_accuracy": evaluation["base"].get("preference_accuracy"),
        "preference_accuracy": tuned.get("preference_accuracy"),
        "base_reward_accuracy": evaluation["base"].get("reward_accuracy"),
        "reward_accuracy": tuned.get("reward_accuracy"),
        **{f"{TASK_PREFIX}{task}": value for task, value in tuned.get("exact_match_by_task", {}).items()},
        **{f"{HARNESS_PREFIX}{task} {metric}": value for task, values in
           evaluation.get("harness", {}).get("tuned", {}).items() for metric, value in values.items()},
    }


def plot_loss_curves(curves, path):
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for name, metrics in curves.items():
        line, = ax.plot([m["step"] for m in metrics], [m["loss"] for m in metrics], label=f"{name} train")
        evals = [m for m in metrics if "eval_loss" in m]
        if evals:
            ax.plot([m["step"] for m in evals], [m["eval_loss"] for m in evals], "o--", color=line.get_color(),
                    label=f"{name} eval")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss per trained token")
    ax.set_title("Loss curves of all runs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_loss_vs_parameters(rows, path):
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for row in rows:
        ax.scatter(row["trainable_parameters"], row["eval_loss"], s=40)
        ax.annotate(row["run"], (row["trainable_parameters"], row["eval_loss"]), textcoords="offset points",
                    xytext=(5, 5), fontsize="small")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel("held-out loss (tuned)")
    ax.set_title("Eval loss vs trainable parameters")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def sortable_table(table_id, rows, columns, headers, best):
    return table([headers.get(c, c) for c in columns], [[row.get(c) for c in columns] for row in rows],
                 row_classes=["best" if row["run"] == best else "" for row in rows], table_id=table_id,
                 titles=columns, cell_classes=["wrap" if c == "target_modules" else "" for c in columns])


SWEPT_METRICS = [("eval_loss", "held-out loss"), ("exact_match", "held-out exact match")]


def swept_points(rows, runs, key):
    """For one swept setting: the x labels (its values, in grid order) and, per metric, (x index, y) points."""
    by_name = {row["run"]: row for row in rows}
    labels = []
    for values in runs.values():
        label = json.dumps(values[key]) if isinstance(values[key], (list, dict)) else str(values[key])
        if label not in labels:
            labels.append(label)
    points = {metric: [] for metric, _ in SWEPT_METRICS}
    for name, values in runs.items():
        label = json.dumps(values[key]) if isinstance(values[key], (list, dict)) else str(values[key])
        for metric, _ in SWEPT_METRICS:
            if name in by_name and by_name[name].get(metric) is not None:
                points[metric].append((labels.index(label), by_name[name][metric]))
    return labels, points


def plot_metrics_vs_swept(rows, sweeps, path):
    """One column per swept setting of each sweep, one row per main metric: every run of the sweep
    as a point over the value it tried, the mean over the other settings as a line."""
    panels = [(sweep, key, runs) for sweep, runs in sweeps.items() for key in next(iter(runs.values()), {})]
    if not panels:
        fig, ax = plt.subplots(figsize=(6, 1.5), dpi=100)
        ax.axis("off")
        ax.text(0.5, 0.5, "no sweeps in the config", ha="center", va="center")
    else:
        fig, axes = plt.subplots(len(SWEPT_METRICS), len(panels), figsize=(3.6 * len(panels), 6), dpi=100,
                                 squeeze=False)
        for column, (sweep, key, runs) in enumerate(panels):
            labels, points = swept_points(rows, runs, key)
            for row, (metric, title) in enumerate(SWEPT_METRICS):
                ax = axes[row][column]
                xs, ys = zip(*points[metric]) if points[metric] else ((), ())
                ax.scatter(xs, ys, s=30, alpha=0.7)
                means = [(x, sum(y for px, y in points[metric] if px == x) / sum(px == x for px, _ in points[metric]))
                         for x in range(len(labels)) if any(px == x for px, _ in points[metric])]
                if means:
                    ax.plot(*zip(*means), "-", color="black", alpha=0.6)
                ax.set_xticks(range(len(labels)), labels, rotation=30, fontsize="small")
                ax.set_xlabel(key)
                ax.set_ylabel(title)
                ax.set_title(sweep, fontsize="small")
                ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def best_run(rows):
    """The run with the highest held-out exact match, or with the lowest held-out loss when there is none."""
    if all(row.get("exact_match") is not None for row in rows):
        return max(rows, key=lambda r: r["exact_match"])["run"], "Highest held-out exact match"
    return min(rows, key=lambda r: r["eval_loss"])["run"], "Lowest held-out loss"


def task_columns(rows, prefix=TASK_PREFIX):
    return sorted({key for row in rows for key in row if key.startswith(prefix)})


def shown_columns(rows):
    """The table's columns, less those that would tell nothing: empty in every row (the preference columns of
    a sweep of SFT runs), and the objective when every run is SFT. The CSV keeps them all."""
    columns = [c for c in COLUMNS if any(row.get(c) is not None for row in rows)]
    return [c for c in columns if c != "objective" or any(row[c] != "sft" for row in rows)]


def searches_section(searches):
    """A list of the config's searches: each one's best trial and a link to its report. searches: [(told file's
    content, the report's path relative to the sweep page)]."""
    if not searches:
        return ""
    items = []
    for told, link in searches:
        best, metric = told["best"], told["objective"]["metric"]
        found = (f"best {html.escape(best['run'])}, {html.escape(metric)} {best['value']:.4g}" if best
                 else "no trial completed")
        items.append(f"<li><a href='{html.escape(link)}'>{html.escape(told['search'])}</a>: "
                     f"{len(told['trials'])} trials, {found}</li>")
    return "<h2>Searches</h2><ul>" + "".join(items) + "</ul>"


def render_html(rows, loss_png, params_png, swept_png=None, searches=()):
    best, why = best_run(rows)
    tasks, benchmarks = task_columns(rows), task_columns(rows, HARNESS_PREFIX)
    return page("Sweep report", [
        f"<h1>Sweep: {len(rows)} run(s)</h1>",
        f"<p>{why}: <b>{html.escape(best)}</b>. Click a column header to sort.</p>",
        searches_section(searches),
        sortable_table("sweep", rows, shown_columns(rows), HEADERS, best),
        "<h2>Exact match per task</h2>" if tasks else "",
        sortable_table("tasks", rows, ["run"] + tasks, {t: t[len(TASK_PREFIX):] for t in tasks}, best) if tasks else "",
        "<h2>Standard benchmarks (lm-evaluation-harness, tuned)</h2>" if benchmarks else "",
        sortable_table("harness", rows, ["run"] + benchmarks, {c: c[len(HARNESS_PREFIX):] for c in benchmarks}, best)
        if benchmarks else "",
        "<h2>Loss curves</h2>", image("loss curves", loss_png),
        "<h2>Eval loss vs trainable parameters</h2>", image("eval loss vs parameters", params_png),
        *(["<h2>Metrics against each swept setting</h2>", image("metrics vs swept settings", swept_png)]
          if swept_png else []),
    ], style=STYLE)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", type=Path, required=True, help="this stage's settings (JSON)")
    parser.add_argument("--runs", nargs="+", required=True, help="the runs' names; the lists below are in this order")
    parser.add_argument("--run-settings", type=Path, nargs="+", required=True, help="each run's settings.json")
    parser.add_argument("--summaries", type=Path, nargs="+", required=True, help="each run's train_summary.json")
    parser.add_argument("--evaluations", type=Path, nargs="+", required=True, help="each run's eval.json")
    parser.add_argument("--metrics", type=Path, nargs="+", required=True, help="each run's metrics.jsonl")
    parser.add_argument("--csv", type=Path, required=True)
    parser.add_argument("--html", type=Path, required=True)
    parser.add_argument("--loss-plot", type=Path, required=True)
    parser.add_argument("--params-plot", type=Path, required=True)
    parser.add_argument("--swept-plot", type=Path, required=True, help="metrics against each swept setting (PNG)")
    parser.add_argument("--search-told", type=Path, nargs="*", default=[],
                        help="each search's last told file (its trials are among the runs)")
    parser.add_argument("--search-reports", type=Path, nargs="*", default=[], help="each search's report page")
    args = parser.parse_args(argv)
    if len(args.search_told) != len(args.search_reports):
        parser.error("give one report per search's told file")
    lists = (args.run_settings, args.summaries, args.evaluations, args.metrics)
    if any(len(paths) != len(args.runs) for paths in lists):
        parser.error(f"give one file per run ({len(args.runs)}) in each list")
    return args


def write_csv(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS + task_columns(rows) + task_columns(rows, HARNESS_PREFIX))
        writer.writeheader()
        writer.writerows(rows)


def main(argv=None):
    args = parse_args(argv)
    sweeps = {sweep: dict(grid_runs(sweep, spec)) for sweep, spec in (read_settings(args.settings, "report_sweep").sweeps
                                                               or {}).items()}
    rows, curves = [], {}
    for name, settings, summary, evaluation, metrics in zip(args.runs, args.run_settings, args.summaries,
                                                           args.evaluations, args.metrics):
        evaluation = read_json(evaluation)
        if evaluation.get("failed"):  # a search's trial whose training failed: its search report lists it
            continue
        curves[name] = list(read_jsonl(metrics))
        rows.append(run_row(name, read_json(settings), read_json(summary), evaluation, curves[name]))
    write_csv(args.csv, rows)
    plot_loss_curves(curves, args.loss_plot)
    plot_loss_vs_parameters(rows, args.params_plot)
    plot_metrics_vs_swept(rows, sweeps, args.swept_plot)
    searches = [(read_json(told), os.path.relpath(report, args.html.parent))
                for told, report in zip(args.search_told, args.search_reports)]
    html_page = render_html(rows, args.loss_plot.read_bytes(), args.params_plot.read_bytes(),
                            args.swept_plot.read_bytes() if sweeps else None, searches)
    args.html.write_text(html_page, encoding="utf-8")
    print(f"sweep report of {len(rows)} run(s) written to {args.html}")


if __name__ == "__main__":
    main()
