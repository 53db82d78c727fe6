"""A search in the workflow (slow): over the finished default project, 4 trials in 2 rounds of 2 (random
sampler, seeded; one choice of target modules that no model has, so that some trials fail), with median
pruning; Snakemake is killed (-9, every process) while the first round trains, and run again. The search
goes on from where it was: the same proposals, every trial told, failed ones as failed; its report is linked
from the sweep page, and a rerun plans nothing."""
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import yaml

from finetune.files import read_json
from workflow import copy_project, planned_jobs, snakemake

pytestmark = pytest.mark.slow

SEARCH = """
search:
  quick:
    base: {max_steps: 20, eval_every: 10, log_every: 10, sample_every: 0}
    space:
      learning_rate: {type: float, low: 0.0005, high: 0.01, log: true}
      target_modules: [all-linear, [no_such_module]]
    objective: {metric: loss, direction: minimize}
    trials: 4
    parallel: 2
    sampler: random
    seed: 1
    pruning: median
    pruning_startup_trials: 1
"""
ARGS = ["--configfile", "search.yaml"]


def kill_during_first_round(project, timeout=600):
    """Start the workflow and kill -9 it and every process under it once a trial of the first round trains;
    the first round's proposal as it was then."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    process = subprocess.Popen([sys.executable, "-m", "snakemake", "--cores", "2", *ARGS], cwd=project, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    logs = [project / "results/logs/train" / f"quick-trial{n}.log" for n in (0, 1)]
    deadline = time.time() + timeout
    while not any(log.exists() and log.stat().st_size for log in logs):
        assert process.poll() is None and time.time() < deadline, "no trial of the first round started"
        time.sleep(0.5)
    proposal = (project / "results/search/quick/round-1.json").read_text()
    members = [process] + psutil.Process(process.pid).children(recursive=True)
    for member in members:
        try:
            member.send_signal(signal.SIGKILL)
        except (psutil.NoSuchProcess, ProcessLookupError):
            pass
    process.wait()
    return proposal


@pytest.fixture(scope="session")
def searched(finished, tmp_path_factory):
    """(the project with the search done after a kill -9 in its first round, the first proposal before the kill)"""
    project = copy_project(finished, tmp_path_factory.mktemp("search") / "wf")
    (project / "search.yaml").write_text(SEARCH)
    proposal = kill_during_first_round(project)
    assert not (project / "results/search/quick/told-1.json").exists(), "killed before the round was told"
    snakemake(project, "--unlock", *ARGS)  # a killed Snakemake leaves its lock on the project
    result = snakemake(project, "--cores", "2", *ARGS, timeout=1200)
    (project.parent / "snakemake-output.txt").write_text(result.stdout + result.stderr)
    return project, proposal


def test_a_killed_search_goes_on_with_the_same_trials_and_tells_every_one(searched):
    project, proposal_before_kill = searched
    folder = project / "results/search/quick"
    assert (folder / "round-1.json").read_text() == proposal_before_kill
    told = read_json(folder / "told-2.json")
    trials = told["trials"]
    assert [t["number"] for t in trials] == [0, 1, 2, 3]
    assert [t["run"] for t in trials] == [f"quick-trial{n}" for n in range(4)]
    for trial in trials:
        failing = trial["params"]["target_modules"] == ["no_such_module"]
        assert (trial["state"] == "FAIL") == failing, trial
        if failing:
            assert "no_such_module" in trial["error"] and trial["value"] is None
            page = (project / "results/runs" / trial["run"] / "report.html").read_text()
            assert "training failed" in page and "no_such_module" in page
        else:
            summary = read_json(project / "results/runs" / trial["run"] / "train_summary.json")
            assert (trial["state"] == "PRUNED") == summary["stop_reason"].startswith("pruned"), trial
            assert trial["value"] == read_json(project / "results/runs" / trial["run"] / "eval.json")["tuned"]["loss"]
            assert (project / "results/runs" / trial["run"] / "report.html").exists()
    assert {t["state"] for t in trials} >= {"FAIL"} and any(t["state"] != "FAIL" for t in trials), \
        "seed 1 draws both choices"
    complete = [t for t in trials if t["state"] == "COMPLETE"]
    assert told["best"]["value"] == min(t["value"] for t in complete)


def test_the_search_report_is_linked_from_the_sweep_page_and_its_best_pastes_as_a_run(searched):
    project, _ = searched
    folder = project / "results/search/quick"
    best = read_json(folder / "told-2.json")["best"]
    page = (folder / "report.html").read_text()
    assert best["run"] in page and "<script" not in page
    for image in ("history.png", "settings.png", "importance.png"):
        assert f"src='{image}'" in page and (folder / image).stat().st_size > 1000
    pasted = yaml.safe_load((folder / "best.yaml").read_text())
    assert pasted == {"runs": {"quick-best": {"max_steps": 20, "eval_every": 10, "log_every": 10, "sample_every": 0,
                                              **best["params"]}}}
    sweep = (project / "results/report/sweep.html").read_text()
    assert "href='../search/quick/report.html'" in sweep
    assert best["run"] in sweep, "the trials that trained are among the sweep's runs"
    failed = [t["run"] for t in read_json(folder / "told-2.json")["trials"] if t["state"] == "FAIL"]
    assert failed and not any(f"<td>{run}</td>" in sweep for run in failed), "a failed trial has no row"


def test_a_finished_search_reruns_nothing_also_moved(searched, tmp_path):
    project, _ = searched
    assert planned_jobs(project, *ARGS) == []
    moved = copy_project(project, tmp_path / "moved")
    assert planned_jobs(moved, *ARGS) == [], "a copied project's search is done too"
