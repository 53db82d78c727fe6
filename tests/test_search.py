"""Searches (config `search:`), without the workflow's training: proposing rounds from the study, telling
results (complete, pruned, failed), the same proposals after a kill or a rerun, pruning through train.py,
a failed trial's outputs, bad spaces stopping before any job, and a trial being exactly the hand-listed run
with its settings (dry runs)."""
import json
import re
import subprocess
import sys

import pytest

import evaluate
import train
from conftest import REPO
from finetune.files import read_json
from finetune.search.space import objective_value
from finetune.search.study import outcome, propose, storage, tell
from finetune.settings import declared, read_settings, write_settings
from finetune.training.pruning import TrialPruning
from test_train_resume_and_scale import train_args
from workflow import copy_workflow, dry_run_jobs, snakemake

SPACE = {"learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
         "r": {"type": "int", "low": 4, "high": 32, "step": 4},
         "target_modules": ["all-linear", ["q_proj", "v_proj"]]}
OBJECTIVE = {"metric": "loss", "direction": "minimize"}


def search_settings(folder, stage, **values):
    """A search stage's settings: these over a 6-trial search of SPACE in rounds of 2 (what the stage takes)."""
    values = {"space": SPACE, "objective": OBJECTIVE, "trials": 6, "parallel": 2, **values}
    values = {name: value for name, value in values.items() if name in declared(stage)}
    return read_settings(write_settings(folder / f"{stage}.json", stage, **values), stage)


def told_round(folder, journal, round_number, history, proposals, values, states=None, **settings):
    """Tell a round whose trials got these objectives (and states); the told file's content."""
    told_now = []
    for i, (proposal, value) in enumerate(zip(proposals, values)):
        state = (states or {}).get(i, "COMPLETE")
        evaluation = {"failed": {"error": "boom"}} if state == "FAIL" else {"tuned": {"loss": value}}
        summary = {"stop_reason": "pruned: worse" if state == "PRUNED" else "max_steps"}
        metrics = [{"step": 10, "loss": 1.0, "eval_loss": value}]
        told_now.append(outcome(proposal, f"s-trial{proposal['number']}", round_number, evaluation, summary, metrics,
                                OBJECTIVE))
    return tell(search_settings(folder, "search_tell", **settings), "s", round_number, history, told_now, journal)


def test_a_round_is_proposed_from_the_seed_and_the_told_trials_alone(tmp_path):
    settings = search_settings(tmp_path, "search_propose")
    first = propose(settings, "s", 1, [], tmp_path / "a" / "study.journal")
    assert [t["number"] for t in first] == [0, 1]
    assert first == propose(settings, "s", 1, [], tmp_path / "b" / "study.journal"), "same seed, same round"
    for trial in first:
        assert 1e-4 <= trial["params"]["learning_rate"] <= 1e-2 and trial["params"]["r"] % 4 == 0
        assert trial["params"]["target_modules"] in SPACE["target_modules"], "a list choice comes back a list"
    other_seed = propose(search_settings(tmp_path, "search_propose", seed=1), "s", 1, [], tmp_path / "c" / "j")
    assert other_seed != first

    # a killed proposal left trials waiting in the journal: proposing again asks the same trials
    journal = tmp_path / "a" / "study.journal"
    assert propose(settings, "s", 1, [], journal) == first
    cut_short = tmp_path / "b" / "study.journal"
    cut_short.write_bytes(cut_short.read_bytes()[:-7])  # a write cut short by a kill
    assert propose(settings, "s", 1, [], cut_short) == first
    told = told_round(tmp_path, journal, 1, [], first, [0.9, 0.5])
    assert [t["state"] for t in told["trials"]] == ["COMPLETE", "COMPLETE"]
    assert told["best"]["number"] == 1 and told["best"]["value"] == 0.5
    second = propose(settings, "s", 2, told["trials"], journal)
    assert [t["number"] for t in second] == [2, 3]
    assert second == propose(settings, "s", 2, told["trials"], tmp_path / "fresh" / "study.journal"), \
        "a journal rebuilt from the told file proposes what the journal did"
    other_results = told_round(tmp_path, tmp_path / "d" / "study.journal", 1, [], first, [0.1, 2.0])
    assert propose(settings, "s", 2, other_results["trials"], tmp_path / "d" / "study.journal") != second, \
        "TPE proposes from the results"
    with pytest.raises(ValueError, match="round 3 follows 4 told trials, but the told file has 2"):
        propose(settings, "s", 3, told["trials"], journal)


