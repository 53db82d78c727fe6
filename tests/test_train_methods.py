"""Each adapter method trains on the tiny model on CPU; hardware it cannot use is refused before training."""
import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import train
from conftest import settings_args
from finetune.data.batches import pack_batch, pad_batch
from finetune.data.prompts import count_trained_tokens
from finetune.data.shards import read_shards
from finetune.models import load_base_model
from finetune.training import adapters


def run_train(tmp_path, tiny_model, shards, *paths, name="run", **settings):
    """train.main on the shards with `paths` (more path flags) and `settings` over log_every 5 and fp32;
    the settings file lies beside the run folder, not in it."""
    out = tmp_path / name
    settings = {"log_every": 5, "precision": "fp32", **settings}
    train.main(["--base-model", str(tiny_model), "--shards", *map(str, shards), "--output-dir", str(out / "trained"),
                "--metrics", str(out / "metrics.jsonl"), "--summary", str(out / "summary.json"),
                "--run-name", name, *paths, *settings_args(tmp_path / "settings" / name, "train", **settings)])
    return out


def metrics_of(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method, expected_type", [
    ("lora", "LORA"), ("dora", "LORA"), ("adalora", "ADALORA"), ("qlora", "LORA")])
def test_each_method_trains_and_saves_a_loadable_adapter(tmp_path, tiny_model, shards, method, expected_type):
    out = run_train(tmp_path, tiny_model, shards, method=method, max_steps=20, learning_rate=1e-2,
                    target_modules="all-linear", name=method)
    rows = metrics_of(out)
    assert rows[-1]["loss"] < rows[0]["loss"]
    config = json.loads((out / "trained" / "adapter_config.json").read_text())
    assert config["peft_type"] == expected_type
    assert config.get("use_dora", False) == (method == "dora")
    if method == "adalora":
        assert config["total_step"] == 20 and config["target_r"] == 8 and config["init_r"] == 12
        assert config["tinit"] + config["tfinal"] < config["total_step"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), out / "trained")
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 200, 300]])).logits
    assert torch.isfinite(logits).all()
    assert json.loads((out / "summary.json").read_text())["method"] == method


def quantized_base_of(monkeypatch, tmp_path, tiny_model, shards, **settings):
    """(type of a base linear layer, quantization config) as training saw them, and the run folder."""
    seen = {}
    original = adapters.prepare_model_for_kbit_training

    def spy(model, **kwargs):
        seen["linear"] = type(model.model.layers[0].self_attn.q_proj).__name__
        seen["quantization"] = model.config.quantization_config
        return original(model, **kwargs)

    monkeypatch.setattr(adapters, "prepare_model_for_kbit_training", spy)
    out = run_train(tmp_path, tiny_model, shards, max_steps=4, learning_rate=1e-2, **settings)
    quantization = seen["quantization"]
    return seen["linear"], quantization if isinstance(quantization, dict) else quantization.to_dict(), out


def test_qlora_quantizes_the_base_to_4bit_nf4(tmp_path, tiny_model, shards, monkeypatch):
    linear, quantization, _ = quantized_base_of(monkeypatch, tmp_path, tiny_model, shards, method="qlora")
    assert linear == "Linear4bit"
    assert quantization["bnb_4bit_quant_type"] == "nf4" and quantization["bnb_4bit_use_double_quant"]


