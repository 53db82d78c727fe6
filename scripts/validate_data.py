"""Validate one JSONL dataset file and write its normalized records and stats.

Every line must be one JSON object of the dataset's format (alpaca, chat or
completion; `auto` takes the format of the first record and enforces it on
all). Problems name the file, the line and the field:

    data/foo.jsonl:123: field 'output': expected string, got null

--on-error fail (default): up to --max-errors problems are reported, then the
script exits non-zero and writes nothing, so no training starts on bad data.
--on-error skip: bad records go to the --rejected file with their reason, and
the script still fails if more than --max-rejected-fraction of them are bad.

The file is read line by line and records are written as they are checked,
so memory does not grow with the file.

    python scripts/validate_data.py --input data/foo.jsonl --format auto \
        --output results/data/foo.jsonl --rejected results/data/foo.rejected.jsonl \
        --stats results/data/foo.validation.json
"""
import argparse
import collections
import hashlib
import json
import sys
from pathlib import Path

import jsonschema

from outputs import atomic_path, write_json
from settings import add_settings, check_settings

FORMATS = ("alpaca", "chat", "completion")
FORMAT_FIELDS = {"alpaca": ("instruction", "input", "output"), "chat": ("messages",), "completion": ("text",)}
SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas" / "records"
JSON_TYPES = {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer", float: "number",
              type(None): "null"}


class DataError(Exception):
    """Bad input data; the message lists the problems found, one per line."""


class Problem(Exception):
    """One bad record: a reason category (for stats) and a message."""

    def __init__(self, reason, message):
        super().__init__(message)
        self.reason = reason


def load_schemas(schema_dir):
    return {fmt: jsonschema.Draft202012Validator(json.loads((Path(schema_dir) / f"{fmt}.schema.json").read_text()))
            for fmt in FORMATS}


def detect_format(record):
    for fmt in ("chat", "completion", "alpaca"):
        if any(field in record for field in FORMAT_FIELDS[fmt] if field != "input"):
            return fmt
    return None


def field_name(path):
    name = ""
    for part in path:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name


def describe(error):
    """(reason, one-line field-first message) of a JSON Schema error."""
    path = list(error.absolute_path)
    if error.validator == "required":
        missing = error.message.split("'")[1]
        return "missing_field", f"field '{field_name(path + [missing])}': required field is missing"
    where = f"field '{field_name(path)}'" if path else "record"
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
    return "invalid_value", f"{where}: {error.message}"


def normalize(record, fmt):
    """The record's fields in the one internal shape, with an id that is a hash of its content."""
    fields = {"format": fmt}
    if fmt == "alpaca":
        fields.update(instruction=record["instruction"], input=record.get("input", ""), output=record["output"])
    elif fmt == "chat":
        fields["messages"] = [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
    else:
        fields["text"] = record["text"]
    canonical = json.dumps(fields, sort_keys=True, ensure_ascii=False)
    # The task kind labels a record for reports; it is not part of its content (nor of its id and split).
    task = {"task": record["task"]} if "task" in record else {}
    return {"id": hashlib.sha256(canonical.encode()).hexdigest()[:16], **fields, **task}


def read_lines(path):
    """(line number, text or None, problem or None) for each non-blank line; BOM and CRLF tolerated."""
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if number == 1 and line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]
            try:
                text = line.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as exc:
                yield number, None, Problem("not_utf8", f"not valid UTF-8 (byte {exc.start + 1} of the line)")
                continue
            if text.strip():
                yield number, text, None


def _not_json(constant):
    raise Problem("invalid_json", f"invalid JSON: {constant} is not a JSON value (RFC 8259 has no NaN or Infinity)")


def _finite_number(text):
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise Problem("invalid_json", f"invalid JSON: number {text[:30]} is out of range of a 64-bit float")
    return value


def _object_without_duplicate_keys(pairs):
    keys = collections.Counter(key for key, _ in pairs)
    repeated = [key for key, count in keys.items() if count > 1]
    if repeated:
        raise Problem("invalid_json", f"invalid JSON: key '{repeated[0]}' appears more than once in one object")
    return dict(pairs)


