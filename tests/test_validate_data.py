import json
import subprocess
import sys

import pytest

from conftest import REPO, settings_args
from finetune.data.validation import DataError, validate_file

GOOD = {"instruction": "Add the two numbers.", "input": "1 and 2", "output": "3"}
CHAT = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                     {"role": "assistant", "content": "Hello"}]}


def write_lines(path, lines):
    path.write_bytes("".join(line + "\n" for line in lines).encode())
    return path


def run(path, **kwargs):
    out = path.with_name("out")
    stats = validate_file(path, out / "records.jsonl", out / "rejected.jsonl", **kwargs)
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    return records, rejected, stats


def errors_of(path, **kwargs):
    with pytest.raises(DataError) as info:
        run(path, **kwargs)
    assert not list(path.with_name("out").glob("*")), "a failed validation leaves no output behind"
    return str(info.value).splitlines()[1:]


# Each kind of bad input: the file's lines, and the exact error for the bad line.
BAD_INPUTS = {
    "invalid JSON": (['{"instruction": "x", "output": '], "2: invalid JSON: Expecting value (column 32)"),
    "missing field": ([json.dumps({"instruction": "x"})], "2: field 'output': required field is missing"),
    "wrong type": ([json.dumps({**GOOD, "output": None})], "2: field 'output': expected string, got null"),
    "number instead of string": ([json.dumps({**GOOD, "input": 7})], "2: field 'input': expected string, got integer"),
    "empty output": ([json.dumps({**GOOD, "output": ""})], "2: field 'output': must not be empty or whitespace only"),
    "whitespace output": ([json.dumps({**GOOD, "output": " \t "})],
                          "2: field 'output': must not be empty or whitespace only"),
    "not an object": (["42"], "2: expected a JSON object per line, got integer"),
    "NaN literal": (['{"instruction": "x", "output": "y", "score": NaN}'],
                    "2: invalid JSON: NaN is not a JSON value (RFC 8259 has no NaN or Infinity)"),
    "Infinity literal": (['{"instruction": "x", "output": "y", "score": -Infinity}'],
                         "2: invalid JSON: -Infinity is not a JSON value (RFC 8259 has no NaN or Infinity)"),
    "number beyond a float": (['{"instruction": "x", "output": "y", "score": 1e999}'],
                              "2: invalid JSON: number 1e999 is out of range of a 64-bit float"),
    "duplicate key": (['{"instruction": "x", "output": "y", "output": "z"}'],
                      "2: invalid JSON: key 'output' appears more than once in one object"),
    "lone surrogate": (['{"instruction": "x", "output": "y \\ud800"}'],
                       "2: invalid JSON: a \\u escape is half of a surrogate pair (not Unicode text)"),
    "raw control character": (['{"instruction": "x", "output": "a\tb"}'],
                              "2: invalid JSON: Invalid control character at (column 34)"),
    "other fields": ([json.dumps({"question": "x"})],
                     "2: field 'instruction': required field is missing; field 'output': required field is missing"),
}


@pytest.mark.parametrize("kind", BAD_INPUTS)
def test_bad_alpaca_record_is_reported_with_file_line_and_field(tmp_path, kind):
    lines, error = BAD_INPUTS[kind]
    path = write_lines(tmp_path / "foo.jsonl", [json.dumps(GOOD)] + lines)
    assert errors_of(path) == [f"{path}:{error}"]


