"""Record validation: each record of a dataset checked against the JSON Schema of its format
(alpaca, chat or completion; for preference tuning, preference or unpaired; `auto` takes the
format of the first record and enforces it on all), normalized into one shape with a content
id, and counted. Problems name the file, the
line (or row) and the field, and the column it came from:

    data/foo.jsonl:123: field 'output': expected string, got null
    data/qa.parquet:12: field 'output' (column 'answer'): expected string, got null

on_error fail: up to max_errors problems are reported, then DataError, and nothing is written.
on_error skip: bad records go to the rejected file with their reason; DataError all the same
when more than max_rejected_fraction of them are bad.

The source is read line by line (or in record batches, sources.py) and records are written as
they are checked, so memory does not grow with it (a JSON array is the exception: it is one text).
"""
import collections
import contextlib
import hashlib
import json
from pathlib import Path

import jsonschema

from finetune.data.sources import read_source, source_kind
from finetune.data.text_sources import JSON_TYPES, DataError, Problem, column_note
from finetune.files import atomic_path

FORMATS = ("alpaca", "chat", "completion", "preference", "unpaired")
FORMAT_FIELDS = {"alpaca": ("instruction", "input", "output"), "chat": ("messages",), "completion": ("text",),
                 "preference": ("chosen", "rejected"), "unpaired": ("completion", "label")}
PROMPT_FIELDS = ("prompt", "messages", "instruction")  # a preference or unpaired record has exactly one
SCHEMA_DIR = Path(__file__).resolve().parent.parent.parent / "schemas" / "records"


def load_schemas(schema_dir):
    return {fmt: jsonschema.Draft202012Validator(json.loads((Path(schema_dir) / f"{fmt}.schema.json").read_text()))
            for fmt in FORMATS}


def detect_format(record):
    for fmt in ("preference", "unpaired", "chat", "completion", "alpaca"):
        if any(field in record for field in FORMAT_FIELDS[fmt] if field != "input"):
            return fmt
    return None


def field_name(path):
    name = ""
    for part in path:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name


def describe(error, columns=None):
    """(reason, one-line field-first message) of a JSON Schema error; a field that a mapped column
    fills is named with its column."""
    path = list(error.absolute_path)
    if error.validator == "required":
        missing = error.message.split("'")[1]
        note = column_note(missing, columns) if not path else ""
        return "missing_field", f"field '{field_name(path + [missing])}'{note}: required field is missing"
    where = f"field '{field_name(path)}'{column_note(path[0], columns)}" if path else "record"
    instance = error.instance
    if error.validator == "type":
        got = JSON_TYPES.get(type(instance), type(instance).__name__)
        return "wrong_type", f"{where}: expected {error.validator_value}, got {got}"
    if error.validator in ("minLength", "pattern"):
        return "empty_value", f"{where}: must not be empty or whitespace only"
    if error.validator == "enum":
        reason = "unknown_role" if path and path[-1] == "role" else "invalid_value"
        return reason, f"{where}: expected one of {', '.join(map(str, error.validator_value))}, got {instance!r}"
    if error.validator == "contains":
        return "no_assistant_turn", f"{where}: needs at least one assistant turn"
    if error.validator == "minItems":
        return "empty_value", f"{where}: must not be empty"
    if error.validator == "oneOf" and not path:  # the prompt of a preference or unpaired record
        given = [field for field in PROMPT_FIELDS if field in instance]
        return ("invalid_value" if given else "missing_field"), (
            f"record: give the prompt as exactly one of {', '.join(PROMPT_FIELDS)}"
            + (f" (it has {', '.join(given)})" if given else ""))
    if error.validator == "oneOf" and isinstance(instance, str):
        return "empty_value", f"{where}: must not be empty or whitespace only"
    if error.validator == "oneOf":  # an answer of a preference or unpaired record
        got = JSON_TYPES.get(type(instance), type(instance).__name__)
        return "wrong_type", f"{where}: expected a non-empty string or a list of one assistant message, got {got}"
    return "invalid_value", f"{where}: {error.message}"


def answer_text(answer):
    """A preference or unpaired record's answer as text: the string, or its one assistant message's content."""
    return answer if isinstance(answer, str) else answer[0]["content"]


def prompt_fields(record):
    """A preference or unpaired record's prompt, normalized: `messages`, or an alpaca instruction and input
    (a `prompt` string is an instruction), so that it renders exactly as an SFT record with the same prompt."""
    if "messages" in record:
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in record["messages"]]}
    if "prompt" in record:
        return {"instruction": record["prompt"], "input": ""}
    return {"instruction": record["instruction"], "input": record.get("input", "")}


def check_preference_record(record, fmt):
    """What a preference or unpaired record's schema cannot say, as a Problem."""
    if "messages" in record and record["messages"][-1]["role"] != "user":
        raise Problem("invalid_value", "field 'messages': the prompt must end with a user turn (the answers follow it)")
    if fmt == "preference" and answer_text(record["chosen"]).strip() == answer_text(record["rejected"]).strip():
        raise Problem("identical_answers", "fields 'chosen' and 'rejected': the two answers are the same")