def parse_strict_json(text):
    """A JSON value as a strict reader (RFC 8259; pyarrow, jq) accepts it: Python's json module alone
    also takes NaN, Infinity, repeated keys, numbers beyond a float and lone surrogate escapes."""
    try:
        value = json.loads(text, parse_constant=_not_json, parse_float=_finite_number,
                           object_pairs_hook=_object_without_duplicate_keys)
    except json.JSONDecodeError as exc:
        raise Problem("invalid_json", f"invalid JSON: {exc.msg} (column {exc.colno})") from None
    except ValueError as exc:  # an integer with more digits than Python converts
        raise Problem("invalid_json", f"invalid JSON: {exc}") from None
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise Problem("invalid_json", "invalid JSON: a \\u escape is half of a surrogate pair (not Unicode text)") from None
    return value


def check_record(text, fmt, schemas, first):
    """The parsed record and its format, or raise Problem (the first of its schema errors)."""
    array_hint = " (is this a JSON array file? write one object per line: JSONL)" if first else ""
    try:
        record = parse_strict_json(text)
    except Problem as exc:
        hint = array_hint if text.lstrip().startswith("[") and "column" in str(exc) else ""
        raise Problem(exc.reason, f"{exc}{hint}") from None
    if not isinstance(record, dict):
        hint = array_hint if isinstance(record, list) else ""
        raise Problem("not_an_object", f"expected a JSON object per line, got {JSON_TYPES.get(type(record), 'value')}"
                                       f"{hint}")
    if fmt == "auto":
        fmt = detect_format(record)
        if fmt is None:
            raise Problem("unknown_format", "cannot tell the record format (no 'instruction', 'messages' or 'text')")
    errors = sorted(schemas[fmt].iter_errors(record), key=lambda e: list(e.absolute_path))
    if errors:
        problems = list({message.split(":")[0]: (reason, message) for reason, message in map(describe, reversed(errors))}
                        .values())[::-1]
        raise Problem(problems[0][0], "; ".join(message for _, message in problems))
    return record, fmt


def validate_file(path, output, rejected, fmt="auto", on_error="fail", max_errors=20, max_rejected_fraction=0.1,
                  drop_duplicates=False, schema_dir=SCHEMA_DIR):
    """Write normalized records to `output` (and bad ones to `rejected`); return stats.

    Raises DataError, leaving neither file behind, when the data is not usable."""
    path, output, rejected = Path(path), Path(output), Path(rejected)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    schemas = load_schemas(schema_dir)
    seen, errors, reasons = set(), [], collections.Counter()
    stats = {"file": str(path), "format": fmt, "records_read": 0, "records": 0, "rejected": 0, "duplicates": 0,
             "duplicates_dropped": 0}
    with atomic_path(output) as partial_output, atomic_path(rejected) as partial_rejected:
        with open(partial_output, "w", encoding="utf-8") as good, open(partial_rejected, "w", encoding="utf-8") as bad:
            for number, text, problem in read_lines(path):
                stats["records_read"] += 1
                try:
                    if problem:
                        raise problem
                    record, fmt = check_record(text, fmt, schemas, first=stats["records_read"] == 1)
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


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True, help="normalized records (JSONL)")
    parser.add_argument("--rejected", type=Path, required=True, help="bad records with their reasons (JSONL)")
    parser.add_argument("--stats", type=Path, required=True)
    parser.add_argument("--schema-dir", type=Path, default=SCHEMA_DIR, help="one JSON Schema per record format")
    add_settings(parser, "validate_data")
    return check_settings(parser.parse_args(argv), "validate_data")


def main(argv=None):
    args = parse_args(argv)
    try:
        stats = validate_file(args.input, args.output, args.rejected, args.format, args.on_error, args.max_errors,
                              args.max_rejected_fraction, args.drop_duplicates, args.schema_dir)
    except DataError as exc:
        print(exc, file=sys.stderr)
        sys.exit(1)
    write_json(args.stats, stats)
    print(f"{args.input}: {stats['records']} {stats['format']} records, {stats['rejected']} rejected, "
          f"{stats['duplicates']} duplicate(s) ({stats['duplicates_dropped']} dropped)")


if __name__ == "__main__":
    main()