CHAT_INPUTS = {
    "unknown role": ({"messages": [{"role": "robot", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
                     "field 'messages[0].role': expected one of system, user, assistant, got 'robot'"),
    "no assistant turn": ({"messages": [{"role": "user", "content": "Hi"}]},
                          "field 'messages': needs at least one assistant turn"),
    "content not a string": ({"messages": [{"role": "user", "content": ["Hi"]}, {"role": "assistant", "content": "x"}]},
                             "field 'messages[0].content': expected string, got array"),
    "empty conversation": ({"messages": []}, "field 'messages': must not be empty"),
}


@pytest.mark.parametrize("kind", CHAT_INPUTS)
def test_bad_chat_record_is_reported_with_file_line_and_field(tmp_path, kind):
    record, error = CHAT_INPUTS[kind]
    path = write_lines(tmp_path / "chat.jsonl", [json.dumps(CHAT), json.dumps(record)])
    assert errors_of(path) == [f"{path}:2: {error}"]


def test_valid_files_of_each_format_are_normalized(tmp_path):
    alpaca, _, stats = run(write_lines(tmp_path / "a.jsonl", [json.dumps(GOOD), json.dumps({"instruction": "Hi",
                                                                                            "output": "Yo"})]))
    assert stats["records"] == 2 and stats["format"] == "alpaca" and stats["rejected"] == 0
    assert alpaca[1] == {"id": alpaca[1]["id"], "format": "alpaca", "instruction": "Hi", "input": "", "output": "Yo",
                         "line": 2}
    chat, _, stats = run(write_lines(tmp_path / "c.jsonl", [json.dumps(CHAT)]))
    assert stats["format"] == "chat" and chat[0]["messages"] == CHAT["messages"]
    completion, _, stats = run(write_lines(tmp_path / "t.jsonl", [json.dumps({"text": "plain text", "meta": 1})]))
    assert stats["format"] == "completion" and completion[0]["text"] == "plain text"


def test_configured_format_is_enforced(tmp_path):
    path = write_lines(tmp_path / "foo.jsonl", [json.dumps(CHAT)])
    assert errors_of(path, fmt="alpaca") == [
        f"{path}:1: field 'instruction': required field is missing; field 'output': required field is missing"]


def test_auto_format_is_taken_from_the_first_record_and_enforced(tmp_path):
    path = write_lines(tmp_path / "mixed.jsonl", [json.dumps({"text": "plain text"}), json.dumps(GOOD)])
    assert errors_of(path) == [f"{path}:2: field 'text': required field is missing"]


def test_json_array_file_is_explained(tmp_path):
    hint = "(is this a JSON array file? write one object per line: JSONL)"
    path = tmp_path / "array.jsonl"
    path.write_text(json.dumps([GOOD, GOOD]))
    assert errors_of(path) == [f"{path}:1: expected a JSON object per line, got array {hint}"]
    path.write_text(json.dumps([GOOD, GOOD], indent=2))
    assert errors_of(path)[0] == f"{path}:1: invalid JSON: Expecting value (column 2) {hint}"


def test_bom_crlf_and_blank_lines_are_accepted(tmp_path):
    path = tmp_path / "windows.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (json.dumps(GOOD) + "\r\n\r\n  \r\n" + json.dumps(CHAT["messages"][0] | GOOD)
                                       + "\r\n").encode())
    records, _, stats = run(path)
    assert [r["line"] for r in records] == [1, 4] and stats["records"] == 2
    assert records[0]["instruction"] == GOOD["instruction"], "the BOM is not part of the first record"


def test_non_utf8_bytes_are_reported(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + '{"instruction": "caf\xe9", "output": "x"}'.encode("latin-1"))
    assert errors_of(path) == [f"{path}:2: not valid UTF-8 (byte 21 of the line)"]


def test_duplicates_are_reported_and_dropped_only_if_configured(tmp_path):
    path = write_lines(tmp_path / "dup.jsonl", [json.dumps(GOOD), json.dumps(CHAT["messages"][0] | GOOD),
                                                json.dumps({"output": "3", "input": "1 and 2",
                                                            "instruction": "Add the two numbers."})])
    records, _, stats = run(path)
    assert len(records) == 3 and stats["duplicates"] == 2 and stats["duplicates_dropped"] == 0
    records, _, stats = run(path, drop_duplicates=True)
    assert len(records) == 1 and stats["duplicates"] == 2 and stats["duplicates_dropped"] == 2


def test_errors_are_collected_up_to_the_limit(tmp_path):
    path = write_lines(tmp_path / "foo.jsonl", [json.dumps({"instruction": "x"})] * 30)
    with pytest.raises(DataError) as info:
        run(path, max_errors=5)
    lines = str(info.value).splitlines()
    assert lines[0] == f"5 invalid record(s) in {path} (stopped at the first 5):" and len(lines) == 6
    assert lines[1:] == [f"{path}:{n}: field 'output': required field is missing" for n in range(1, 6)]


def test_skip_mode_quarantines_bad_records_with_their_reason(tmp_path):
    lines = [json.dumps(GOOD)] * 18 + ['{"broken', json.dumps({**GOOD, "output": None})]
    lines = [json.dumps({**GOOD, "input": str(i)}) for i in range(18)] + lines[18:]
    records, rejected, stats = run(write_lines(tmp_path / "foo.jsonl", lines), on_error="skip",
                                   max_rejected_fraction=0.2)
    assert len(records) == 18 and stats["rejected"] == 2
    assert stats["rejected_by_reason"] == {"invalid_json": 1, "wrong_type": 1}
    assert [(r["line"], r["reason"]) for r in rejected] == [(19, "invalid_json"), (20, "wrong_type")]
    assert rejected[1]["error"] == "field 'output': expected string, got null" and rejected[0]["text"] == '{"broken'


def test_skip_mode_still_stops_when_too_much_is_bad(tmp_path):
    path = write_lines(tmp_path / "foo.jsonl", [json.dumps(GOOD), "not json", "nor this"])
    errors = errors_of(path, on_error="skip", max_rejected_fraction=0.5)
    assert errors == [f"{path}:2: invalid JSON: Expecting value (column 1)",
                      f"{path}:3: invalid JSON: Expecting value (column 1)"]


def test_empty_and_missing_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n \n")
    with pytest.raises(DataError, match=f"^{empty}: no records \\(the file is empty\\)$"):
        run(empty)
    with pytest.raises(DataError, match="missing.jsonl: file not found$"):
        run(tmp_path / "missing.jsonl")
    assert not list(tmp_path.glob("out/*"))


def cli(tmp_path, data, **settings):
    out = tmp_path / "results"
    result = subprocess.run([sys.executable, REPO / "scripts" / "validate_data.py", "--input", data,
                             *settings_args(tmp_path / "settings", "validate_data", **settings),
                             "--output", out / "d.jsonl", "--rejected", out / "d.rejected.jsonl",
                             "--stats", out / "d.stats.json"], capture_output=True, text=True)
    return result, out


def test_cli_exits_nonzero_and_writes_nothing_on_bad_data(tmp_path):
    path = write_lines(tmp_path / "foo.jsonl", [json.dumps(GOOD), json.dumps({**GOOD, "output": None})])
    result, out = cli(tmp_path, path)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"1 invalid record(s) in {path}:",
                                          f"{path}:2: field 'output': expected string, got null"]
    assert not list(out.glob("*"))


def test_cli_writes_records_rejected_and_stats(tmp_path):
    result, out = cli(tmp_path, REPO / "data" / "word_tasks.jsonl")
    assert result.returncode == 0, result.stderr
    stats = json.loads((out / "d.stats.json").read_text())
    assert len((out / "d.jsonl").read_text().splitlines()) == stats["records"] == 2400
    assert (out / "d.rejected.jsonl").read_text() == "" and stats["rejected_by_reason"] == {}


def test_a_task_label_is_kept_but_is_not_part_of_the_records_identity(tmp_path):
    record = {"instruction": "What is the first word?", "input": "List: red sky", "output": "The first word is red."}
    path = write_lines(tmp_path / "d.jsonl", [json.dumps({**record, "task": "first_word"}), json.dumps(record)])
    records, _, stats = run(path)
    assert records[0]["task"] == "first_word" and "task" not in records[1]
    assert records[0]["id"] == records[1]["id"] and stats["duplicates"] == 1, "same content, same id and split"
    (tmp_path / "bad").mkdir()
    bad = write_lines(tmp_path / "bad" / "d.jsonl", [json.dumps({**record, "task": ""})])
    assert errors_of(bad) == [f"{bad}:1: field 'task': must not be empty or whitespace only"]
