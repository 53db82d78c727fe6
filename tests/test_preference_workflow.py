"""The preference example end to end (config/preference.yaml over the default config), on a copy of the
finished default project: only the new stages run; DPO chained on the SFT run beats its parent on held-out
pairs without losing exact match; the chain is recorded; the reference pass is one per shard and shared by
a sweep; an edit reruns exactly what depends on it."""
import json
import shutil

import pytest

from workflow import copy_project, planned_jobs, snakemake

pytestmark = pytest.mark.slow
OVERLAY = ("--configfile", "config/preference.yaml")


@pytest.fixture(scope="session")
def preference_finished(finished, tmp_path_factory):
    project = copy_project(finished, tmp_path_factory.mktemp("preference") / "wf")
    result = snakemake(project, "--cores", "2", *OVERLAY, timeout=1800)
    (project.parent / "snakemake-output.txt").write_text(result.stdout + result.stderr)
    return project


def evaluation(project, run):
    return json.loads((project / "results" / "runs" / run / "eval.json").read_text())


def ran(project):
    """The rules and wildcards of the jobs the overlay's Snakemake call ran."""
    output = (project.parent / "snakemake-output.txt").read_text()
    return [line.strip() for line in output.splitlines() if line.strip().startswith(("rule ", "localrule "))], output


def test_the_overlay_trains_only_the_new_runs_on_the_finished_default_project(preference_finished):
    rules, output = ran(preference_finished)
    trained = [line for line in output.split("rule train:")[1:]]
    runs = sorted(part.split("wildcards: run=")[1].split()[0] for part in trained)
    assert runs == ["dpo", "dpo-no-sft", "orpo"], "the SFT runs are reused, not retrained"
    assert output.count("rule reference_logps:") == 2, "one reference pass per preference shard, shared by both DPO runs"
    assert "rule pretrain:" not in output


def test_dpo_chained_on_sft_beats_its_parent_and_keeps_its_exact_match(preference_finished):
    """The target: on the held-out pairs, a reward accuracy (the log-probability ratio to the pretrained base
    favors the chosen answer) >= 0.9 and clearly above the SFT parent's, and exact match not below the parent's
    (the DPO run's base is its parent, so eval.json compares the two on the same records)."""
    dpo = evaluation(preference_finished, "dpo")
    sft = evaluation(preference_finished, "lora-r16")
    assert dpo["base"]["exact_match"] == pytest.approx(sft["tuned"]["exact_match"], abs=1e-9), "base is the parent"
    assert dpo["tuned"]["reward_accuracy"] >= 0.9
    assert dpo["tuned"]["reward_accuracy"] >= dpo["base"]["reward_accuracy"] + 0.03
    assert dpo["tuned"]["preference_accuracy"] >= dpo["base"]["preference_accuracy"]
    assert dpo["tuned"]["exact_match"] >= dpo["base"]["exact_match"]
    assert set(dpo["tuned"]["preference_accuracy_by_task"]) == set(sft["tuned"]["exact_match_by_task"])


def test_the_reports_teach_why_dpo_needs_its_sft_term(preference_finished):
    """Without the SFT term DPO still learns to prefer, but pushes the chosen answers down too: its held-out
    loss on the chosen answers rises above the run with the term, and its exact match falls below it."""
    with_term, without = evaluation(preference_finished, "dpo"), evaluation(preference_finished, "dpo-no-sft")
    assert without["tuned"]["reward_accuracy"] >= 0.9
    assert without["tuned"]["chosen_logp"] < with_term["tuned"]["chosen_logp"]
    assert without["tuned"]["loss"] > with_term["tuned"]["loss"]
    assert without["tuned"]["exact_match"] < with_term["tuned"]["exact_match"]
    sweep = (preference_finished / "results" / "report" / "sweep.html").read_text()
    assert "preference accuracy" in sweep and "dpo-no-sft" in sweep


def test_orpo_learns_the_tasks_and_the_preferences_from_the_pretrained_base(preference_finished):
    orpo = evaluation(preference_finished, "orpo")
    assert orpo["tuned"]["preference_accuracy"] > orpo["base"]["preference_accuracy"]
    assert orpo["tuned"]["exact_match"] > 0.5


def test_the_chain_shows_in_the_manifest_the_run_page_and_the_model_card(preference_finished):
    runs = preference_finished / "results" / "runs"
    manifest = json.loads((runs / "dpo" / "manifest.json").read_text())
    assert manifest["chain"] == [{"base_model": "tiny-llama"},
                                 {"run": "lora-r16", "method": "lora", "objective": "sft"}]
    assert manifest["base_model"]["name_or_path"] == "results/runs/lora-r16/merged_weights"
    page = (runs / "dpo" / "report.html").read_text()
    assert "trained after base model tiny-llama -&gt; run lora-r16 (lora, sft)" in page
    assert "preference accuracy" in page
    card = (runs / "dpo" / "merged" / "README.md").read_text()
    assert "| preference_accuracy |" in card and "| reward_accuracy |" in card


