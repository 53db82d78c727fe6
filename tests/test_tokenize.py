import datasets
import pytest

from common import IGNORE_INDEX, encode_prompt, encode_record, format_segments, in_eval_split, read_shards
from tokenize_data import tokenize_file

ALPACA = {"format": "alpaca", "instruction": "Reverse the order of these words.", "input": "red blue green",
          "output": "green blue red"}
CHAT = {"format": "chat", "messages": [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is the first word?\n\nred blue"},
    {"role": "assistant", "content": "red"},
    {"role": "user", "content": "And the last?"},
    {"role": "assistant", "content": "blue"},
]}


def trained_text(tokenizer, labels):
    return tokenizer.decode([t for t in labels if t != IGNORE_INDEX])


def test_alpaca_template_masks_prompt_and_trains_on_output_and_eos(tiny_tokenizer):
    tok = tiny_tokenizer
    ids, labels, truncated = encode_record(ALPACA, tok, "alpaca", max_length=256)
    # Independent reference: the seed's prompt string, tokenized by hand.
    prompt = "### Instruction:\nReverse the order of these words.\n\n### Input:\nred blue green\n\n### Response:\n"
    expected_prompt = [tok.bos_token_id] + tok(prompt, add_special_tokens=False).input_ids
    expected_answer = tok("green blue red", add_special_tokens=False).input_ids + [tok.eos_token_id]
    assert ids == expected_prompt + expected_answer
    assert labels == [IGNORE_INDEX] * len(expected_prompt) + expected_answer
    assert not truncated


def test_chat_template_matches_rendering_the_whole_conversation(tiny_tokenizer):
    tok = tiny_tokenizer
    ids, labels, _ = encode_record(CHAT, tok, "chat", max_length=256)
    full = tok.apply_chat_template(CHAT["messages"], tokenize=False)
    assert ids == tok(full, add_special_tokens=False).input_ids
    assert ids.count(tok.bos_token_id) == 1 and ids[-1] == tok.eos_token_id
    # Loss only on the two assistant answers, each with its EOS.
    trained = [t for t in labels if t != IGNORE_INDEX]
    assert trained == (tok("red", add_special_tokens=False).input_ids + [tok.eos_token_id]
                       + tok("blue", add_special_tokens=False).input_ids + [tok.eos_token_id])


def test_train_on_inputs_trains_every_token(tiny_tokenizer):
    ids, labels, _ = encode_record(ALPACA, tiny_tokenizer, "alpaca", max_length=256, train_on_inputs=True)
    assert labels[1:] == ids[1:]


def test_completion_records_train_on_all_text(tiny_tokenizer):
    record = {"format": "completion", "text": "apple river stone"}
    ids, labels, _ = encode_record(record, tiny_tokenizer, "chat", max_length=256)
    assert ids[0] == tiny_tokenizer.bos_token_id and ids[-1] == tiny_tokenizer.eos_token_id
    assert trained_text(tiny_tokenizer, labels) == "apple river stone</s>"


def test_truncation_is_flagged(tiny_tokenizer):
    ids, labels, truncated = encode_record(ALPACA, tiny_tokenizer, "alpaca", max_length=10)
    assert truncated and len(ids) == len(labels) == 10


@pytest.mark.parametrize("template", ["alpaca", "chat"])
@pytest.mark.parametrize("record", [ALPACA, CHAT], ids=["alpaca", "chat"])
def test_generation_prompt_is_exactly_the_training_prefix(tiny_tokenizer, template, record):
    """Training and inference format prompts with the same function: the prompt
    used for generation is the training sequence up to the last answer."""
    ids, labels, _ = encode_record(record, tiny_tokenizer, template, max_length=256)
    prompt_ids, reference = encode_prompt(record, tiny_tokenizer, template)
    assert ids[:len(prompt_ids)] == prompt_ids
    assert trained_text(tiny_tokenizer, labels[len(prompt_ids):]) == reference + "</s>"


def test_prompt_segments_differ_by_template(tiny_tokenizer):
    alpaca = format_segments(ALPACA, tiny_tokenizer, "alpaca")
    chat = format_segments(ALPACA, tiny_tokenizer, "chat")
    assert alpaca[0][0].startswith("### Instruction:") and chat[0][0].startswith("<s><|user|>")
    assert alpaca[-1] == ("green blue red", True)


def test_split_is_by_content_hash_not_position(example_records):
    held_out = {r["id"] for r in example_records if in_eval_split(r["id"], 0.1)}
    assert 0.05 < len(held_out) / len(example_records) < 0.15
    reordered = list(reversed(example_records))
    assert held_out == {r["id"] for r in reordered if in_eval_split(r["id"], 0.1)}


def test_shard_is_arrow_readable_by_datasets(tmp_path, tiny_tokenizer, example_records):
    import json
    records_path = tmp_path / "records.jsonl"
    records_path.write_text("".join(json.dumps(r) + "\n" for r in example_records[:50]))
    stats = tokenize_file(records_path, tiny_tokenizer, "auto", 64, tmp_path / "shard.arrow", batch_size=16)
    shard = datasets.Dataset.from_file(str(tmp_path / "shard.arrow"))
    assert shard.num_rows == stats["records"] == 50
    assert set(shard.column_names) >= {"id", "input_ids", "labels", "length"}
    assert stats["template"] == "chat" and stats["length_max"] <= 64
    row = shard[0]
    assert len(row["input_ids"]) == len(row["labels"]) == row["length"]
    assert row["input_ids"][-1] == tiny_tokenizer.eos_token_id and row["labels"][-1] == tiny_tokenizer.eos_token_id
    train = read_shards([tmp_path / "shard.arrow"], "train", 0.1)
    held_out = read_shards([tmp_path / "shard.arrow"], "eval", 0.1)
    assert len(train) + len(held_out) == 50 and not {e["id"] for e in train} & {e["id"] for e in held_out}
    assert not (tmp_path / "shard.arrow.partial").exists()
