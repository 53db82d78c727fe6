"""The pieces of a search's report (scripts/search_report.py): the best trial and its settings as a run to
paste into the config, the optimization history, the objective against each searched setting, Optuna's
parameter importances, and a table of every trial. Plots are PNG files beside the page, which links them
by file name; the page has no script."""
import html
import json

import matplotlib
import optuna
import yaml

from finetune.files import atomic_path
from finetune.reports.html import STYLE, cell, table

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

optuna.logging.set_verbosity(optuna.logging.WARNING)

PAGE_STYLE = """
tr.best td { background: #eaf7ee; }
tr.pruned td { color: #777; }
tr.fail td { background: #fbeaea; }
pre.paste { background: #f6f6f6; border: 1px solid #ddd; padding: 0.6em; }
p.note { color: #8a5a00; }
.scroll { overflow-x: auto; }
"""
MIN_TRIALS_FOR_IMPORTANCE = 2


def choice_label(value):
    """A setting's value as text: strings as they are, anything else (lists, booleans, numbers) as JSON."""
    return value if isinstance(value, str) else json.dumps(value)


def optuna_choice(value):
    """A choice as Optuna stores one (None, bool, int, float or str): lists and objects as their JSON."""
    return value if value is None or isinstance(value, (bool, int, float, str)) else json.dumps(value)


def is_log(spec):
    return isinstance(spec, dict) and bool(spec.get("log"))


def distribution(spec):
    """The Optuna distribution of one entry of the search space."""
    if isinstance(spec, list):
        return optuna.distributions.CategoricalDistribution([optuna_choice(choice) for choice in spec])
    if spec["type"] == "int":
        return optuna.distributions.IntDistribution(int(spec["low"]), int(spec["high"]), log=bool(spec.get("log")),
                                                    step=int(spec.get("step", 1)))
    return optuna.distributions.FloatDistribution(spec["low"], spec["high"], log=bool(spec.get("log")),
                                                  step=spec.get("step"))


def by_number(trials):
    return sorted(trials, key=lambda trial: trial["number"])


def with_state(trials, state):
    return [trial for trial in by_number(trials) if trial["state"] == state and trial.get("value") is not None]


def best_run_settings(base, best):
    """The best trial as a run: the search's base settings with the trial's values over them."""
    return {**(base or {}), **best["params"]}


def best_yaml(search, base, best, metric):
    """best.yaml: {runs: {SEARCH-best: settings}} under a comment naming the trial; `runs: {}` under a comment
    saying so when no trial completed."""
    if best is None:
        return f"# no trial of search {search} completed: there is no best run yet\n" + yaml.safe_dump({"runs": {}})
    runs = {"runs": {f"{search}-best": best_run_settings(base, best)}}
    return (f"# the best trial of search {search}: {best['run']} ({metric} {best['value']:.6g})\n"
            + yaml.safe_dump(runs, sort_keys=False))


def param_importances(trials, space, direction):
    """({setting: importance}, None), from Optuna's fANOVA (seeded) on the complete trials, or (None, why not)."""
    complete = with_state(trials, "COMPLETE")
    if len(complete) < MIN_TRIALS_FOR_IMPORTANCE:
        return None, (f"importances need at least {MIN_TRIALS_FOR_IMPORTANCE} complete trials; "
                      f"{len(complete)} completed")
    try:
        distributions = {key: distribution(spec) for key, spec in space.items()}
        study = optuna.create_study(direction=direction)
        for trial in complete:
            params = {key: optuna_choice(trial["params"][key]) for key in space}
            study.add_trial(optuna.trial.create_trial(params=params, distributions=distributions,
                                                      value=trial["value"]))
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
        importances = optuna.importance.get_param_importances(study, evaluator=evaluator)
    except Exception as error:  # Optuna's own verdict on these trials, shown instead of the chart
        return None, f"Optuna could not rate the settings: {type(error).__name__}: {error}"
    if not importances:
        return None, "no searched setting varies between the complete trials"
    return {key: float(value) for key, value in importances.items()}, None


def save(fig, path):
    """Save a figure as a PNG at `path`, atomically."""
    fig.tight_layout()
    with atomic_path(path) as partial:
        fig.savefig(partial, format="png")
    plt.close(fig)


def placeholder(path, text, title):
    """A PNG that says why there is no chart."""
    fig, ax = plt.subplots(figsize=(7, 2), dpi=100)
    ax.axis("off")
    ax.set_title(title)
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True)
    save(fig, path)


