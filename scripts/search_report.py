"""Report one search (Optuna) from what its tell step recorded: the best trial with its value and settings,
the run to paste into the config (best.yaml: {runs: {SEARCH-best: base settings + the best trial's values}}),
the optimization history, the objective against each searched setting, Optuna's parameter importances
(fANOVA, seeded), and a table of every trial, failed and pruned ones with their state and why they stopped.
The plots are PNG files beside the page, linked by file name. When no trial completed, the page says so and
best.yaml is `runs: {}` under a comment saying so.

    python scripts/search_report.py --settings results/search/lr-rank/settings/search_report.json \
        --search lr-rank --told results/search/lr-rank/told.json --html results/search/lr-rank/report.html \
        --history-plot results/search/lr-rank/history.png --settings-plot results/search/lr-rank/settings.png \
        --importance-plot results/search/lr-rank/importance.png --best results/search/lr-rank/best.yaml
"""
import argparse
from pathlib import Path

from finetune.files import atomic_path, read_json
from finetune.search.report import (best_yaml, param_importances, plot_history, plot_importances, plot_settings,
                                    render_page)
from finetune.settings import read_settings


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", type=Path, required=True, help="this stage's settings (JSON)")
    parser.add_argument("--search", required=True, help="the search's name")
    parser.add_argument("--told", type=Path, required=True, help="the trials told to the study (JSON)")
    parser.add_argument("--html", type=Path, required=True, help="the report page")
    parser.add_argument("--history-plot", type=Path, required=True, help="objective by trial number (PNG)")
    parser.add_argument("--settings-plot", type=Path, required=True, help="objective against each setting (PNG)")
    parser.add_argument("--importance-plot", type=Path, required=True, help="parameter importances (PNG)")
    parser.add_argument("--best", type=Path, required=True, help="the best trial as a run of the config (YAML)")
    return parser.parse_args(argv)


def write_text(path, text):
    with atomic_path(path) as partial:
        partial.write_text(text, encoding="utf-8")


def main(argv=None):
    args = parse_args(argv)
    settings = read_settings(args.settings, "search_report")
    told = read_json(args.told)
    trials, best, objective = told["trials"], told.get("best"), settings.objective
    importances, reason = param_importances(trials, settings.space, objective["direction"])
    plot_history(trials, objective, args.history_plot)
    plot_settings(trials, settings.space, objective, best, args.settings_plot)
    plot_importances(importances, reason, args.importance_plot)
    best_text = best_yaml(args.search, settings.base, best, objective["metric"])
    plots = (args.history_plot, args.settings_plot, args.importance_plot)
    write_text(args.html, render_page(args.search, {**told, "objective": objective}, settings, best_text, plots,
                                      reason))
    write_text(args.best, best_text)
    found = f"best {best['run']} ({objective['metric']} {best['value']:.6g})" if best else "no trial completed"
    print(f"search report of {args.search}: {len(trials)} trial(s), {found}; written to {args.html}")


if __name__ == "__main__":
    main()