def test_failed_and_pruned_trials_are_told_as_such_and_never_the_best(tmp_path):
    optuna = pytest.importorskip("optuna")
    settings = search_settings(tmp_path, "search_propose")
    journal = tmp_path / "study.journal"
    first = propose(settings, "s", 1, [], journal)
    told = told_round(tmp_path, journal, 1, [], first, [0.1, 0.7], states={0: "FAIL"})
    assert [t["state"] for t in told["trials"]] == ["FAIL", "COMPLETE"]
    assert told["trials"][0]["error"] == "boom" and told["trials"][0]["value"] is None
    assert told["best"]["number"] == 1
    second = propose(settings, "s", 2, told["trials"], journal)
    told = told_round(tmp_path, journal, 2, told["trials"], second, [0.01, 0.3], states={0: "PRUNED"})
    assert [t["state"] for t in told["trials"]] == ["FAIL", "COMPLETE", "PRUNED", "COMPLETE"]
    assert told["best"]["number"] == 3, "a pruned trial's objective is shown, never the best"
    study = optuna.load_study(study_name="s", storage=storage(journal))
    assert [t.state.name for t in study.trials] == ["FAIL", "COMPLETE", "PRUNED", "COMPLETE"]
    assert study.best_trial.number == 3 and study.trials[2].intermediate_values == {10: 0.01}


def test_the_objective_is_a_tuned_metric_or_a_dotted_path_and_nan_fails_the_trial():
    evaluation = {"tuned": {"loss": 0.5, "exact_match_by_task": {"first": 0.25}}, "harness": {"tuned": {"t": {"acc": 1}}}}
    assert objective_value(evaluation, "loss") == 0.5
    assert objective_value(evaluation, "exact_match_by_task.first") == 0.25
    assert objective_value(evaluation, "harness.tuned.t.acc") == 1.0
    with pytest.raises(KeyError, match="'rouge_l' is not a number in eval.json .tuned metrics: loss"):
        objective_value(evaluation, "rouge_l")
    nan = outcome({"number": 0, "params": {}}, "s-trial0", 1, {"tuned": {"loss": float("nan")}}, {}, [], OBJECTIVE)
    assert nan["state"] == "FAIL" and "not a number" in nan["error"]


def test_a_trial_the_median_pruner_stops_is_recorded_as_pruned(tmp_path, tiny_model, shards):
    """Two completed trials with held-out losses no training reaches: the next trial is worse than their median
    at its first evaluation, and stops there. A trial its study has no longer waiting trains on unpruned."""
    settings = search_settings(tmp_path, "search_propose", trials=3, pruning="median", pruning_startup_trials=1)
    journal = tmp_path / "study.journal"
    first = propose(settings, "s", 1, [], journal)
    told = told_round(tmp_path, journal, 1, [], first, [1e-3, 1e-3], pruning="median", pruning_startup_trials=1)
    propose(settings, "s", 2, told["trials"], journal)
    out = tmp_path / "trial2"
    train.main(train_args(tiny_model, shards, out, "--study", str(journal), "--trial", "2", max_steps=40,
                          eval_every=10))
    summary = read_json(out / "summary.json")
    assert summary["stop_reason"].startswith("pruned: held-out loss") and summary["stopped_at_step"] == 10
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    trial = outcome({"number": 2, "params": {}}, "s-trial2", 2, {"tuned": {"loss": 2.0}}, summary, metrics, OBJECTIVE)
    assert trial["state"] == "PRUNED" and trial["held_out_loss"] == {"10": metrics[-1]["eval_loss"]}

    gone = TrialPruning(tmp_path / "deleted" / "study.journal", 2, say=lambda message: None)
    assert gone.report(10, 99.0) is None, "without its study a trial trains on"

    done = tmp_path / "trial0-again"
    train.main(train_args(tiny_model, shards, done, "--study", str(journal), "--trial", "0", max_steps=20,
                          eval_every=10))
    assert read_json(done / "summary.json")["stop_reason"] == "max_steps"


def guard(tmp_path, command):
    out = tmp_path / "run"
    out.mkdir(parents=True, exist_ok=True)
    log = out / "train.log"
    args = [sys.executable, "-m", "finetune.search.guard", "--log", str(log), "--trained", str(out / "trained"),
            "--metrics", str(out / "metrics.jsonl"), "--summary", str(out / "summary.json"), "--samples",
            str(out / "samples.jsonl"), "--tensorboard", str(out / "tb"), "--", sys.executable, "-c", command]
    with open(log, "w") as f:
        return subprocess.run(args, cwd=REPO, stdout=f, stderr=subprocess.STDOUT).returncode, out


