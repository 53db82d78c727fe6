"""The GRPO example end to end (config/grpo.yaml over the default config), on a copy of the finished default
project: only the two new runs train; GRPO chained on a short SFT run raises held-out exact match, the reward
it was trained on, well above its parent's; the run page shows the reward over steps and sampled completions
with their rewards; the chain is recorded; a moved project reruns nothing."""
import json

import pytest

from workflow import copy_project, planned_jobs

pytestmark = pytest.mark.slow
OVERLAY = ("--configfile", "config/grpo.yaml")  # what the grpo_finished fixture (conftest.py) ran


def evaluation(project, run):
    return json.loads((project / "results" / "runs" / run / "eval.json").read_text())


def test_the_overlay_trains_only_its_two_runs(grpo_finished):
    output = (grpo_finished.parent / "snakemake-output.txt").read_text()
    trained = sorted(part.split("wildcards: run=")[1].split()[0] for part in output.split("rule train:")[1:])
    assert trained == ["grpo", "sft-short"], "the default runs are reused"
    assert "rule pretrain:" not in output and "rule reference_logps:" not in output


def test_grpo_raises_the_exact_match_it_is_rewarded_on(grpo_finished):
    """The target: held-out exact match at least the short SFT run's + 0.08 (the GRPO run's base is that run,
    so its eval.json compares the two on the same records with the same decoding)."""
    grpo, sft = evaluation(grpo_finished, "grpo"), evaluation(grpo_finished, "sft-short")
    assert grpo["base"]["exact_match"] == pytest.approx(sft["tuned"]["exact_match"], abs=1e-9), "base is the parent"
    assert grpo["tuned"]["exact_match"] >= grpo["base"]["exact_match"] + 0.08, (grpo["base"], grpo["tuned"])
    assert set(grpo["tuned"]["exact_match_by_task"]) == set(sft["tuned"]["exact_match_by_task"])
    rows = [json.loads(line) for line in (grpo_finished / "results/runs/grpo/metrics.jsonl").read_text().splitlines()]
    early, late = rows[:3], rows[-3:]
    assert sum(r["reward"] for r in late) > sum(r["reward"] for r in early), "the sampled completions earn more"
    assert [r["step"] for r in rows if "eval_reward" in r] == [100, 200, 300], "the held-out reward, logged"


def test_the_run_page_shows_the_reward_and_sampled_completions(grpo_finished):
    page = (grpo_finished / "results/runs/grpo/report.html").read_text()
    assert "reinforcement learning (grpo, rewards exact_match; 8 completions per prompt" in page
    assert "Sampled completions and their rewards" in page
    assert "trained after base model tiny-llama -&gt; run sft-short (lora, sft)" in page
    samples = [json.loads(line) for line in (grpo_finished / "results/runs/grpo/samples.jsonl").read_text().splitlines()]
    assert sorted({s["step"] for s in samples if s.get("kind") == "rollout"}) == [100, 200, 300]
    manifest = json.loads((grpo_finished / "results/runs/grpo/manifest.json").read_text())
    assert [link.get("run") for link in manifest["chain"]][-1:] == ["sft-short"]


def test_a_moved_grpo_project_reruns_nothing(grpo_finished, tmp_path):
    assert planned_jobs(copy_project(grpo_finished, tmp_path / "moved"), *OVERLAY) == []


def test_the_docs_quote_what_the_example_printed(grpo_finished):
    """docs/grpo.md's table is what the example's eval.json files hold, on the machine type the docs name."""
    from test_workflow_e2e import on_the_reference_machine
    if not on_the_reference_machine():
        pytest.skip("the quoted figures are those of the reference machine type (docs/demo.md)")
    from conftest import REPO
    table = (REPO / "docs" / "grpo.md").read_text().split("| task | sft-short |", 1)[1].split("\n\n", 1)[0]
    sft, grpo = evaluation(grpo_finished, "sft-short")["tuned"], evaluation(grpo_finished, "grpo")["tuned"]
    for line in table.splitlines()[2:]:
        cells = [cell.strip().strip("*") for cell in line.strip("|").split("|")]
        task = cells[0]
        expected = (sft["exact_match"], grpo["exact_match"]) if task == "all" else \
            (sft["exact_match_by_task"][task], grpo["exact_match_by_task"][task])
        assert [float(cells[1]), float(cells[2])] == pytest.approx(expected, abs=5e-4), task
    readme = (REPO / "README.md").read_text()
    assert f"exact match from {sft['exact_match']:.3f} to {grpo['exact_match']:.3f}" in readme
