"""Validate one JSONL dataset file and write its normalized records and stats.

Every line must be one JSON object of the dataset's format (alpaca, chat or
completion; `auto` takes the format of the first record and enforces it on
all). Errors name the file, the line and the field:

    data/foo.jsonl:123: field 'output': expected string, got null

Up to --max-errors are reported, then the script exits non-zero without
writing anything, so no training starts on data that is wrong.

    python scripts/validate_data.py --input data/foo.jsonl --format auto \
        --output results/data/foo.jsonl --stats results/data/foo.stats.json
"""
import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import jsonschema

FORMATS = ("alpaca", "chat", "completion")
FORMAT_FIELDS = {"alpaca": ("instruction", "input", "output"), "chat": ("messages",), "completion": ("text",)}
SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas" / "records"
JSON_TYPES = {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer", float: "number",
              type(None): "null"}


class DataError(Exception):
    """Bad input data; the message lists every problem found, one per line."""


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
    """A one-line, field-first description of a JSON Schema error."""
    path = list(error.absolute_path)
    if error.validator == "required":
        missing = error.message.split("'")[1]
        return f"field '{field_name(path + [missing])}': required field is missing"
    where = f"field '{field_name(path)}'" if path else "record"
    instance = error.instance
    if error.validator == "type":
        return f"{where}: expected {error.validator_value}, got {JSON_TYPES.get(type(instance), type(instance).__name__)}"
    if error.validator in ("minLength", "pattern"):
        return f"{where}: must not be empty or whitespace only"
    if error.validator == "enum":
        return f"{where}: expected one of {', '.join(map(str, error.validator_value))}, got {instance!r}"
    if error.validator == "contains":
        return f"{where}: needs at least one assistant turn"
    if error.validator == "minItems":
        return f"{where}: must not be empty"
    return f"{where}: {error.message}"


def normalize(record, fmt):
    fields = {"format": fmt}
    if fmt == "alpaca":
        fields.update(instruction=record["instruction"], input=record.get("input", ""), output=record["output"])
    elif fmt == "chat":
        fields["messages"] = [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
    else:
        fields["text"] = record["text"]
    canonical = json.dumps(fields, sort_keys=True, ensure_ascii=False)
    return {"id": hashlib.sha256(canonical.encode()).hexdigest()[:16], **fields}


def read_lines(path):
    """(line number, text) of each non-blank line; BOM and CRLF tolerated."""
    raw = Path(path).read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    for number, line in enumerate(raw.split(b"\n"), start=1):
        try:
            text = line.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError as exc:
            yield number, None, f"not valid UTF-8 (byte {exc.start + 1} of the line)"
            continue
        if text.strip():
            yield number, text, None


def validate_file(path, fmt="auto", schema_dir=SCHEMA_DIR, max_errors=20, drop_duplicates=False):
    """Normalized records and stats of one file; raises DataError listing the problems."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    schemas = load_schemas(schema_dir)
    records, errors, seen = [], [], set()
    stats = {"file": str(path), "lines": 0, "records": 0, "duplicates": 0, "duplicates_dropped": 0}
    for number, text, problem in read_lines(path):
        stats["lines"] += 1
        where = f"{path}:{number}"
        if problem is None:
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                problem = f"invalid JSON: {exc.msg} (column {exc.colno})"
        if problem is None and not isinstance(record, dict):
            problem = f"expected a JSON object per line, got {JSON_TYPES.get(type(record), 'value')}"
            if isinstance(record, list) and number == 1:
                problem += " (is this a JSON array file? write one object per line: JSONL)"
        if problem is None and fmt == "auto":
            fmt = detect_format(record)
            if fmt is None:
                problem = "cannot tell the record format (no 'instruction', 'messages' or 'text' field)"
                fmt = "auto"
        if problem is None:
            schema_errors = sorted(schemas[fmt].iter_errors(record), key=lambda e: list(e.absolute_path))
            if schema_errors:
                errors += [f"{where}: {describe(e)}" for e in schema_errors]
                if len(errors) >= max_errors:
                    break
                continue
        if problem is not None:
            errors.append(f"{where}: {problem}")
            if len(errors) >= max_errors:
                break
            continue
        normalized = normalize(record, fmt)
        if normalized["id"] in seen:
            stats["duplicates"] += 1
            if drop_duplicates:
                stats["duplicates_dropped"] += 1
                continue
        seen.add(normalized["id"])
        records.append({**normalized, "line": number})
    if errors:
        more = " (stopped at the first {max_errors})".format(max_errors=max_errors) if len(errors) >= max_errors else ""
        raise DataError(f"{len(errors)} invalid record(s) in {path}{more}:\n" + "\n".join(errors[:max_errors]))
    if not records:
        raise DataError(f"{path}: no records (the file is empty)")
    stats.update(records=len(records), format=fmt)
    return records, stats


def write_atomically(path, text):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True, help="normalized records (JSONL)")
    parser.add_argument("--stats", type=Path, required=True)
    parser.add_argument("--format", choices=("auto", *FORMATS), default="auto")
    parser.add_argument("--schema-dir", type=Path, default=SCHEMA_DIR)
    parser.add_argument("--max-errors", type=int, default=20)
    parser.add_argument("--drop-duplicates", action="store_true")
    args = parser.parse_args()
    try:
        records, stats = validate_file(args.input, args.format, args.schema_dir, args.max_errors, args.drop_duplicates)
    except DataError as exc:
        print(exc, file=sys.stderr)
        sys.exit(1)
    write_atomically(args.output, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    write_atomically(args.stats, json.dumps(stats, indent=2) + "\n")
    print(f"{args.input}: {stats['records']} {stats['format']} records, {stats['duplicates']} duplicate(s)")


if __name__ == "__main__":
    main()
