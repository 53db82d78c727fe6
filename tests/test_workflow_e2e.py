"""The shipped default config, run end to end with Snakemake on a copy of the
workflow: the pretrained tiny base, a LoRA run and a full fine-tune, held to
the quality bar; then the incremental-rerun guarantees checked by dry runs."""
import itertools
import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import REPO
from workflow import per_run_jobs, planned_jobs, run_settings, snakemake

pytestmark = pytest.mark.slow

PER_RUN = ("train", "manifest", "evaluate", "export", "merge", "report_run")


def evaluation(workdir, run):
    return json.loads((workdir / "results/runs" / run / "eval.json").read_text())


def test_the_default_sweep_meets_the_quality_bar(finished):
    """The project's oracle: the pretrained base answers nothing right, every tuned run
    answers held-out records it never saw (thresholds of issue 11; seeds fix the margin)."""
    runs = run_settings(finished)
    exact = {run: evaluation(finished, run)["tuned"]["exact_match"] for run in runs}
    assert max(exact.values()) >= 0.6, exact
    assert all(exact[run] >= 0.4 for run, settings in runs.items() if settings.get("method", "lora") == "lora"), exact
    for run in runs:
        result = evaluation(finished, run)
        assert result["base"]["exact_match"] <= 0.05, result["base"]
        assert result["generated_for"] == result["eval_records"] >= 150 and result["eval_tokens"] >= 1000
        assert set(result["tuned"]["exact_match_by_task"]) >= {"first_word", "last_word", "count_words", "larger"}


def printed_figures(text):
    """The lines a finished workflow prints last: 'Held-out exact match ...' and one line per run."""
    lines = text.splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith("Held-out exact match"))
    runs = list(itertools.takewhile(lambda line: line.startswith("  ") and "(base " in line, lines[start + 1:]))
    return [lines[start]] + runs


def on_the_reference_machine():
    """The machine type whose figures the README quotes (docs/demo.md): AMD family 25, AVX-512."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return ("AuthenticAMD" in cpuinfo and re.search(r"^cpu family\s*: 25$", cpuinfo, flags=re.M) is not None
            and torch.backends.cpu.get_cpu_capability() == "AVX512")


def test_the_readme_quotes_what_the_default_run_printed(finished):
    """On the reference machine type the README's demo lines are exactly what the run printed; on
    another x86 CPU each run's exact match lies in the range docs/demo.md measured over kernel paths."""
    readme = (REPO / "README.md").read_text().split("<!-- demo figures", 1)[1].split("```")[1]
    quoted, printed = printed_figures(readme), printed_figures((finished.parent / "snakemake-output.txt").read_text())
    if on_the_reference_machine():
        assert printed == quoted
        return
    table = (REPO / "docs/demo.md").read_text().split("| kernel path |", 1)[1].split("\n\n", 1)[0]
    rows = [line.split("|")[2:4] for line in table.splitlines()[2:]]
    for column, run in enumerate(("lora-r16", "full")):
        values = [float(row[column]) for row in rows]
        exact = float(re.search(rf"^  {run}: ([0-9.]+)", "\n".join(printed), flags=re.M).group(1))
        assert min(values) - 0.03 <= exact <= max(values) + 0.03, (run, exact, values)


def test_pretraining_is_a_cached_stage_that_every_run_shares(finished):
    summary = json.loads((finished / "results/pretrain/tiny-llama/train_summary.json").read_text())
    assert summary["method"] == "full" and summary["trainable_parameters"] == summary["total_parameters"]
    metrics = [json.loads(line) for line in (finished / "results/pretrain/tiny-llama/metrics.jsonl").open()]
    assert metrics[-1]["loss"] < metrics[0]["loss"] / 2
    base = AutoModelForCausalLM.from_pretrained(finished / "results/base_models/tiny-llama")
    init = AutoModelForCausalLM.from_pretrained(finished / "results/pretrain/tiny-llama/init")
    assert base.config.initializer_range == 0.02, "the architecture's standard initialization"
    weight = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(base.state_dict()[weight], init.state_dict()[weight])