def normalize(record, fmt):
    """The record's fields in the one internal shape, with an id that is a hash of its content."""
    fields = {"format": fmt}
    if fmt == "preference":
        fields.update(prompt_fields(record), chosen=answer_text(record["chosen"]),
                      rejected=answer_text(record["rejected"]))
    elif fmt == "unpaired":
        fields.update(prompt_fields(record), completion=answer_text(record["completion"]), label=record["label"])
    elif fmt == "alpaca":
        fields.update(instruction=record["instruction"], input=record.get("input", ""), output=record["output"])
    elif fmt == "chat":
        fields["messages"] = [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
    else:
        fields["text"] = record["text"]
    canonical = json.dumps(fields, sort_keys=True, ensure_ascii=False)
    # The task kind labels a record for reports; it is not part of its content (nor of its id and split).
    task = {"task": record["task"]} if "task" in record else {}
    return {"id": hashlib.sha256(canonical.encode()).hexdigest()[:16], **fields, **task}


def check_record(record, fmt, schemas, columns=None):
    """The record's format, or raise Problem (the first of its schema errors)."""
    if fmt == "auto":
        fmt = detect_format(record)
        if fmt is None:
            raise Problem("unknown_format", "cannot tell the record format (no 'instruction', 'messages', 'text', "
                                            "'chosen' or 'completion')")
    errors = sorted(schemas[fmt].iter_errors(record), key=lambda e: list(e.absolute_path))
    if errors:
        described = (describe(error, columns) for error in reversed(errors))
        problems = list({message.split(":")[0]: (reason, message) for reason, message in described}.values())[::-1]
        raise Problem(problems[0][0], "; ".join(message for _, message in problems))
    if fmt in ("preference", "unpaired"):
        check_preference_record(record, fmt)
    return fmt


def validate_file(path, output, rejected, fmt="auto", on_error="fail", max_errors=20, max_rejected_fraction=0.1,
                  drop_duplicates=False, schema_dir=SCHEMA_DIR, columns=None, source_split=None, revision=None):
    """Write the normalized records of a source (see sources.py) to `output`, and bad ones to
    `rejected`; return stats.

    Raises DataError, leaving neither file behind, when the data is not usable."""
    output, rejected = Path(output), Path(rejected)
    kind = source_kind(path)
    rows = read_source(path, columns, source_split, revision)
    schemas = load_schemas(schema_dir)
    seen, errors, reasons = set(), [], collections.Counter()
    stats = {"file": str(path), "source": kind, **source_details(kind, columns, source_split, revision),
             "format": fmt, "records_read": 0, "records": 0, "rejected": 0, "duplicates": 0, "duplicates_dropped": 0}
    with atomic_path(output) as partial_output, atomic_path(rejected) as partial_rejected, contextlib.closing(rows):
        with open(partial_output, "w", encoding="utf-8") as good, open(partial_rejected, "w", encoding="utf-8") as bad:
            for number, record, problem, text in rows:
                stats["records_read"] += 1
                try:
                    if problem:
                        raise problem
                    fmt = check_record(record, fmt, schemas, columns)
                except Problem as exc:
                    reasons[exc.reason] += 1
                    errors.append(f"{path}:{number}: {exc}")
                    bad.write(json.dumps({"line": number, "reason": exc.reason, "error": str(exc), "text": text},
                                         ensure_ascii=False) + "\n")
                    if on_error == "fail" and len(errors) >= max_errors:
                        break
                    continue
                normalized = normalize(record, fmt)
                if normalized["id"] in seen:
                    stats["duplicates"] += 1
                    if drop_duplicates:
                        stats["duplicates_dropped"] += 1
                        continue
                seen.add(normalized["id"])
                stats["records"] += 1
                good.write(json.dumps({**normalized, "line": number}, ensure_ascii=False) + "\n")
        stats.update(format=fmt, rejected=len(errors), rejected_by_reason=dict(reasons))
        check_usable(path, stats, errors, on_error, max_errors, max_rejected_fraction)
    return stats


def source_details(kind, columns, source_split, revision):
    """What, besides the path and kind, tells where the records came from (for the stats)."""
    details = {"columns": columns} if columns else {}
    if kind == "hub":
        details.update(source_split=source_split or "train", revision=revision or "main")  # main: the default
    elif kind == "datasets_folder" and source_split:
        details["source_split"] = source_split
    return details


def check_usable(path, stats, errors, on_error, max_errors, max_rejected_fraction):
    if errors and on_error == "fail":
        limit = f" (stopped at the first {max_errors})" if len(errors) >= max_errors else ""
        raise DataError(f"{len(errors)} invalid record(s) in {path}{limit}:\n" + "\n".join(errors))
    if stats["records_read"] == 0:
        raise DataError(f"{path}: no records (the file is empty)")
    fraction = len(errors) / stats["records_read"]
    if fraction > max_rejected_fraction:
        shown = "\n".join(errors[:max_errors])
        raise DataError(f"{path}: {len(errors)} of {stats['records_read']} records are invalid ({fraction:.0%}, more than "
                        f"the allowed {max_rejected_fraction:.0%}); the first of them:\n{shown}")
    if stats["records"] == 0:
        raise DataError(f"{path}: no valid records")
