"""Preference and unpaired data: validated like every dataset (file:line:field, every source kind,
`columns:`), rendered exactly as SFT renders the same prompt, and tokenized into rows whose two
sequences share their prompt tokens; and the config checks of preference runs and chained runs."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from finetune.config import resolve_runs
from finetune.data.pairs import side_record
from finetune.data.prompts import IGNORE_INDEX, encode_batch
from finetune.data.shards import read_shards
from finetune.data.text_sources import DataError
from finetune.data.tokenization import RecordError, tokenize_file
from finetune.data.validation import validate_file


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def validated(tmp_path, records, name="pairs", **options):
    source = write_jsonl(tmp_path / f"{name}.raw.jsonl", records)
    validate_file(source, tmp_path / f"{name}.jsonl", tmp_path / f"{name}.rejected.jsonl", **options)
    return tmp_path / f"{name}.jsonl"


def errors_of(tmp_path, records, **options):
    with pytest.raises(DataError) as error:
        validated(tmp_path, records, **options)
    assert not (tmp_path / "pairs.jsonl").exists(), "bad data leaves no output"
    return str(error.value)


PAIR = {"instruction": "Which number is larger?", "input": "Numbers: 3 and 9", "chosen": "The larger number is 9.",
        "rejected": "The larger number is 3.", "task": "larger"}


def test_bad_pairs_are_named_by_line_and_field(tmp_path):
    message = errors_of(tmp_path, [
        PAIR,
        {**PAIR, "rejected": PAIR["chosen"]},
        {**PAIR, "chosen": "   "},
        {**PAIR, "rejected": None},
        {"prompt": "hi", "messages": [{"role": "user", "content": "hi"}], "chosen": "a", "rejected": "b"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}], "chosen": "a",
         "rejected": "b"},
        {"chosen": "a", "rejected": "b"},
        '{"prompt": "hi", "chosen": "a", "rejected": "b", "chosen": "c"}',
    ], fmt="preference")
    lines = message.splitlines()[1:]
    assert lines[0].endswith(":2: fields 'chosen' and 'rejected': the two answers are the same")
    assert lines[1].endswith(":3: field 'chosen': must not be empty or whitespace only")
    assert lines[2].endswith(":4: field 'rejected': expected a non-empty string or a list of one assistant message, "
                             "got null")
    assert lines[3].endswith(":5: record: give the prompt as exactly one of prompt, messages, instruction "
                             "(it has prompt, messages)")
    assert lines[4].endswith(":6: field 'messages': the prompt must end with a user turn (the answers follow it)")
    assert lines[5].endswith(":7: record: give the prompt as exactly one of prompt, messages, instruction")
    assert ":8:" in lines[6] and "chosen" in lines[6]


def test_an_unpaired_label_must_be_a_boolean(tmp_path):
    message = errors_of(tmp_path, [{"prompt": "hi", "completion": "hello", "label": True},
                                   {"prompt": "hi", "completion": "go", "label": "no"},
                                   {"prompt": "hi", "completion": "go", "label": 0}])
    assert ":2: field 'label': expected boolean, got string" in message
    assert ":3: field 'label': expected boolean, got integer" in message


def test_every_source_kind_and_column_mapping_reads_pairs(tmp_path):
    """A CSV holds answers as text (or a conversation as JSON) and labels as true/false; Parquet holds them typed;
    `columns:` maps other column names to the format's fields. All normalize to the same records."""
    (tmp_path / "pairs.csv").write_text(
        'question,good,bad\n"Which number is larger?\n\nNumbers: 3 and 9",The larger number is 9.,'
        '"[{""role"": ""assistant"", ""content"": ""The larger number is 3.""}]"\n')
    pq.write_table(pa.table({"question": ["Which number is larger?\n\nNumbers: 3 and 9"],
                             "good": ["The larger number is 9."], "bad": ["The larger number is 3."]}),
                   tmp_path / "pairs.parquet")
    columns = {"prompt": "question", "chosen": "good", "rejected": "bad"}
    records = []
    for name in ("pairs.csv", "pairs.parquet"):
        out = tmp_path / f"{name}.jsonl"
        stats = validate_file(tmp_path / name, out, tmp_path / "rejected.jsonl", columns=columns)
        assert stats["format"] == "preference"
        records += [{k: v for k, v in json.loads(line).items() if k != "line"} for line in out.read_text().splitlines()]
    assert records[0] == records[1]
    assert records[0]["chosen"] == "The larger number is 9." and records[0]["rejected"] == "The larger number is 3."
    (tmp_path / "unpaired.csv").write_text("prompt,completion,label\nhi,hello,TRUE\nhi,go away,false\n")
    stats = validate_file(tmp_path / "unpaired.csv", tmp_path / "u.jsonl", tmp_path / "rejected.jsonl")
    assert stats["format"] == "unpaired"
    labels = [json.loads(line)["label"] for line in (tmp_path / "u.jsonl").read_text().splitlines()]
    assert labels == [True, False]


def test_each_answer_renders_exactly_as_the_sft_record_with_that_prompt(tmp_path, tiny_tokenizer):
    """What a chained preference run sees is what its SFT parent was trained on: the same prompt tokens, the
    same masking and EOS, for the chat template and for the alpaca template."""
    records = [json.loads(line) for line in validated(tmp_path, [PAIR]).read_text().splitlines()]
    shard = tmp_path / "pairs.arrow"
    for template in ("chat", "alpaca"):
        tokenize_file(tmp_path / "pairs.jsonl", tiny_tokenizer, template, 128, shard)
        (example,) = read_shards([shard], "train") or read_shards([shard], "eval")
        sft = {"format": "alpaca", "instruction": PAIR["instruction"], "input": PAIR["input"]}
        chosen, rejected = encode_batch([{**sft, "output": PAIR["chosen"]}, {**sft, "output": PAIR["rejected"]}],
                                        tiny_tokenizer, template)
        assert (example["input_ids"], example["labels"]) == chosen
        assert (example["rejected_input_ids"], example["rejected_labels"]) == rejected
        prompt = example["labels"].index(next(t for t in example["labels"] if t != IGNORE_INDEX))
        assert example["input_ids"][:prompt] == example["rejected_input_ids"][:prompt]
        assert side_record(records[0], "x")["format"] == "alpaca"