def test_data_stage_outputs(finished):
    (key_dir,) = (finished / "results/tokens").iterdir()
    for dataset in ("word_tasks", "number_tasks"):
        stats = json.loads((finished / f"results/data/{dataset}.stats.json").read_text())
        assert stats["records"] == len((finished / f"results/data/{dataset}.jsonl").read_text().splitlines())
        assert stats["rejected"] == 0 and (finished / f"results/data/{dataset}.rejected.jsonl").read_text() == ""
        tokenized = stats["tokenized"][key_dir.name]
        assert tokenized["records"] == stats["records"] and 0 < tokenized["length_p50"] <= tokenized["length_max"]
    assert sorted(p.name for p in key_dir.glob("*.arrow")) == ["number_tasks.arrow", "word_tasks.arrow"]
    corpus = json.loads((finished / "results/data/pretrain_corpus.stats.json").read_text())
    assert corpus["tokenized"]["tiny-llama"]["train"] == corpus["records"], "the corpus is pretraining text only"


def test_every_adapter_run_loads_with_stock_peft_and_beats_its_base(finished):
    base_dir = finished / "results/base_models/tiny-llama"
    for run, settings in run_settings(finished).items():
        if settings.get("method") == "full":
            continue
        out = finished / "results/runs" / run
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), out / "adapter")
        assert model.peft_config["default"].r == settings["r"]
        assert AutoTokenizer.from_pretrained(out / "adapter").pad_token_id is not None
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert metrics[-1]["loss"] < metrics[0]["loss"]
        assert {"step", "loss", "lr", "tokens_per_s"} <= metrics[-1].keys()
        assert evaluation(finished, run)["tuned"]["loss"] < evaluation(finished, run)["base"]["loss"] - 1.0
        page = (out / "report.html").read_text()
        assert run in page and "data:image/png;base64," in page and (out / "loss_curve.png").stat().st_size > 0


def test_a_full_run_is_a_whole_model_with_a_card_a_report_and_no_merge(finished):
    (run,) = [run for run, settings in run_settings(finished).items() if settings.get("method") == "full"]
    out = finished / "results/runs" / run
    assert not (out / "trained/adapter_config.json").exists() and not (out / "merged").exists()
    meta = yaml.safe_load((out / "model/README.md").read_text().split("---\n")[1])
    assert meta["library_name"] == "transformers" and "full" in meta["tags"] and "peft" not in meta["tags"]
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    generations = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    for generation in [g for g in generations if g["source"] == "heldout"][:6]:
        ids = tokenizer(generation["prompt"], add_special_tokens=False, return_tensors="pt").input_ids
        with torch.no_grad():
            output = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
        answer = tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True).strip()
        assert answer == generation["tuned"], "stock transformers reproduces the evaluated answers"
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["method"] == "full" and summary["trainable_parameters"] == summary["total_parameters"]
    assert "Exact match per task" in (out / "report.html").read_text()


