"""The search report (scripts/search_report.py) on synthetic told files: no training."""
import json
import re

import pytest
import yaml

import search_report

SEARCH = "lr-rank"
OBJECTIVE = {"metric": "loss", "direction": "minimize"}
SPACE = {"learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
         "r": {"type": "int", "low": 4, "high": 32, "log": False, "step": 4},
         "target_modules": [["q_proj", "v_proj"], "all-linear"],
         "packing": [True, False]}
BASE = {"method": "lora", "max_steps": 200, "r": 16, "eval_every": 100}


def trial(number, state, value, learning_rate=1e-3, r=8, targets=("q_proj", "v_proj"), packing=True, **fields):
    return {"number": number, "run": f"{SEARCH}-trial{number}", "round": number // 4 + 1,
            "params": {"learning_rate": learning_rate, "r": r,
                       "target_modules": list(targets) if isinstance(targets, tuple) else targets, "packing": packing},
            "state": state, "value": value, "error": None,
            "stop_reason": "pruned: held-out loss above the median" if state == "PRUNED" else "max_steps",
            "held_out_loss": {"100": 0.9, "200": value} if value is not None else {}, **fields}


def told(trials):
    complete = [t for t in trials if t["state"] == "COMPLETE"]
    best = min(complete, key=lambda t: t["value"]) if complete else None
    return {"search": SEARCH, "objective": OBJECTIVE, "rounds_told": 2, "trials": trials,
            "best": {key: best[key] for key in ("number", "run", "params", "value")} if best else None}


MIXED = [trial(0, "COMPLETE", 0.53, 0.0012, 8),
         trial(1, "PRUNED", 0.8, 0.008, 28, "all-linear", False),
         trial(2, "FAIL", None, 0.0003, 4, "all-linear", error="ValueError: Target modules {'nope'} not found"),
         trial(3, "COMPLETE", 0.61, 0.0002, 16, "all-linear", False),
         trial(4, "COMPLETE", 0.47, 0.003, 12, packing=False),
         trial(5, "COMPLETE", 0.7, 0.0001, 32, "all-linear")]


def run_report(folder, trials):
    """Write the settings and told files, run the report; (page text, best.yaml text, paths)."""
    settings = folder / "settings.json"
    # every setting given, so no default is looked up: finetune.settings.write_settings takes a setting named
    # `objective` for a run's objective (default_of) and fails on the search's {metric, direction}
    settings.write_text(json.dumps({"base": BASE, "space": SPACE, "objective": OBJECTIVE, "trials": 12,
                                    "parallel": 4, "sampler": "tpe", "pruning": "median"}))
    (folder / "told.json").write_text(json.dumps(told(trials)))
    out = folder / "search" / SEARCH
    paths = {name: out / f"{name}.png" for name in ("history", "settings", "importance")}
    search_report.main(["--settings", str(settings), "--search", SEARCH, "--told", str(folder / "told.json"),
                        "--html", str(out / "report.html"), "--history-plot", str(paths["history"]),
                        "--settings-plot", str(paths["settings"]), "--importance-plot", str(paths["importance"]),
                        "--best", str(out / "best.yaml")])
    return (out / "report.html").read_text(), (out / "best.yaml").read_text(), paths


def trial_row(page, number):
    rows = re.findall(r"<tr class='[^']*'>.*?</tr>", page, re.S)
    return next(row for row in rows if f"{SEARCH}-trial{number}<" in row and "data-value" in row)


@pytest.fixture
def mixed(tmp_path):
    return run_report(tmp_path, MIXED)


def test_page_names_the_best_trial_its_value_and_settings(mixed):
    page, _, _ = mixed
    assert f"<h1>Search: {SEARCH}</h1>" in page
    assert "href='../../runs/lr-rank-trial4/report.html'>lr-rank-trial4</a>, loss <b>0.47</b>" in page
    best = page.split("<h2>Best trial</h2>")[1].split("<h2>")[0]
    for text in ("learning_rate", "0.003", "target_modules", "[&quot;q_proj&quot;, &quot;v_proj&quot;]", "packing",
                 "false", "max_steps"):
        assert text in best
    assert "6 / 12 planned" in page and "tpe" in page and "median" in page and "minimize" in page


