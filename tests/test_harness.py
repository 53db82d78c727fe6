"""eval.harness: lm-evaluation-harness's tasks on the base and the tuned model of a run. The oracle: on the
example data, the harness's exact match on the workflow's own task (finetune_heldout) equals the workflow's
exact match on the same records, answer by answer, on both sides."""
import json
import shutil

import pytest

import evaluate
import harness_tasks
from conftest import settings_args
from finetune.evaluation import harness
from finetune.evaluation.metrics import is_exact_match

lm_eval = pytest.importorskip("lm_eval")


def run_evaluate(tiny_model, trained_run, shards, tmp_path, **harness_settings):
    records = tmp_path / "records.jsonl"
    records.write_text("".join(shard.with_suffix(".jsonl").read_text() for shard in shards))
    evaluate.main(["--base-model", str(tiny_model), "--trained-dir", str(trained_run / "trained"),
                   "--shards", *map(str, shards), "--records", str(records), "--eval-json", str(tmp_path / "eval.json"),
                   "--generations", str(tmp_path / "generations.jsonl"), "--run-name", "test-run",
                   *settings_args(tmp_path, "evaluate", max_new_tokens=8, batch_size=8,
                                  harness={"tasks": ["finetune_heldout"], **harness_settings})])
    generations = [json.loads(line) for line in (tmp_path / "generations.jsonl").read_text().splitlines()]
    return json.loads((tmp_path / "eval.json").read_text()), [g for g in generations if g["source"] == "heldout"]


def test_the_harness_answers_and_scores_the_heldout_records_as_evaluate_does(tiny_model, trained_run, shards,
                                                                             tmp_path, monkeypatch):
    outputs = []  # lm_eval's answers of each side, base first

    def answers_logged(**options):
        outputs.append(real(**{**options, "log_samples": True}))
        return outputs[-1]

    real = lm_eval.simple_evaluate
    monkeypatch.setattr(lm_eval, "simple_evaluate", answers_logged)
    result, heldout = run_evaluate(tiny_model, trained_run, shards, tmp_path)
    table = result["harness"]
    assert table["tasks"] == ["finetune_heldout"] and table["samples"] == {"finetune_heldout": len(heldout)}
    for side, output in zip(("base", "tuned"), outputs):
        assert table[side]["finetune_heldout"]["exact_match"] == result[side]["exact_match"]
        answers = {s["doc"]["id"]: s["filtered_resps"][0] for s in output["samples"]["finetune_heldout"]}
        assert [answers[g["id"]].strip() for g in heldout] == [g[side] for g in heldout]
    assert len({g["base"] for g in heldout} | {g["tuned"] for g in heldout}) > len(heldout) / 2  # varied answers


def test_limit_takes_the_first_records(tiny_model, trained_run, shards, tmp_path):
    result, heldout = run_evaluate(tiny_model, trained_run, shards, tmp_path, limit=5)
    expected = sum(is_exact_match(g["tuned"], g["reference"]) for g in heldout[:5]) / 5
    assert result["harness"]["samples"] == {"finetune_heldout": 5}
    assert result["harness"]["tuned"]["finetune_heldout"]["exact_match"] == expected


def check(tmp_path, tasks):
    args = [*settings_args(tmp_path, "harness_tasks", harness={"tasks": tasks}), "--output", str(tmp_path / "t.json")]
    harness_tasks.main(args)
    return json.loads((tmp_path / "t.json").read_text())


def test_the_check_resolves_the_workflows_own_task_without_lm_evals_index(tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "standard_tasks", lambda: pytest.fail("lm_eval's task index was built"))
    assert check(tmp_path, ["finetune_heldout"])["tasks"] == {"finetune_heldout": ["finetune_heldout"]}


def test_an_unknown_task_stops_the_check_naming_close_ones(tmp_path):
    with pytest.raises(SystemExit, match=r"'finetune_heldot' is no lm_eval task.*close: finetune_heldout"):
        check(tmp_path, ["finetune_heldot"])
    assert not (tmp_path / "t.json").exists()


def test_a_task_whose_data_is_not_cached_stops_the_check_saying_what_to_do(tmp_path, monkeypatch):
    tasks = tmp_path / "tasks"
    shutil.copytree(harness.LOCAL_TASKS, tasks)
    (tasks / "not_cached.yaml").write_text(
        "task: not_cached\ndataset_path: finetune-tests/never-cached\noutput_type: generate_until\n"
        "test_split: test\ndoc_to_text: q\ndoc_to_target: a\nmetric_list: [{metric: exact_match}]\n")
    monkeypatch.setattr(harness, "LOCAL_TASKS", tasks)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(SystemExit) as stopped:
        check(tmp_path, ["finetune_heldout", "not_cached"])
    message = str(stopped.value)
    assert "task 'not_cached' cannot load its data" in message and "finetune-tests/never-cached" in message
    assert "HF_DATASETS_OFFLINE=0" in message and "dataset_path: json" in message
    assert not (tmp_path / "t.json").exists()


def set_harness(workdir, tasks):
    import yaml
    config = workdir / "config" / "config.yaml"
    document = yaml.safe_load(config.read_text())
    document["eval"]["harness"] = {"tasks": tasks}
    config.write_text(yaml.safe_dump(document, sort_keys=False))


@pytest.mark.slow
def test_an_unknown_task_stops_the_workflow_before_any_training(tmp_path):
    from workflow import copy_workflow, snakemake
    workdir = copy_workflow(tmp_path / "wf")
    set_harness(workdir, ["finetune_heldout", "no_such_task"])
    # One job at a time: the check's priority puts it before every other ready job (with more cores,
    # jobs that need no check, such as building the tiny model, may run beside it).
    result = snakemake(workdir, "--cores", "1", check=False)
    assert result.returncode != 0 and "Error in rule harness_tasks" in result.stdout + result.stderr
    assert "'no_such_task' is no lm_eval task" in (workdir / "results/logs/harness_tasks.log").read_text()
    assert not (workdir / "results/logs/train").exists() and not (workdir / "results/logs/pretrain").exists()
    assert not (workdir / "results/harness/tasks.json").exists()


@pytest.mark.slow
def test_configuring_the_harness_on_a_finished_project_retrains_nothing(finished, tmp_path):
    from workflow import copy_project, planned_jobs
    project = copy_project(finished, tmp_path / "project")
    set_harness(project, ["finetune_heldout"])
    jobs = planned_jobs(project)
    assert "harness_tasks" in jobs and {"evaluate[run=lora-r16]", "evaluate[run=full]"} <= set(jobs)
    assert not [job for job in jobs if job.startswith(("train", "pretrain", "tokenize"))]


def test_the_workflow_task_without_held_out_answers_is_refused_before_any_job():
    from finetune.config import check_harness
    with pytest.raises(ValueError, match="eval.num_samples is 0"):
        check_harness({"eval": {"num_samples": 0, "harness": {"tasks": ["finetune_heldout"]}}})
    check_harness({"eval": {"num_samples": 8, "harness": {"tasks": ["finetune_heldout"]}}})
    check_harness({"eval": {"num_samples": 0}})