def test_a_failed_trial_is_a_result_and_a_killed_one_is_not(tmp_path):
    code, out = guard(tmp_path / "a", "import sys; print('[s-trial3] r: no such layer', file=sys.stderr); "
                                      "raise SystemExit(1)")
    assert code == 0
    summary = read_json(out / "summary.json")
    assert summary["failed"]["error"] == "[s-trial3] r: no such layer" and summary["failed"]["exit_code"] == 1
    assert (out / "metrics.jsonl").exists() and (out / "tb").is_dir()
    assert read_json(out / "trained" / evaluate.FAILED_TRIAL)["error"] == "[s-trial3] r: no such layer"

    settings = write_settings(tmp_path / "evaluate.json", "evaluate")
    evaluate.main(["--base-model", "unused", "--settings", str(settings), "--trained-dir", str(out / "trained"),
                   "--shards", "unused.arrow", "--records", "unused.jsonl", "--eval-json", str(out / "eval.json"),
                   "--generations", str(out / "generations.jsonl"), "--run-name", "s-trial3"])
    assert read_json(out / "eval.json") == {"run": "s-trial3", "failed": summary["failed"]}

    code, out = guard(tmp_path / "b", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    assert code == 128 + 9 and not (out / "summary.json").exists() and not (out / "trained").exists()
    code, out = guard(tmp_path / "c", "pass")
    assert code == 0 and not (out / "summary.json").exists(), "a trial that trained keeps its own outputs"


# ---- in the workflow (dry runs): bad spaces stop before any job; a trial is the hand-listed run


@pytest.fixture
def workdir(tmp_path):
    return copy_workflow(tmp_path / "wf")


def search_yaml(space, extra=""):
    return (f"search:\n  s:\n    base: {{target_modules: all-linear}}\n    space: {space}\n"
            f"    objective: {{metric: loss, direction: minimize}}\n    trials: 4\n    parallel: 2\n{extra}")


@pytest.mark.parametrize("space, extra, message", [
    ("{learning_rat: {type: float, low: 0.001, high: 0.01}}", "", "search 's': 'learning_rat' is not a run setting"),
    ("{learning_rate: {type: float, low: 0.01, high: 0.001}}", "", "'learning_rate': low (0.01) must be below high"),
    ("{learning_rate: {type: float, low: 0, high: 0.01, log: true}}", "", "'learning_rate': log needs low > 0, got 0"),
    ("{r: []}", "", "search 's': 'r': the list of choices is empty"),
    ("{target_modules: [all-linear]}", "", "'target_modules' is set in both base and space; keep one"),
    ("{r: {type: float, low: 4, high: 16}}", "", "'r' is a whole number (an integer setting): use type int"),
    ("{r: {type: int, low: 0, high: 16}}", "", "search 's': a trial with {'r': 0} is no valid run"),
    ("{method: [lora, qlora-ish]}", "", "a trial with {'method': 'qlora-ish'} is no valid run"),
    ("{learning_rate: {type: float, low: 0.001, high: 0.01}}", "    pruning: median\n",
     "pruning median compares held-out losses during training: set eval_every"),
])
def test_a_bad_space_stops_before_any_job_naming_the_search_and_the_key(workdir, space, extra, message):
    (workdir / "search.yaml").write_text(search_yaml(space, extra) + "run_defaults: {eval_every: 0}\n")
    result = snakemake(workdir, "-n", "--configfile", "search.yaml", check=False)
    assert result.returncode != 0
    assert message in result.stdout + result.stderr
    assert not (workdir / "results").exists()


def test_a_trial_is_exactly_the_hand_listed_run_with_its_settings(workdir):
    space = "{learning_rate: {type: float, low: 0.0001, high: 0.01, log: true}, r: [4, 8]}"
    (workdir / "search.yaml").write_text(search_yaml(space))
    snakemake(workdir, "results/search/s/round-1.json", "--cores", "1", "--configfile", "search.yaml")
    trial = read_json(workdir / "results/search/s/round-1.json")["trials"][0]
    assert trial["number"] == 0
    by_hand = {"target_modules": "all-linear", **trial["params"]}
    (workdir / "search.yaml").write_text(search_yaml(space) + f"runs:\n  by-hand: {json.dumps(by_hand)}\n")
    jobs = dry_run_jobs(workdir, "results/runs/s-trial0/eval.json", "results/runs/by-hand/eval.json",
                        "--configfile", "search.yaml")
    commands = {re.search(r"--run-name (\S+)", shell).group(1): shell for rule, _, shell in jobs if rule == "train"}
    guarded = commands["s-trial0"].replace("s-trial0", "NAME")
    assert guarded.startswith("python -m finetune.search.guard --log results/logs/train/NAME.log")
    assert guarded.split(" -- ", 1)[1] == commands["by-hand"].replace("by-hand", "NAME")
    stages = ("train", "evaluate")
    paths = [f"results/runs/{run}/settings/{stage}.json" for run in ("s-trial0", "by-hand") for stage in stages]
    snakemake(workdir, *paths, "--cores", "1", "--configfile", "search.yaml")
    for stage in stages:
        assert read_json(workdir / f"results/runs/s-trial0/settings/{stage}.json") == \
            read_json(workdir / f"results/runs/by-hand/settings/{stage}.json"), stage
