import json

import datasets
import numpy as np
import pytest

from finetune.data.prompts import IGNORE_INDEX, encode_batch, encode_record, format_segments, tokenize_texts
from finetune.data.shards import read_shards
from finetune.data.tokenization import in_eval_split, tokenize_file
from finetune.data.tokenizer import load_tokenizer
from finetune.evaluation.generation import encode_prompt

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


def write_records(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_shard_is_arrow_readable_by_datasets(tmp_path, tiny_tokenizer, example_records):
    records = write_records(tmp_path / "records.jsonl", example_records[:50])
    stats = tokenize_file(records, tiny_tokenizer, "auto", 64, tmp_path / "shard.arrow", batch_size=16)
    shard = datasets.Dataset.from_file(str(tmp_path / "shard.arrow"))
    assert shard.num_rows == stats["records"] == 50 == stats["train"] + stats["eval"]
    assert shard.column_names == ["id", "split", "input_ids", "labels", "length"]
    assert stats["template"] == "chat"
    row = shard[0]
    assert len(row["input_ids"]) == len(row["labels"]) == row["length"] <= 64
    assert row["input_ids"][-1] == tiny_tokenizer.eos_token_id and row["labels"][-1] == tiny_tokenizer.eos_token_id
    train, held_out = read_shards([tmp_path / "shard.arrow"], "train"), read_shards([tmp_path / "shard.arrow"], "eval")
    assert (len(train), len(held_out)) == (stats["train"], stats["eval"])
    assert not {e["id"] for e in train} & {e["id"] for e in held_out}
    assert all(in_eval_split(e["id"], 0.1) for e in held_out)
    assert not (tmp_path / "shard.arrow.partial").exists()


def test_streamed_examples_are_the_shards_rows_in_order(tmp_path, tiny_tokenizer, example_records):
    """Training reads shards through memory maps, a batch at a time: the examples it gets are
    exactly the rows of the split, in file order, however they are asked for."""
    paths = []
    for name, part in [("a", example_records[:120]), ("b", example_records[120:200])]:
        tokenize_file(write_records(tmp_path / f"{name}.jsonl", part), tiny_tokenizer, "auto", 64,
                      tmp_path / f"{name}.arrow", batch_size=16)
        paths.append(tmp_path / f"{name}.arrow")
    rows = [row for path in paths for row in datasets.Dataset.from_file(str(path))]
    for split in ("train", "eval"):
        expected = [{k: row[k] for k in ("id", "input_ids", "labels")} for row in rows if row["split"] == split]
        examples = read_shards(paths, split)
        assert len(examples) == len(expected) > 0
        assert list(examples) == expected == examples[:]
        assert examples[-1] == expected[-1] and examples[[2, 0]] == [expected[2], expected[0]]
        assert examples[1:len(expected):3] == expected[1::3]
        assert list(examples.lengths) == [len(e["input_ids"]) for e in expected]
        assert examples.record_ids() == [e["id"] for e in expected]


def test_stats_count_long_records_and_report_length_percentiles(tmp_path, tiny_tokenizer, example_records):
    records = write_records(tmp_path / "records.jsonl", example_records)
    lengths = sorted(len(encode_record(r, tiny_tokenizer, "chat", 10_000)[0]) for r in example_records)
    limit = lengths[len(lengths) // 2]
    longer = sum(n > limit for n in lengths)
    stats = tokenize_file(records, tiny_tokenizer, "chat", limit, tmp_path / "t.arrow")
    assert stats["too_long"] == stats["truncated"] == longer and stats["records"] == len(example_records)
    assert stats["length_max"] == lengths[-1] and stats["length_p50"] == float(np.percentile(lengths, 50))
    assert stats["length_p90"] <= stats["length_p99"] <= stats["length_max"]
    assert max(datasets.Dataset.from_file(str(tmp_path / "t.arrow"))["length"]) == limit

    stats = tokenize_file(records, tiny_tokenizer, "chat", limit, tmp_path / "d.arrow", too_long="drop")
    assert stats["too_long"] == stats["dropped_too_long"] == longer and stats["truncated"] == 0
    assert stats["records"] == len(example_records) - longer
    assert datasets.Dataset.from_file(str(tmp_path / "d.arrow")).num_rows == stats["records"]


@pytest.mark.parametrize("split", ["train", "eval"])
def test_explicit_split_puts_the_whole_file_in_it(tmp_path, tiny_tokenizer, example_records, split):
    records = write_records(tmp_path / "records.jsonl", example_records[:40])
    stats = tokenize_file(records, tiny_tokenizer, "chat", 64, tmp_path / "s.arrow", split=split)
    assert stats[split] == 40 and len(read_shards([tmp_path / "s.arrow"], split)) == 40


def test_batched_encoding_equals_one_record_at_a_time(tiny_tokenizer, example_records):
    sample = example_records[:30] + [CHAT, {"format": "completion", "text": "apple river"}]
    batched = encode_batch(sample, tiny_tokenizer, "chat")
    single = [encode_record(r, tiny_tokenizer, "chat", 10_000)[:2] for r in sample]
    assert batched == single


def test_masks_match_transformers_assistant_mask(tiny_tokenizer, example_records):
    """Independent reference: transformers renders the conversation with the
    chat template's generation markers and reports which tokens are assistant's."""
    for record in [CHAT] + example_records[:20]:
        messages = record["messages"] if record["format"] == "chat" else [
            {"role": "user", "content": f"{record['instruction']}\n\n{record['input']}"},
            {"role": "assistant", "content": record["output"]}]
        reference = tiny_tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                       return_assistant_tokens_mask=True)
        ids, labels, _ = encode_record(record, tiny_tokenizer, "chat", 10_000)
        assert ids == reference["input_ids"]
        assert [label != IGNORE_INDEX for label in labels] == [bool(m) for m in reference["assistant_masks"]]


CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
          "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }}<|im_end|>{% endgeneration %}"
          "{% else %}{{ message['content'] }}<|im_end|>{% endif %}\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_chatml_style_template_with_end_of_turn_as_eos(tiny_model):
    """A Qwen-instruct-like setup: no BOS, <|im_end|> ends turns and is the EOS;
    the newline after it is template, not answer."""
    tokenizer = load_tokenizer(tiny_model, chat_template=CHATML)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.eos_token = "<|im_end|>"
    ids, labels, _ = encode_record(CHAT, tokenizer, "chat", 10_000)
    reference = tokenizer.apply_chat_template(CHAT["messages"], tokenize=True, return_dict=True,
                                              return_assistant_tokens_mask=True)
    assert ids[0] == tokenizer.bos_token_id, "the tiny tokenizer still adds its BOS, once"
    assert ids[1:] == reference["input_ids"], "no EOS appended after <|im_end|>, which is the EOS"
    assert [label != IGNORE_INDEX for label in labels] == [False] + [bool(m) for m in reference["assistant_masks"]]


def test_configured_chat_template_replaces_the_tokenizers_own(tiny_model):
    tokenizer = load_tokenizer(tiny_model, chat_template=CHATML)
    prompt_ids, _ = encode_prompt(ALPACA, tokenizer, "chat")
    assert tokenizer.decode(prompt_ids).endswith("<|im_start|>assistant\n")


def test_chat_records_without_a_chat_template_use_a_plain_template(tiny_tokenizer):
    ids, labels, _ = encode_record(CHAT, tiny_tokenizer, "alpaca", 10_000)
    text = tiny_tokenizer.decode(ids)
    assert text.startswith("<s>### System:\nAnswer briefly.\n\n### User:\n")
    assert trained_text(tiny_tokenizer, labels) == "red</s>blue</s>"


def test_backend_tokenization_equals_the_tokenizers_own(tiny_tokenizer, example_records):
    texts = [r["instruction"] + "\n\n" + r["input"] for r in example_records[:50]] + [
        "", " leading space", "<|user|>\nspecial tokens</s> in text", "ünïcödé and emoji 🙂", "tabs\tand\r\nCRLF"]
    assert tokenize_texts(texts, tiny_tokenizer) == tiny_tokenizer(texts, add_special_tokens=False)["input_ids"]
