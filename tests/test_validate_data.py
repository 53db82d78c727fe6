import json
import subprocess
import sys

import pytest

from conftest import REPO
from validate_data import DataError, validate_file

GOOD = {"instruction": "Add the two numbers.", "input": "1 and 2", "output": "3"}


def write_lines(path, lines, encoding="utf-8"):
    path.write_bytes("".join(line + "\n" for line in lines).encode(encoding))
    return path


def errors_of(path, **kwargs):
    with pytest.raises(DataError) as info:
        validate_file(path, **kwargs)
    return str(info.value).splitlines()[1:]


def test_valid_alpaca_file_is_normalized(tmp_path):
    path = write_lines(tmp_path / "ok.jsonl", [json.dumps(GOOD), json.dumps({"instruction": "Hi", "output": "Hello"})])
    records, stats = validate_file(path)
    assert stats["records"] == 2 and stats["format"] == "alpaca"
    assert records[1]["input"] == "" and records[1]["line"] == 2
    assert all(len(r["id"]) == 16 for r in records)


def test_missing_field_names_file_line_and_field(tmp_path):
    path = write_lines(tmp_path / "foo.jsonl", [json.dumps(GOOD), json.dumps({"instruction": "x"})])
    assert errors_of(path) == [f"{path}:2: field 'output': required field is missing"]


def test_wrong_type_says_what_was_expected_and_found(tmp_path):
    path = write_lines(tmp_path / "foo.jsonl", [json.dumps(GOOD)] * 2 + [json.dumps({**GOOD, "output": None})])
    assert errors_of(path) == [f"{path}:3: field 'output': expected string, got null"]


def test_whitespace_only_output_is_rejected(tmp_path):
    path = write_lines(tmp_path / "foo.jsonl", [json.dumps({**GOOD, "output": "  \t"})])
    assert errors_of(path) == [f"{path}:1: field 'output': must not be empty or whitespace only"]


def test_invalid_json_is_reported_with_line(tmp_path):
    path = write_lines(tmp_path / "foo.jsonl", [json.dumps(GOOD), '{"instruction": "x", "output": '])
    (error,) = errors_of(path)
    assert error.startswith(f"{path}:2: invalid JSON:")


def test_json_array_file_is_explained(tmp_path):
    path = tmp_path / "array.jsonl"
    path.write_text(json.dumps([GOOD, GOOD]))
    (error,) = errors_of(path)
    assert error.startswith(f"{path}:1: expected a JSON object per line, got array") and "JSONL" in error


def test_bom_crlf_and_blank_lines_are_accepted(tmp_path):
    path = tmp_path / "windows.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (json.dumps(GOOD) + "\r\n\r\n" + json.dumps(GOOD) + "\r\n").encode())
    records, stats = validate_file(path)
    assert [r["line"] for r in records] == [1, 3] and stats["duplicates"] == 1


def test_non_utf8_bytes_are_reported(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + '{"instruction": "café", "output": "x"}'.encode("latin-1"))
    (error,) = errors_of(path)
    assert error.startswith(f"{path}:2: not valid UTF-8")


def test_errors_are_collected_up_to_the_limit(tmp_path):
    path = write_lines(tmp_path / "foo.jsonl", [json.dumps({"instruction": "x"})] * 30)
    with pytest.raises(DataError) as info:
        validate_file(path, max_errors=5)
    lines = str(info.value).splitlines()
    assert "stopped at the first 5" in lines[0] and len(lines) == 6


def test_chat_records(tmp_path):
    good = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": "Hello"}]}
    bad_role = {"messages": [{"role": "robot", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    no_answer = {"messages": [{"role": "user", "content": "Hi"}]}
    path = write_lines(tmp_path / "chat.jsonl", [json.dumps(good), json.dumps(bad_role), json.dumps(no_answer)])
    assert errors_of(path) == [
        f"{path}:2: field 'messages[0].role': expected one of system, user, assistant, got 'robot'",
        f"{path}:3: field 'messages': needs at least one assistant turn",
    ]


def test_auto_format_is_enforced_on_every_record(tmp_path):
    path = write_lines(tmp_path / "mixed.jsonl", [json.dumps({"text": "plain text"}), json.dumps(GOOD)])
    assert errors_of(path) == [f"{path}:2: field 'text': required field is missing"]


def test_empty_and_missing_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="no records"):
        validate_file(empty)
    with pytest.raises(DataError, match="file not found"):
        validate_file(tmp_path / "missing.jsonl")


def test_cli_exits_nonzero_and_writes_nothing_on_bad_data(tmp_path):
    path = write_lines(tmp_path / "foo.jsonl", [json.dumps(GOOD), json.dumps({**GOOD, "output": None})])
    out, stats = tmp_path / "out" / "foo.jsonl", tmp_path / "out" / "foo.stats.json"
    result = subprocess.run([sys.executable, REPO / "scripts" / "validate_data.py", "--input", path,
                             "--output", out, "--stats", stats], capture_output=True, text=True)
    assert result.returncode == 1
    assert f"{path}:2: field 'output': expected string, got null" in result.stderr
    assert not out.exists() and not stats.exists() and not list(tmp_path.glob("out/*"))


def test_cli_writes_records_and_stats(tmp_path):
    out, stats = tmp_path / "words.jsonl", tmp_path / "words.stats.json"
    subprocess.run([sys.executable, REPO / "scripts" / "validate_data.py", "--input", REPO / "data" / "word_tasks.jsonl",
                    "--output", out, "--stats", stats], check=True, capture_output=True)
    assert len(out.read_text().splitlines()) == json.loads(stats.read_text())["records"] == 200