def best_so_far(points, direction):
    """(number, best value up to it) along the complete trials, for the best-so-far line."""
    pick = min if direction == "minimize" else max
    line, best = [], None
    for number, value in points:
        best = value if best is None else pick(best, value)
        line.append((number, best))
    return line


def plot_history(trials, objective, path):
    """The objective of each trial by number: complete as dots, pruned as crosses, failed as ticks on the
    axis (they have no value), and the best value so far."""
    complete = [(t["number"], t["value"]) for t in with_state(trials, "COMPLETE")]
    pruned = [(t["number"], t["value"]) for t in with_state(trials, "PRUNED")]
    failed = [t["number"] for t in by_number(trials) if t["state"] == "FAIL"]
    if not complete and not pruned:
        return placeholder(path, "no trial has an objective value yet", "Optimization history")
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    if complete:
        ax.scatter(*zip(*complete), s=40, label="complete", zorder=3)
        ax.step(*zip(*best_so_far(complete, objective["direction"])), where="post", color="black", alpha=0.7,
                label=f"best so far ({objective['direction']})")
    if pruned:
        ax.scatter(*zip(*pruned), marker="x", s=40, color="grey", label="pruned (value when stopped)", zorder=3)
    if failed:
        ax.scatter(failed, [0] * len(failed), marker="^", s=60, color="red", clip_on=False, zorder=4,
                   transform=ax.get_xaxis_transform(), label="failed (no value)")
    ax.set_xlabel("trial number")
    ax.set_ylabel(objective["metric"])
    ax.set_title("Optimization history")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    save(fig, path)


def category_positions(spec, trials, key):
    """The category labels of a list-of-choices setting (the space's order, then any other value tried)."""
    labels = [choice_label(choice) for choice in spec]
    for trial in trials:
        if key in trial["params"] and choice_label(trial["params"][key]) not in labels:
            labels.append(choice_label(trial["params"][key]))
    return labels


def plot_setting(ax, key, spec, groups, best):
    """One searched setting's panel: the objective of each trial against the value it tried."""
    tried = [trial for trials, _ in groups for trial in trials]
    labels = category_positions(spec, tried, key) if isinstance(spec, list) else None
    position = (lambda v: labels.index(choice_label(v))) if labels else (lambda v: v)
    for trials, style in groups:
        points = [(position(t["params"][key]), t["value"]) for t in trials if key in t["params"]]
        if points:
            ax.scatter(*zip(*points), s=40, **style)
    if best is not None and key in best["params"]:
        ax.scatter([position(best["params"][key])], [best["value"]], marker="*", s=200, color="gold",
                   edgecolors="black", zorder=4, label="best")
    if labels:
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize="small")
        ax.set_xlim(-0.5, len(labels) - 0.5)
    elif is_log(spec):
        ax.set_xscale("log")
    ax.set_xlabel(key)
    ax.grid(alpha=0.3)


def plot_settings(trials, space, objective, best, path):
    """One panel per searched setting: the objective of the complete trials (pruned ones lighter)."""
    complete, pruned = with_state(trials, "COMPLETE"), with_state(trials, "PRUNED")
    if not complete:
        return placeholder(path, "no trial completed", "Objective against each searched setting")
    groups = [(complete, {"label": "complete", "zorder": 3}),
              (pruned, {"label": "pruned", "marker": "x", "color": "grey", "alpha": 0.4})]
    fig, axes = plt.subplots(1, len(space), figsize=(3.8 * len(space), 4), dpi=100, squeeze=False)
    for ax, (key, spec) in zip(axes[0], space.items()):
        plot_setting(ax, key, spec, groups, best)
    axes[0][0].set_ylabel(objective["metric"])
    axes[0][0].legend(fontsize="small")
    fig.suptitle(f"{objective['metric']} against each searched setting ({objective['direction']})")
    save(fig, path)


def plot_importances(importances, reason, path):
    """Optuna's parameter importances as horizontal bars (most important on top), or the reason there are none."""
    if importances is None:
        return placeholder(path, reason, "Parameter importances")
    ranked = sorted(importances.items(), key=lambda item: item[1])
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.5 * len(ranked)), dpi=100)
    ax.barh([key for key, _ in ranked], [value for _, value in ranked], color="tab:blue")
    for y, (_, value) in enumerate(ranked):
        ax.text(value, y, f" {value:.2f}", va="center", fontsize="small")
    ax.set_xlim(0, max(1.0, max(value for _, value in ranked) * 1.15))
    ax.set_xlabel("importance (fANOVA, seed 0)")
    ax.set_title("Parameter importances")
    ax.grid(axis="x", alpha=0.3)
    save(fig, path)