@pytest.mark.parametrize("method", ["lora", "adalora"])
def test_adapters_train_on_an_8bit_base(tmp_path, tiny_model, shards, monkeypatch, method):
    linear, quantization, out = quantized_base_of(monkeypatch, tmp_path, tiny_model, shards, method=method,
                                                  quantization="8bit")
    assert linear == "Linear8bitLt" and quantization["load_in_8bit"]
    assert json.loads((out / "summary.json").read_text())["quantization"] == "8bit"
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in metrics_of(out))
    assert (out / "trained" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("settings, message", [
    ({"method": "full", "quantization": "4bit"}, "method full trains every weight"),
    ({"method": "qlora", "quantization": "8bit"}, "qlora is LoRA on a 4bit base"),
])
def test_quantization_that_does_not_fit_the_method_is_refused(tmp_path, tiny_model, shards, settings, message):
    with pytest.raises(SystemExit) as refused:
        run_train(tmp_path, tiny_model, shards, max_steps=2, **settings)
    assert message in str(refused.value.code)


def test_target_modules_the_architecture_lacks_are_named_with_the_ones_it_has(tmp_path, tiny_model, shards):
    with pytest.raises(SystemExit, match=r"\[run\] target_modules c_attn, qkv: Llama models have no such layer. "
                                         r"Their adaptable layers are: down_proj, gate_proj, k_proj, o_proj, q_proj, "
                                         r"up_proj, v_proj \(or use all-linear\)"):
        run_train(tmp_path, tiny_model, shards, max_steps=2, target_modules=["q_proj", "c_attn", "qkv"])
    assert not (tmp_path / "run").exists(), "stopped before anything was written"


@pytest.mark.parametrize("settings, message", [
    ({"attn_implementation": "flash_attention_2"}, "flash_attention_2 needs a CUDA GPU"),
    ({"precision": "fp16"}, "precision fp16 needs a CUDA GPU"),
    ({"optimizer": "paged_adamw_8bit"}, "paged_adamw_8bit pages optimizer state between GPU and CPU"),
    ({"method": "dora", "quantization": "8bit"}, "DoRA on an 8bit base fails inside bitsandbytes on CPU"),
])
def test_unusable_hardware_choices_stop_before_training(tmp_path, tiny_model, shards, settings, message):
    with pytest.raises(SystemExit, match=rf"\[run\] cannot train on cpu: .*{message}"):
        run_train(tmp_path, tiny_model, shards, max_steps=2, **settings)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_adalora_schedule_leaves_a_budget_phase():
    for total in (1, 2, 3, 5, 10, 100, 1000):
        tinit, tfinal, delta_t = adapters.adalora_schedule(total)
        assert tinit + tfinal < total and delta_t >= 1


def test_packed_batch_gives_the_same_per_token_loss_as_padded_records(tiny_model, shards):
    examples = read_shards(shards, "train")[:6]
    model = load_base_model(tiny_model).eval()
    padded = pad_batch(examples, pad_token_id=0)
    packed = pack_batch(examples)
    tokens = count_trained_tokens(padded["labels"])
    assert count_trained_tokens(packed["labels"]) == tokens
    assert packed["input_ids"].shape == (1, sum(len(e["input_ids"]) for e in examples))
    with torch.no_grad():
        padded_loss = model(**padded, num_items_in_batch=tokens, use_cache=False).loss
        packed_loss = model(**packed, num_items_in_batch=tokens, use_cache=False).loss
        # Without restarting positions per record, the records would see each other:
        leaky = model(input_ids=packed["input_ids"], labels=packed["labels"], num_items_in_batch=tokens,
                      use_cache=False).loss
    torch.testing.assert_close(packed_loss, padded_loss, atol=1e-4, rtol=1e-4)
    assert abs(leaky - padded_loss) > 1e-3


def test_packed_training_runs_and_reports_it(tmp_path, tiny_model, shards):
    out = run_train(tmp_path, tiny_model, shards, packing="on", max_steps=10, learning_rate=1e-2)
    assert json.loads((out / "summary.json").read_text())["packing"] is True
    assert metrics_of(out)[-1]["loss"] < metrics_of(out)[0]["loss"]


def test_tensorboard_events_are_written(tmp_path, tiny_model, shards):
    out = run_train(tmp_path, tiny_model, shards, "--tensorboard-dir", str(tmp_path / "tb"), max_steps=10,
                    log_every=5)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    losses = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert losses == [(r["step"], pytest.approx(r["loss"], rel=1e-5)) for r in metrics_of(out)]


def test_8bit_adamw_trains_on_cpu(tmp_path, tiny_model, shards):
    out = run_train(tmp_path, tiny_model, shards, optimizer="adamw_8bit", max_steps=10, learning_rate=1e-2,
                    target_modules="all-linear")
    assert metrics_of(out)[-1]["loss"] < metrics_of(out)[0]["loss"]


def test_full_fine_tuning_trains_every_parameter_and_saves_a_whole_model(tmp_path, tiny_model, shards):
    out = run_train(tmp_path, tiny_model, shards, method="full", max_steps=20, learning_rate=1e-3, name="full")
    rows = metrics_of(out)
    assert rows[-1]["loss"] < rows[0]["loss"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "full" and summary["trainable_parameters"] == summary["total_parameters"]
    assert not (out / "trained" / "adapter_config.json").exists()
    tuned = AutoModelForCausalLM.from_pretrained(out / "trained")
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    changed = [name for name, weight in tuned.state_dict().items() if not torch.equal(weight, base.state_dict()[name])]
    assert "model.embed_tokens.weight" in changed and "model.layers.0.mlp.up_proj.weight" in changed


def test_samples_over_training_go_to_jsonl_and_tensorboard(tmp_path, tiny_model, shards):
    prompts = ["What is the first word?", {"instruction": "Add", "input": "2 and 3", "output": "5"}]
    out = run_train(tmp_path, tiny_model, shards, "--samples", str(tmp_path / "samples.jsonl"),
                    "--tensorboard-dir", str(tmp_path / "tb"), max_steps=10, sample_every=4, prompts=prompts,
                    max_new_tokens=3)
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [4, 4, 8, 8, 10, 10], "every sample_every steps and at the end"
    assert [s["reference"] for s in samples[:2]] == ["", "5"]
    assert samples[1]["prompt"].endswith("<|assistant|>\n") and "2 and 3" in samples[1]["prompt"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"tensors": 0})
    events.Reload()
    assert [e.step for e in events.Tensors("samples/text_summary")] == [4, 8, 10]
    assert metrics_of(out)


def test_samples_survive_a_resume(tmp_path, tiny_model, shards):
    """A rerun that resumes from a checkpoint writes the samples made before the kill again."""
    from finetune.training import checkpoints
    paths = ["--samples", str(tmp_path / "samples.jsonl"), "--checkpoint-dir", str(tmp_path / "ckpt")]
    settings = dict(max_steps=8, sample_every=2, prompts=["What is the first word?"], max_new_tokens=2,
                    checkpoint_every=4)
    original_save = checkpoints.save_checkpoint

    def save_then_stop(run, step, elapsed):
        original_save(run, step, elapsed)
        raise KeyboardInterrupt("killed after the checkpoint at step 4")

    train.save_checkpoint = save_then_stop
    try:
        with pytest.raises(KeyboardInterrupt):
            run_train(tmp_path, tiny_model, shards, *paths, **settings)
    finally:
        train.save_checkpoint = original_save
    run_train(tmp_path, tiny_model, shards, *paths, **settings)
    steps = [json.loads(line)["step"] for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6, 8]


def test_adalora_resumes_to_the_same_adapter_as_an_uninterrupted_run(tmp_path, tiny_model, shards, monkeypatch):
    """AdaLoRA's rank allocator (importance estimates, budget) is part of the checkpoint."""
    settings = dict(method="adalora", max_steps=20, learning_rate=1e-2, target_modules="all-linear")
    straight = run_train(tmp_path, tiny_model, shards, **settings, name="straight")
    checkpoints = ["--checkpoint-dir", str(tmp_path / "checkpoints")]
    original_step = train.train_step

    def interrupted(run, step):
        if step == 15:
            raise KeyboardInterrupt
        return original_step(run, step)

    monkeypatch.setattr(train, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_train(tmp_path, tiny_model, shards, *checkpoints, **settings, checkpoint_every=6, name="resumed")
    monkeypatch.setattr(train, "train_step", original_step)
    resumed = run_train(tmp_path, tiny_model, shards, *checkpoints, **settings, checkpoint_every=6, name="resumed")
    assert json.loads((resumed / "summary.json").read_text())["resumed_from_step"] == 12
    expected = load_file(straight / "trained" / "adapter_model.safetensors")
    got = load_file(resumed / "trained" / "adapter_model.safetensors")
    assert expected.keys() == got.keys()
    assert all(torch.allclose(expected[name], got[name], atol=1e-6) for name in expected)
    config = json.loads((resumed / "trained" / "adapter_config.json").read_text())
    assert config["rank_pattern"], "the budget phase ended and fixed the ranks"
    assert config["rank_pattern"] == json.loads((straight / "trained" / "adapter_config.json").read_text())["rank_pattern"]


@pytest.mark.parametrize("method", [{"method": "lora"}, {"method": "qlora"},
                                    {"method": "lora", "quantization": "8bit"}], ids=["lora", "qlora", "8bit"])
def test_evaluations_and_samples_during_training_do_not_change_what_is_learned(tmp_path, tiny_model, shards, method):
    """Sampling must not reseed the dropout's random stream; and bitsandbytes repacks 4-bit weights
    for fast CPU inference the first time a layer runs in eval mode, which must not reach training
    (on the repacked weights no gradient flows through the base layers)."""
    settings = dict(**method, max_steps=6, learning_rate=1e-2, target_modules="all-linear")
    quiet = run_train(tmp_path, tiny_model, shards, **settings, name="quiet")
    busy = run_train(tmp_path, tiny_model, shards, **settings, eval_every=2, sample_every=2,
                     prompts=["What is the first word?"], max_new_tokens=3, name="busy")
    expected = load_file(quiet / "trained" / "adapter_model.safetensors")
    got = load_file(busy / "trained" / "adapter_model.safetensors")
    assert all(torch.allclose(expected[name], got[name], atol=1e-5) for name in expected)