def test_every_merged_model_loads_and_generates(finished):
    merged_runs = [run for run, s in run_settings(finished).items() if s.get("method") != "full"]
    assert merged_runs
    for run in merged_runs:
        merged = finished / "results/runs" / run / "merged"
        for folder, library in ((merged, "transformers"), (merged.parent / "adapter", "peft")):
            meta = yaml.safe_load((folder / "README.md").read_text().split("---\n")[1])
            assert meta["library_name"] == library and meta["base_model"] == "results/base_models/tiny-llama"
        assert not (merged / "adapter_config.json").exists()
        tokenizer = AutoTokenizer.from_pretrained(merged)
        model = AutoModelForCausalLM.from_pretrained(merged)
        inputs = tokenizer.apply_chat_template([{"role": "user", "content": "How many words are there?\n\nList: a b"}],
                                               add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        assert output.shape[1] > inputs["input_ids"].shape[1]


def test_samples_during_training_reach_the_run_page(finished):
    for run in run_settings(finished):
        out = finished / "results/runs" / run
        samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
        prompts = yaml.safe_load((finished / "config/config.yaml").read_text())["eval"]["prompts"]
        steps = sorted({s["step"] for s in samples})
        assert len(steps) >= 2 and all(sum(s["step"] == step for s in samples) == len(prompts) for step in steps)
        assert "Answers over training" in (out / "report.html").read_text()


def test_incremental_reruns(finished):
    assert planned_jobs(finished) == [], "a complete workflow reruns nothing"

    data = finished / "data/word_tasks.jsonl"
    original = data.read_bytes()
    record = {"instruction": "What is the first word?", "input": "List: lemon kiwi", "output": "The first word is lemon."}
    data.write_bytes(original + (json.dumps(record) + "\n").encode())
    jobs = planned_jobs(finished)
    tokenize = [j for j in jobs if j.startswith("tokenize[")]
    assert len(tokenize) == 1 and "dataset=word_tasks" in tokenize[0]
    assert jobs == sorted(["all", "validate[dataset=word_tasks]", "dataset_stats[dataset=word_tasks]", *tokenize,
                           *per_run_jobs(finished, PER_RUN), "report_sweep", "serving[model=tiny-llama]"])
    data.write_bytes(original)
    assert planned_jobs(finished) == [], "restoring the content makes it up to date again"

    config_path = finished / "config/config.yaml"
    config_text = config_path.read_text()
    config = yaml.safe_load(config_text)
    config["runs"]["lora-r16"]["r"] = 32
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    assert planned_jobs(finished) == sorted(["all", "report_sweep", "train[run=lora-r16]", "evaluate[run=lora-r16]",
                                             "export[run=lora-r16, published=adapter]", "merge[run=lora-r16]",
                                             "export[run=lora-r16, published=merged]", "report_run[run=lora-r16]",
                                             "manifest[run=lora-r16]", "settings[subject=runs/lora-r16, stage=train]",
                                             "run_settings[run=lora-r16]", "serving[model=tiny-llama]"])
    config_path.write_text(config_text)


def test_sweep_table_has_one_numeric_row_per_run(finished):
    import csv
    with open(finished / "results/report/sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["run"] for r in rows) == sorted(run_settings(finished))
    for row in rows:
        for column in ("r", "alpha", "trainable_parameters", "wall_time_s", "tokens_per_s", "peak_memory_mb",
                       "final_train_loss", "eval_loss", "perplexity", "exact_match", "rouge_l", "bleu", "chrf",
                       "exact_match:first_word", "exact_match:larger"):
            float(row[column] or "nan")
        assert float(row["eval_loss"]) < float(row["base_eval_loss"])
    assert (finished / "results/report/loss_curves.png").stat().st_size > 0


def test_snakemake_report_contains_every_run(finished):
    snakemake(finished, "--report", "report.html")
    snakemake(finished, "--report", "report.zip")
    page = (finished / "report.html").read_text()
    for run in run_settings(finished):
        assert run in page
    for name in ("sweep.html", "sweep.csv", "loss_curves.png", "eval_loss_vs_parameters.png"):
        assert name in page
    import zipfile
    names = zipfile.ZipFile(finished / "report.zip").namelist()
    assert sum(n.endswith("/report.html") and "/raw/" in n for n in names) == len(run_settings(finished))


def test_uploads_leak_no_token_anywhere(finished, tmp_path):
    """With a (fake) token set and an upload configured on a copy of the finished project, run
    the workflow against a Hub endpoint where nothing listens: the upload fails, nothing records
    it, and the token appears in no file of the project, logs included."""
    import socket
    from workflow import copy_project
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workdir = copy_project(finished, tmp_path / "project")
    (workdir / "leak.yaml").write_text("runs:\n  lora-r16:\n    hub: {repo_id: me/lora-r16, what: merged}\n")
    token = "hf_LeakCanary0123456789abcdefGHIJKL"
    env = {"HF_TOKEN": token, "HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_HUB_OFFLINE": "0"}
    result = snakemake(workdir, "results/runs/lora-r16/upload.json", "--cores", "2", "--configfile", "leak.yaml",
                       check=False, env=env)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "upload of results/runs/lora-r16/merged to me/lora-r16 failed" in output
    assert token not in output
    assert (workdir / "results/runs/lora-r16/merged/README.md").exists()
    assert not (workdir / "results/runs/lora-r16/upload.json").exists()
    written = [p for p in workdir.rglob("*") if p.is_file()]
    assert len(written) > 50
    assert [str(p) for p in written if token.encode() in p.read_bytes()] == []


def command_of(workdir, rule, run):
    """The arguments the rule passes its script for one run, as Snakemake would run it now."""
    import shlex

    from workflow import dry_run_jobs
    (shell,) = [shell for name, _, shell in dry_run_jobs(workdir, "--forcerun", rule)
                if name == rule and f"--run-name {run} " in shell]
    return shlex.split(shell.split(f"scripts/{rule}.py", 1)[1].split(" > ")[0])


def replaced(argv, **values):
    """argv with the values of some --options replaced (each option's words up to the next option)."""
    out, skipping = [], False
    for word in argv:
        if word.startswith("--"):
            skipping = word[2:].replace("-", "_") in values
            out += [word, *values[word[2:].replace("-", "_")]] if skipping else [word]
        elif not skipping:
            out.append(word)
    return out


def test_a_broken_label_mask_makes_exact_match_fall(finished, tmp_path, monkeypatch):
    """The oracle has teeth: the default LoRA run, trained on shards whose labels are
    shifted by one token (a classic masking bug), answers the held-out records wrong."""
    import pyarrow as pa

    import evaluate
    import train
    from finetune.data.prompts import IGNORE_INDEX
    from finetune.data.shards import SHARD_SCHEMA
    shards = sorted((finished / "results/tokens").glob("*/*.arrow"))
    broken = []
    for shard in shards:
        with pa.memory_map(str(shard)) as source:
            table = pa.ipc.open_stream(source).read_all()
        labels = pa.array([row[1:] + [IGNORE_INDEX] for row in table["labels"].to_pylist()], pa.list_(pa.int32()))
        broken.append(tmp_path / shard.name)
        with pa.OSFile(str(broken[-1]), "wb") as sink, pa.ipc.new_stream(sink, SHARD_SCHEMA) as writer:
            writer.write_table(table.set_column(SHARD_SCHEMA.names.index("labels"), "labels", labels))
    out = tmp_path / "run"
    monkeypatch.chdir(finished)  # the commands name the project's files relative to it
    train.main(replaced(command_of(finished, "train", "lora-r16"), shards=map(str, broken),
                        output_dir=[str(out / "trained")], metrics=[str(out / "metrics.jsonl")],
                        summary=[str(out / "summary.json")], samples=[str(out / "samples.jsonl")],
                        tensorboard_dir=[str(out / "tb")], checkpoint_dir=[str(out / "checkpoints")]))
    evaluate.main(replaced(command_of(finished, "evaluate", "lora-r16"), trained_dir=[str(out / "trained")],
                           eval_json=[str(out / "eval.json")], generations=[str(out / "generations.jsonl")]))
    broken_exact = json.loads((out / "eval.json").read_text())["tuned"]["exact_match"]
    print(f"exact match with labels shifted by one: {broken_exact:.3f}, "
          f"as shipped: {evaluation(finished, 'lora-r16')['tuned']['exact_match']:.3f}")
    assert broken_exact < 0.2 < evaluation(finished, "lora-r16")["tuned"]["exact_match"] - 0.4