def test_swapping_chosen_and_rejected_turns_preference_accuracy_below_a_half(preference_finished):
    """The evaluation has teeth: the same tuned model scored on the held-out pairs with the answers swapped."""
    import pyarrow as pa
    import torch

    from finetune.data.shards import read_shards
    from finetune.data.tokenizer import load_tokenizer
    from finetune.evaluation.preference import heldout_logps, preference_metrics
    from evaluate import models_to_compare
    project = preference_finished
    shard = next((project / "results" / "tokens").glob("*/preference_eval.arrow"))
    table = pa.ipc.open_stream(pa.OSFile(str(shard))).read_all()
    names = {"input_ids": "rejected_input_ids", "labels": "rejected_labels", "rejected_input_ids": "input_ids",
             "rejected_labels": "labels"}
    swapped = project.parent / "swapped.arrow"
    with pa.OSFile(str(swapped), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table.select([names.get(n, n) for n in table.schema.names]).rename_columns(
            table.schema.names))
    trained = project / "results" / "runs" / "dpo" / "trained"
    tokenizer = load_tokenizer(trained)
    (_, model, context), = [side for side in models_to_compare(
        project / "results" / "runs" / "lora-r16" / "merged_weights", trained, tokenizer, torch.float32,
        torch.device("cpu"))
        if side[0] == "tuned"]
    accuracy = {}
    for name, path in (("right", shard), ("swapped", swapped)):
        examples = read_shards([path], "eval")
        with context():
            chosen, rejected = heldout_logps(model, examples, 64, tokenizer.pad_token_id)
        accuracy[name] = preference_metrics(chosen, rejected, [None] * len(chosen))["preference_accuracy"]
    assert accuracy["right"] >= 0.9 and accuracy["swapped"] < 0.5, accuracy


def test_a_sweep_over_beta_trains_every_run_on_the_one_reference_pass(preference_finished, tmp_path):
    project = copy_project(preference_finished, tmp_path / "sweep")
    sweep = ("sweeps:\n  beta:\n    base: {base_model: {run: lora-r16}, objective: dpo, sft_weight: 1.0, "
             "learning_rate: 0.0005, max_steps: 300}\n    grid: {beta: [0.05, 0.5]}\n")
    (project / "config" / "sweep.yaml").write_text(sweep)
    jobs = planned_jobs(project, *OVERLAY, "config/sweep.yaml")
    assert [job for job in jobs if job.startswith("train[")] == ["train[run=beta-beta0.05]", "train[run=beta-beta0.5]"]
    assert not [job for job in jobs if job.startswith("reference_logps")], "the reference is computed already"


def test_editing_sft_data_reruns_both_runs_editing_preference_data_only_the_second(preference_finished, tmp_path):
    project = copy_project(preference_finished, tmp_path / "edits")
    words = project / "data" / "word_tasks.jsonl"
    original = words.read_text()
    words.write_text(original + json.dumps({"instruction": "What is the first word?", "input": "List: zebra moon",
                                            "output": "The first word is zebra.", "task": "first_word"}) + "\n")
    jobs = planned_jobs(project, *OVERLAY)
    trained = sorted(job for job in jobs if job.startswith("train["))
    assert trained == ["train[run=dpo-no-sft]", "train[run=dpo]", "train[run=full]", "train[run=lora-r16]"]
    assert "merge[run=lora-r16]" in jobs
    assert len([job for job in jobs if job.startswith("reference_logps")]) == 2, "the reference model changed"
    words.write_text(original)
    shutil.copy2(preference_finished / "data" / "word_tasks.jsonl", words)  # its old timestamp too

    pairs = project / "data" / "preference_train.jsonl"
    pairs.write_text(pairs.read_text() + json.dumps({"instruction": "What is the last word?", "input": "List: a b",
                                                     "chosen": "The last word is b.", "rejected": "The last word is a.",
                                                     "task": "last_word"}) + "\n")
    jobs = planned_jobs(project, *OVERLAY)
    trained = sorted(job for job in jobs if job.startswith("train["))
    assert trained == ["train[run=dpo-no-sft]", "train[run=dpo]", "train[run=orpo]"]
    references = [job for job in jobs if job.startswith("reference_logps")]
    assert len(references) == 1 and "dataset=preference_train" in references[0], "only the edited shard's reference"


def test_a_moved_preference_project_reruns_nothing(preference_finished, tmp_path):
    """The chain, the references and the reports are all relative to the project: moved, it is up to date."""
    project = copy_project(preference_finished, tmp_path / "moved")
    assert planned_jobs(project, *OVERLAY) == []


def test_the_docs_quote_what_the_example_printed(preference_finished):
    """docs/preference.md's table is what the example's eval.json files hold, on the machine type the docs
    name (elsewhere kernel paths move the SFT run's figures, and the chained runs' with them)."""
    from test_workflow_e2e import on_the_reference_machine
    if not on_the_reference_machine():
        pytest.skip("the quoted figures are those of the reference machine type (docs/demo.md)")
    from conftest import REPO
    table = (REPO / "docs" / "preference.md").read_text().split("| run | starts from |", 1)[1].split("\n\n", 1)[0]
    for line in table.splitlines()[2:]:
        cells = [cell.strip().strip("*") for cell in line.strip("|").split("|")]
        run = cells[0].split()[0]
        figures = evaluation(preference_finished, "dpo" if run == "lora-r16" else run)
        side = figures["base"] if run == "lora-r16" else figures["tuned"]
        quoted = [float(value) for value in cells[2:5]]
        assert quoted == [round(side[key], 3) for key in ("exact_match", "preference_accuracy", "reward_accuracy")], run