def run_page(run):
    """The run page of a trial, relative to results/search/{search}/report.html."""
    return f"../../runs/{run}/report.html"


def run_link(run):
    return f"<a href='{html.escape(run_page(run))}'>{html.escape(run)}</a>"


def summary_line(told, settings):
    objective = told["objective"]
    counts = {state: sum(trial["state"] == state for trial in told["trials"])
              for state in dict.fromkeys(trial["state"] for trial in by_number(told["trials"]))}
    names = {"FAIL": "failed"}
    states = ", ".join(f"{count} {names.get(state, state.lower())}" for state, count in counts.items())
    return (f"<p>Objective: <b>{html.escape(objective['metric'])}</b> ({html.escape(objective['direction'])}). "
            f"Trials told: {len(told['trials'])} / {settings.trials} planned ({html.escape(states or 'none')}); "
            f"rounds told: {told.get('rounds_told', 0)} (up to {settings.parallel} trials each); "
            f"sampler: {html.escape(settings.sampler)}; pruning: {html.escape(settings.pruning)}.</p>")


def best_section(told, settings, best_text):
    """The best trial (linked to its run page), its value and settings, and the run to paste into the config."""
    best = told.get("best")
    if best is None:
        return ["<h2>Best trial</h2>", "<p class='note'><b>No trial completed</b>: there is no best trial yet "
                "(pruned trials are not eligible). best.yaml holds <code>runs: {}</code>.</p>"]
    metric = html.escape(told["objective"]["metric"])
    base = {key: value for key, value in (settings.base or {}).items() if key not in best["params"]}
    rows = [[key, value, "searched"] for key, value in best["params"].items()]
    rows += [[key, value, "base"] for key, value in base.items()]
    return ["<h2>Best trial</h2>",
            f"<p>Trial {best['number']}: {run_link(best['run'])}, {metric} <b>{best['value']:.6g}</b>.</p>",
            table(["setting", "value", "from"], rows),
            "<h3>Paste as a run</h3>", f"<pre class='paste'>{html.escape(best_text)}</pre>"]


def trial_row(trial, space, best_number):
    """One trial's row: number, run (linked unless it failed), round, state, value, why it stopped, settings."""
    state = trial["state"]
    css = "best" if trial["number"] == best_number else state.lower()
    run = f"<td>{run_link(trial['run'])}</td>" if state != "FAIL" else cell(trial["run"])
    why = trial.get("error") if state == "FAIL" else trial.get("stop_reason")
    params = trial.get("params") or {}
    cells = [cell(trial["number"]), run, cell(trial.get("round")), cell(state), cell(trial.get("value")), cell(why),
             *(cell(params.get(key)) for key in space)]
    return f"<tr class='{css}'>" + "".join(cells) + "</tr>"


def trials_table(told, space):
    best_number = (told.get("best") or {}).get("number")
    headers = ["number", "run", "round", "state", told["objective"]["metric"], "stop reason / error", *space]
    head = "".join(f"<th>{html.escape(str(header))}</th>" for header in headers)
    body = "".join(trial_row(trial, space, best_number) for trial in by_number(told["trials"]))
    return f"<div class='scroll'><table><tr>{head}</tr>{body}</table></div>"


def image(alt, path):
    """An image beside the page, by its file name."""
    return f"<img alt='{html.escape(alt)}' src='{html.escape(path.name)}'>"


def render_page(search, told, settings, best_text, plots, importance_note):
    """The whole page. plots: the paths of the history, settings and importance PNGs (beside the page)."""
    history, against, importance = plots
    note = f"<p class='note'>{html.escape(importance_note)}</p>" if importance_note else ""
    parts = [f"<h1>Search: {html.escape(search)}</h1>", summary_line(told, settings),
             *best_section(told, settings, best_text),
             "<h2>Optimization history</h2>",
             "<p>Failed trials have no value: red triangles on the axis mark them.</p>"
             if any(trial["state"] == "FAIL" for trial in told["trials"]) else "",
             image("optimization history", history),
             "<h2>Objective against each searched setting</h2>", image("objective against settings", against),
             "<h2>Parameter importances</h2>", note, image("parameter importances", importance),
             "<h2>Every trial</h2>", trials_table(told, settings.space)]
    return "\n".join([f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(search)}</title>",
                      f"<style>{STYLE}{PAGE_STYLE}</style></head><body>", *parts, "</body></html>"])