def test_a_pair_whose_prompt_renders_two_ways_is_an_error_naming_its_line(tmp_path, tiny_tokenizer, monkeypatch):
    """Chosen and rejected must share the prompt tokens exactly. The shipped templates render the prompt before
    the answer is known, so a tokenizer that tokenizes it depending on the answer stands in for one that does not."""
    import finetune.data.pairs as pairs
    real = pairs.encode_batch

    def prompt_depends_on_answer(sides, tokenizer, template):
        encoded = real(sides, tokenizer, template)
        return [([ids[0] + 1] + ids[1:], labels) if "no" in side.get("output", "") else (ids, labels)
                for side, (ids, labels) in zip(sides, encoded)]

    monkeypatch.setattr(pairs, "encode_batch", prompt_depends_on_answer)
    validated(tmp_path, [PAIR, {"prompt": "hi", "chosen": "a long answer", "rejected": "no"}])
    with pytest.raises(RecordError, match=r"pairs.jsonl:2: the prompt renders to other tokens before the chosen"):
        tokenize_file(tmp_path / "pairs.jsonl", tiny_tokenizer, "chat", 128, tmp_path / "pairs.arrow")
    assert not (tmp_path / "pairs.arrow").exists()


def test_truncation_that_leaves_an_answer_without_tokens_drops_the_pair_and_counts_it(tmp_path, tiny_tokenizer):
    long_prompt = "Which number is larger? " + "Think about it. " * 8
    validated(tmp_path, [PAIR, {**PAIR, "instruction": long_prompt, "task": "long"}])
    stats = tokenize_file(tmp_path / "pairs.jsonl", tiny_tokenizer, "chat", 40, tmp_path / "pairs.arrow")
    assert stats["no_answer_left"] == 1 and stats["records"] == 1 and stats["too_long"] == 1
    with pytest.raises(RecordError, match="every record lost an answer to truncation at max_length 8"):
        tokenize_file(tmp_path / "pairs.jsonl", tiny_tokenizer, "chat", 8, tmp_path / "short.arrow")


def test_unpaired_rows_carry_a_mismatched_completion_for_the_kl_estimate(tmp_path, tiny_tokenizer):
    """KTO's KL term compares each prompt with another record's completion (TRL cycles completions within a
    batch): here fixed at tokenization, so that the reference's log-probabilities of it can be cached."""
    records = [{"prompt": f"question {i}", "completion": f"answer number {i}", "label": i % 2 == 0}
               for i in range(4)]
    validated(tmp_path, records, name="u")
    tokenize_file(tmp_path / "u.jsonl", tiny_tokenizer, "chat", 128, tmp_path / "u.arrow", split="train")
    examples = read_shards([tmp_path / "u.arrow"], "train")
    assert examples.kind == "unpaired" and [e["desirable"] for e in examples] == [True, False, True, False]
    decode = tiny_tokenizer.decode
    for i, example in enumerate(examples):
        kl_text = decode(example["kl_input_ids"])
        assert f"question {i}" in kl_text and f"answer number {(i - 1) % 4}" in kl_text
        assert decode([t for t in example["kl_labels"] if t != IGNORE_INDEX]).startswith(f"answer number {(i - 1) % 4}")


def config_with(runs, datasets=None):
    datasets = datasets or {"sft": {"path": "a.jsonl", "format": "alpaca"},
                            "pairs": {"path": "b.jsonl", "format": "preference"}}
    defaults = {"method": "lora", "objective": "sft", "max_length": 64, "quantization": "none", "gpus": 0}
    return {"base_models": {"tiny": {"name_or_path": "x"}}, "datasets": datasets,
            "runs": {name: {**defaults, **run} for name, run in runs.items()}}


def test_a_run_takes_the_datasets_its_objective_trains_on():
    config = config_with({"sft": {}, "dpo": {"objective": "dpo", "base_model": {"run": "sft"}}})
    resolve_runs(config)
    assert config["runs"]["sft"]["datasets"] == ["sft"] and config["runs"]["dpo"]["datasets"] == ["pairs"]
    assert config["runs"]["dpo"]["base_model"] == "sft.tuned"
    assert config["base_models"]["sft.tuned"] == {"run": "sft", "root": "tiny"}


@pytest.mark.parametrize("runs, message", [
    ({"dpo": {"objective": "dpo", "base_model": {"run": "sft"}}}, "run 'dpo': base_model names run 'sft', which is not"),
    ({"a": {"base_model": {"run": "b"}}, "b": {"base_model": {"run": "a"}}}, "run 'a': its base models form a cycle: "
                                                                            "a -> b -> a"),
    ({"a": {"base_model": {"run": "a"}}}, "run 'a': its base models form a cycle: a -> a"),
    ({"dpo": {"objective": "dpo", "datasets": ["sft"]}}, "run 'dpo': dataset 'sft' has format alpaca, but objective "
                                                          "dpo trains on preference records"),
    ({"kto": {"objective": "kto"}}, "run 'kto': objective kto trains on datasets of format unpaired, and none"),
])
def test_bad_chains_and_objectives_stop_before_any_job_naming_the_run(runs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        resolve_runs(config_with(runs))