def test_page_embeds_the_plots_as_files_and_has_no_script(mixed):
    page, _, paths = mixed
    for path in paths.values():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000
        assert f"src='{path.name}'" in page
    assert page.count("<img ") == 3
    assert "<script" not in page
    assert not list(paths["history"].parent.glob("*.partial"))


def test_failed_and_pruned_trials_are_listed_with_their_state(mixed):
    page, _, _ = mixed
    failed, pruned = trial_row(page, 2), trial_row(page, 1)
    assert ">FAIL<" in failed and "ValueError: Target modules {&#x27;nope&#x27;} not found" in failed
    assert "href=" not in failed  # a failed trial has no run page to link
    assert ">PRUNED<" in pruned and "pruned: held-out loss above the median" in pruned and ">0.8<" in pruned
    assert "href='../../runs/lr-rank-trial1/report.html'" in pruned
    numbers = [int(n) for n in re.findall(r"<tr class='[^']*'><td class=\"num\" data-value=\"(\d+)\"", page)]
    assert numbers == sorted(numbers) == list(range(6))


def test_best_yaml_is_the_base_with_the_best_values(mixed):
    page, best_text, _ = mixed
    assert best_text.startswith(f"# the best trial of search {SEARCH}: {SEARCH}-trial4 (loss 0.47)\n")
    expected = {**BASE, "learning_rate": 0.003, "r": 12, "target_modules": ["q_proj", "v_proj"], "packing": False}
    assert yaml.safe_load(best_text) == {"runs": {f"{SEARCH}-best": expected}}
    assert list(yaml.safe_load(best_text)["runs"][f"{SEARCH}-best"]) == list(expected)  # base first, then params
    assert "Paste as a run" in page and f"{SEARCH}-best:" in page.split("Paste as a run")[1]


def test_importances_come_from_optuna_and_are_reproducible(tmp_path):
    from finetune.search.report import param_importances
    first, reason = param_importances(MIXED, SPACE, "minimize")
    assert reason is None and set(first) == set(SPACE) and sum(first.values()) == pytest.approx(1.0)
    assert param_importances(MIXED, SPACE, "minimize")[0] == first


def test_one_complete_trial_gives_an_importance_note_not_a_crash(tmp_path):
    page, best_text, paths = run_report(tmp_path, MIXED[:3])
    assert "importances need at least 2 complete trials; 1 completed" in page
    assert paths["importance"].stat().st_size > 1000
    assert yaml.safe_load(best_text)["runs"][f"{SEARCH}-best"]["learning_rate"] == 0.0012


def test_no_complete_trial_says_so(tmp_path):
    trials = [trial(0, "FAIL", None, error="RuntimeError: CUDA out of memory"), trial(1, "PRUNED", 0.9)]
    page, best_text, paths = run_report(tmp_path, trials)
    assert "No trial completed" in page
    assert best_text.startswith(f"# no trial of search {SEARCH} completed")
    assert yaml.safe_load(best_text) == {"runs": {}}
    assert all(path.stat().st_size > 1000 for path in paths.values())
    assert "RuntimeError: CUDA out of memory" in trial_row(page, 0)


def test_choices_optuna_cannot_store_are_encoded():
    from finetune.search.report import choice_label, distribution, optuna_choice
    assert optuna_choice(["q_proj", "v_proj"]) == '["q_proj", "v_proj"]' and optuna_choice(True) is True
    assert choice_label(["a"]) == '["a"]' and choice_label("all-linear") == "all-linear"
    assert distribution(SPACE["target_modules"]).choices == ('["q_proj", "v_proj"]', "all-linear")
    r = distribution(SPACE["r"])
    assert (r.low, r.high, r.step, r.log) == (4, 32, 4, False)
    assert distribution(SPACE["learning_rate"]).log


def test_best_so_far_follows_the_direction():
    from finetune.search.report import best_so_far
    points = [(0, 0.5), (2, 0.7), (3, 0.4)]
    assert best_so_far(points, "minimize") == [(0, 0.5), (2, 0.5), (3, 0.4)]
    assert best_so_far(points, "maximize") == [(0, 0.5), (2, 0.7), (3, 0.7)]
