"""The shipped default config, run end to end with Snakemake on a copy of the
workflow, then the incremental-rerun guarantees checked by dry runs."""
import json

import pytest
import torch
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from workflow import planned_jobs, snakemake

pytestmark = pytest.mark.slow


def runs_of(workdir):
    return yaml.safe_load((workdir / "config" / "config.yaml").read_text())["runs"]


def test_data_stage_outputs(finished):
    (key_dir,) = (finished / "results/tokens").iterdir()
    for dataset in ("word_tasks", "number_tasks"):
        stats = json.loads((finished / f"results/data/{dataset}.stats.json").read_text())
        assert stats["records"] == len((finished / f"results/data/{dataset}.jsonl").read_text().splitlines())
        assert stats["rejected"] == 0 and (finished / f"results/data/{dataset}.rejected.jsonl").read_text() == ""
        tokenized = stats["tokenized"][key_dir.name]
        assert tokenized["records"] == stats["records"] and 0 < tokenized["length_p50"] <= tokenized["length_max"]
    assert sorted(p.name for p in key_dir.glob("*.arrow")) == ["number_tasks.arrow", "word_tasks.arrow"]


def test_every_run_has_a_loadable_adapter_better_than_base(finished):
    base_dir = finished / "results/base_models/tiny-llama"
    for run, settings in runs_of(finished).items():
        out = finished / "results/runs" / run
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), out / "adapter")
        assert model.peft_config["default"].r == settings["r"]
        assert AutoTokenizer.from_pretrained(out / "adapter").pad_token_id is not None
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert metrics[-1]["loss"] < metrics[0]["loss"]
        assert {"step", "loss", "lr", "tokens_per_s"} <= metrics[-1].keys()
        evaluation = json.loads((out / "eval.json").read_text())
        assert evaluation["tuned"]["loss"] < evaluation["base"]["loss"] - 1.0, "tuned must be clearly better"
        assert (out / "generations.jsonl").read_text().strip()
        page = (out / "report.html").read_text()
        assert run in page and "data:image/png;base64," in page and (out / "loss_curve.png").stat().st_size > 0


def test_every_run_has_a_merged_model_that_generates(finished):
    for run in runs_of(finished):
        merged = finished / "results/runs" / run / "merged"
        for folder, library in ((merged, "transformers"), (merged.parent / "adapter", "peft")):
            meta = yaml.safe_load((folder / "README.md").read_text().split("---\n")[1])
            assert meta["library_name"] == library and meta["base_model"] == "results/base_models/tiny-llama"
        assert not (merged / "adapter_config.json").exists()
        tokenizer = AutoTokenizer.from_pretrained(merged)
        model = AutoModelForCausalLM.from_pretrained(merged)
        inputs = tokenizer.apply_chat_template([{"role": "user", "content": "Add the two numbers.\n\n3 and 4"}],
                                               add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        assert output.shape[1] > inputs["input_ids"].shape[1]


def test_incremental_reruns(finished):
    assert planned_jobs(finished) == [], "a complete workflow reruns nothing"

    data = finished / "data/word_tasks.jsonl"
    original = data.read_bytes()
    record = {"instruction": "What is the first word?", "input": "lemon kiwi", "output": "lemon"}
    data.write_bytes(original + (json.dumps(record) + "\n").encode())
    runs = sorted(runs_of(finished))
    per_run = [f"{rule}[run={run}]" for run in runs
               for rule in ("evaluate", "export_adapter", "merge", "report_run", "train")]
    jobs = planned_jobs(finished)
    tokenize = [j for j in jobs if j.startswith("tokenize[")]
    assert len(tokenize) == 1 and "dataset=word_tasks" in tokenize[0]
    assert jobs == sorted(["all", "validate[dataset=word_tasks]", "dataset_stats[dataset=word_tasks]", *tokenize,
                           *per_run, "report_sweep"])
    data.write_bytes(original)
    assert planned_jobs(finished) == [], "restoring the content makes it up to date again"

    config_path = finished / "config/config.yaml"
    config_text = config_path.read_text()
    config = yaml.safe_load(config_text)
    changed = runs[0]
    config["runs"][changed]["r"] = config["runs"][changed]["r"] * 2
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    assert planned_jobs(finished) == sorted(
        ["all", "report_sweep"] + [f"{rule}[run={changed}]"
                                   for rule in ("evaluate", "export_adapter", "merge", "report_run", "train")])
    config_path.write_text(config_text)


def test_sweep_table_has_one_numeric_row_per_run(finished):
    import csv
    with open(finished / "results/report/sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["run"] for r in rows) == sorted(runs_of(finished))
    for row in rows:
        for column in ("r", "alpha", "trainable_parameters", "wall_time_s", "tokens_per_s", "peak_memory_mb",
                       "final_train_loss", "eval_loss", "perplexity", "exact_match", "rouge_l", "bleu", "chrf"):
            float(row[column])
        assert float(row["eval_loss"]) < float(row["base_eval_loss"])
    assert (finished / "results/report/loss_curves.png").stat().st_size > 0


def test_snakemake_report_contains_every_run(finished):
    snakemake(finished, "--report", "report.html")
    snakemake(finished, "--report", "report.zip")
    page = (finished / "report.html").read_text()
    for run in runs_of(finished):
        assert run in page
    for name in ("sweep.html", "sweep.csv", "loss_curves.png", "eval_loss_vs_parameters.png"):
        assert name in page
    import zipfile
    names = zipfile.ZipFile(finished / "report.zip").namelist()
    assert sum(n.endswith("/report.html") and "/raw/" in n for n in names) == len(runs_of(finished))


def test_uploads_leak_no_token_anywhere(tmp_path):
    """With a (fake) token set and an upload configured, run the workflow against a
    Hub endpoint where nothing listens: the upload fails, nothing records it, and
    the token appears in no file the workflow wrote, logs included."""
    import socket
    from workflow import copy_workflow
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workdir = copy_workflow(tmp_path / "wf")
    (workdir / "leak.yaml").write_text("run_defaults:\n  max_steps: 30\n  eval_every: 0\n"
                                       "runs:\n  r8-qv:\n    hub: {repo_id: me/r8-qv, what: merged}\n")
    token = "hf_LeakCanary0123456789abcdefGHIJKL"
    env = {"HF_TOKEN": token, "HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_HUB_OFFLINE": "0"}
    result = snakemake(workdir, "--cores", "2", "--keep-going", "--configfile", "leak.yaml", check=False, env=env)
    assert result.returncode != 0 and "upload of results/runs/r8-qv/merged to me/r8-qv failed" in result.stdout + result.stderr
    assert token not in result.stdout + result.stderr
    assert (workdir / "results/runs/r8-qv/merged/README.md").exists() and not (workdir / "results/runs/r8-qv/upload.json").exists()
    written = [p for p in workdir.rglob("*") if p.is_file()]
    assert len(written) > 50
    assert [str(p) for p in written if token.encode() in p.read_bytes()] == []
