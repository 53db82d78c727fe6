import math

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

import evaluate
from conftest import settings_args
from finetune.data.shards import read_shards
from finetune.data.tokenizer import load_tokenizer
from finetune.evaluation.generation import encode_prompt, generate
from finetune.evaluation.metrics import task_metrics
from finetune.settings import read_settings
from merge import merge

PROMPTS = ["Add the two numbers.", {"instruction": "Reverse the order of these words.", "input": "red blue green"}]


def run_evaluate(tiny_model, trained_run, shards, tmp_path, num_samples=4):
    records = tmp_path / "records.jsonl"
    records.write_text("".join((shard.with_suffix(".jsonl")).read_text() for shard in shards))
    args = evaluate.parse_args([
        "--base-model", str(tiny_model), "--trained-dir", str(trained_run / "trained"), "--shards", *map(str, shards),
        "--records", str(records), "--eval-json", str(tmp_path / "eval.json"), "--generations", str(tmp_path / "g.jsonl"),
        "--run-name", "test-run",
        *settings_args(tmp_path, "evaluate", prompts=PROMPTS, num_samples=num_samples, max_new_tokens=8,
                       batch_size=3)])
    return evaluate.evaluate(args, read_settings(args.settings, "evaluate"))


def test_eval_reports_base_and_tuned_side_by_side(tiny_model, trained_run, shards, tmp_path):
    result, generations = run_evaluate(tiny_model, trained_run, shards, tmp_path)
    for side in ("base", "tuned"):
        assert math.isclose(result[side]["perplexity"], math.exp(result[side]["loss"]))
    assert result["tuned"]["loss"] < result["base"]["loss"]
    assert result["eval_records"] == len(read_shards(shards, "eval")) > 0 and result["eval_tokens"] > 0
    assert [g["source"] for g in generations] == ["prompt"] * 2 + ["heldout"] * 4
    assert all(g["reference"] for g in generations[2:])
    for side in ("base", "tuned"):
        for metric in ("exact_match", "rouge_l", "bleu", "chrf"):
            assert isinstance(result[side][metric], float)


def test_task_metrics_against_known_values():
    perfect = task_metrics(["green blue red", "forty-two"], ["green blue red", "forty-two"])
    assert perfect["exact_match"] == 1.0 and perfect["rouge_l"] == 1.0 and perfect["chrf"] == 100.0
    half = task_metrics(["green blue red", "seven"], ["green blue red", "forty-two"])
    assert half["exact_match"] == 0.5 and 0.4 < half["rouge_l"] < 0.6
    partial = task_metrics(["red blue"], ["red green blue"])
    assert partial["rouge_l"] == 0.8 and partial["exact_match"] == 0.0


def test_generation_prompts_are_formatted_like_training(tiny_model, trained_run, shards, tmp_path):
    _, generations = run_evaluate(tiny_model, trained_run, shards, tmp_path)
    tokenizer = load_tokenizer(trained_run / "trained")
    record = {"format": "alpaca", "instruction": PROMPTS[1]["instruction"], "input": PROMPTS[1]["input"], "output": ""}
    assert generations[1]["prompt"] == tokenizer.decode(encode_prompt(record, tokenizer, "chat")[0])
    assert generations[1]["prompt"] == "<s><|user|>\nReverse the order of these words.\n\nred blue green\n<|assistant|>\n"


def test_batched_left_padded_generation_matches_one_by_one(tiny_model, trained_run):
    tokenizer = load_tokenizer(trained_run / "trained")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), trained_run / "trained")
    prompts = [tokenizer(text).input_ids for text in ["Add", "Sort these words alphabetically. red blue"]]
    settings = dict(max_new_tokens=6, temperature=0.0, top_p=1.0, seed=0, stop_ids=[tokenizer.eos_token_id])
    batched = generate(model, tokenizer, prompts, batch_size=2, **settings)
    single = [generate(model, tokenizer, [p], batch_size=1, **settings)[0] for p in prompts]
    assert batched == single


def test_merged_model_matches_adapter_logits_and_loads_without_peft(tiny_model, trained_run, tmp_path):
    merged_dir = merge(tiny_model, trained_run / "trained", tmp_path / "merged")
    assert not (merged_dir / "adapter_config.json").exists()
    assert (merged_dir / "model.safetensors").exists() and (merged_dir / "generation_config.json").exists()
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), trained_run / "trained")
    inputs = tokenizer(["What is the first word?\n\nred blue green"], return_tensors="pt")
    with torch.no_grad():
        expected = adapted(**inputs).logits
        actual = merged(**inputs).logits
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        output = merged.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert output.shape[1] > inputs["input_ids"].shape[1]
    assert not (tmp_path / "merged.partial").exists()


def test_a_leading_reasoning_block_is_not_part_of_the_scored_answer():
    scores = task_metrics(["<think>\n\n</think>\n\nThe first word is tiger.", "<think>tiger?</think> tiger",
                           "tiger <think>x</think>"], ["The first word is tiger.", "tiger", "tiger"])
    assert scores["exact_match"] == 2 / 3


def test_exact_match_per_task_kind():
    result = task_metrics(["The first word is red.", "wrong", "There are two words."],
                          ["The first word is red.", "The first word is sky.", "There are two words."],
                          ["first_word", "first_word", "count_words"])
    assert result["exact_match_by_task"] == {"count_words": 1.0, "first_word": 0.5}
    assert result["exact_match"] == 2 / 3
