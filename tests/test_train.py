import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

import train
from conftest import TRAIN_STEPS, settings_args
from finetune.data.batches import length_grouped_batches
from finetune.models import load_base_model
from finetune.training import adapters


def read_metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_adapter_loads_with_stock_peft(trained_run, tiny_model):
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), trained_run / "trained")
    config = model.peft_config["default"]
    assert config.r == 8 and config.lora_alpha == 16 and set(config.target_modules) == {"q_proj", "v_proj"}
    lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b), "training left LoRA B at its zero init"


def test_tokenizer_is_saved_beside_the_adapter(trained_run, tiny_model):
    saved = AutoTokenizer.from_pretrained(trained_run / "trained")
    base = AutoTokenizer.from_pretrained(tiny_model)
    assert saved.get_vocab() == base.get_vocab() and saved.chat_template == base.chat_template


def test_metrics_log_every_step_window_and_loss_decreases(trained_run):
    rows = read_metrics(trained_run)
    assert [r["step"] for r in rows] == list(range(10, TRAIN_STEPS + 1, 10))
    for row in rows:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "elapsed_s"} <= row.keys()
        assert row["tokens_per_s"] > 0
    assert rows[-1]["loss"] < rows[0]["loss"]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert len(evals) == 2 and evals[-1] < evals[0]
    assert rows[-1]["lr"] < rows[0]["lr"], "cosine schedule decays"


def test_summary(trained_run):
    summary = json.loads((trained_run / "train_summary.json").read_text())
    assert summary["steps"] == TRAIN_STEPS and summary["precision"] == "fp32"
    assert 0 < summary["trainable_parameters"] < summary["total_parameters"]
    assert summary["train_records"] + summary["eval_records"] == 400


def test_length_grouped_batches_cover_every_record_once():
    lengths = [(i * 37) % 200 + 5 for i in range(1000)]
    batches = length_grouped_batches(lengths, batch_size=8, seed=3)
    flat = [i for batch in batches for i in batch]
    assert sorted(flat) == list(range(1000))
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    assert padded < 1.1 * sum(lengths), "batches group records of similar length"
    assert batches != length_grouped_batches(lengths, batch_size=8, seed=4)


def test_nan_loss_stops_the_run_without_writing_an_adapter(tmp_path, tiny_model, shards, monkeypatch):
    def load_broken_model(*args, **kwargs):
        model = load_base_model(*args, **kwargs)
        with torch.no_grad():
            model.get_input_embeddings().weight[5:50] = float("nan")
        return model

    monkeypatch.setattr(adapters, "load_base_model", load_broken_model)
    with pytest.raises(SystemExit, match=r"\[diverge\] loss is nan at step 1: .*learning rate"):
        train.main(["--base-model", str(tiny_model), "--shards", *map(str, shards),
                    "--output-dir", str(tmp_path / "trained"), "--metrics", str(tmp_path / "metrics.jsonl"),
                    "--summary", str(tmp_path / "summary.json"), "--run-name", "diverge",
                    *settings_args(tmp_path, "train", max_steps=5)])
    assert not (tmp_path / "trained").exists() and not (tmp_path / "summary.json").exists()


def test_precision_auto_is_fp32_on_cpu():
    from finetune.models import resolve_precision
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
