"""Rows of the JSON data files: JSONL and a JSON array, each row numbered by the line where it
starts, so that messages name file, line and field. JSON is read strictly (RFC 8259: no NaN or
Infinity, no repeated keys, no number beyond a float, no lone surrogate), as pyarrow and jq read
it. Also the row and problem types of every source, and the mapping of source columns onto the
formats' fields (`columns`); sources.py picks the reader for a path, csv_source.py reads CSV and TSV.

    for row in jsonl_rows("data/foo.jsonl", columns={}):
        row.number, row.record, row.problem, row.text
"""
import collections
import json
from typing import NamedTuple

UTF8_BOM = b"\xef\xbb\xbf"
JSON_TYPES = {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer", float: "number",
              type(None): "null"}
ARRAY_HINT = " (is this a JSON array file? write one object per line: JSONL)"
OPTIONAL_FIELDS = ("input", "task")  # of the record formats (schemas/records)


class DataError(Exception):
    """Bad input data; the message lists the problems found, one per line."""


class Problem(Exception):
    """One bad record: a reason category (for stats) and a message."""

    def __init__(self, reason, message):
        super().__init__(message)
        self.reason = reason


class Row(NamedTuple):
    number: int  # the line (JSONL, JSON, CSV) or row (Parquet, datasets) that messages name
    record: dict | None  # with the columns mapped to fields; None when problem is set
    problem: Problem | None
    text: str | None  # the row as read, for the rejected file


# Columns

def mapped(row, columns):
    """The row with each mapped column under its field's name; the other columns kept as they are."""
    if not columns:
        return row
    renamed = set(columns.values())
    record = {key: value for key, value in row.items() if key not in renamed and key not in columns}
    record.update({field: row[column] for field, column in columns.items() if column in row})
    return record


def table_record(row, columns):
    """A row of a table (CSV, Parquet, datasets) as a record: its columns mapped, and an optional field
    that is null or empty left out, as a table cannot leave out one row's value otherwise."""
    record = mapped(row, columns)
    for field in OPTIONAL_FIELDS:
        if record.get(field, 0) in (None, ""):
            del record[field]
    return record


def column_note(field, columns):
    """' (column 'answer')' for a field that a mapped column fills, for messages; else ''."""
    return f" (column '{columns[field]}')" if columns and field in columns else ""


def check_columns(path, names, columns):
    """DataError unless the source has every column that `columns` maps."""
    missing = [f"'{column}' (for {field})" for field, column in columns.items() if column not in names]
    if missing:
        raise DataError(f"{path}: `columns` maps column(s) it does not have: {', '.join(missing)}; "
                        f"its columns: {', '.join(names) or 'none'}")


# JSON, read strictly

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


# A strict reader (RFC 8259; pyarrow, jq): Python's json module alone also takes NaN, Infinity, repeated keys,
# numbers beyond a float and lone surrogate escapes. The lenient one only finds where a JSON value ends.
STRICT_JSON = json.JSONDecoder(parse_constant=_not_json, parse_float=_finite_number,
                               object_pairs_hook=_object_without_duplicate_keys)
LENIENT_JSON = json.JSONDecoder(strict=False, parse_int=str, parse_float=str, parse_constant=str)


def strictly(parse):
    """The value `parse()` returns, held to the strict reader; Problem otherwise."""
    try:
        value = parse()
    except json.JSONDecodeError:
        raise  # its position is told by the caller
    except ValueError as exc:  # an integer with more digits than Python converts
        raise Problem("invalid_json", f"invalid JSON: {exc}") from None
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise Problem("invalid_json", "invalid JSON: a \\u escape is half of a surrogate pair (not Unicode text)") from None
    return value


def parse_strict_json(text):
    """A JSON text as the strict reader accepts it, or Problem."""
    try:
        return strictly(lambda: STRICT_JSON.decode(text))
    except json.JSONDecodeError as exc:
        raise Problem("invalid_json", f"invalid JSON: {exc.msg} (column {exc.colno})") from None


def read_lines(path):
    """(line number, text or None, problem or None) for each non-blank line; BOM and CRLF tolerated."""
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if number == 1 and line.startswith(UTF8_BOM):
                line = line[len(UTF8_BOM):]
            try:
                text = line.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as exc:
                yield number, None, Problem("not_utf8", f"not valid UTF-8 (byte {exc.start + 1} of the line)")
                continue
            if text.strip():
                yield number, text, None


def jsonl_record(text, first):
    """One line's JSON object, or Problem (on the first line, with a hint when the file is one JSON array)."""
    try:
        record = parse_strict_json(text)
    except Problem as exc:
        hint = ARRAY_HINT if first and text.lstrip().startswith("[") and "column" in str(exc) else ""
        raise Problem(exc.reason, f"{exc}{hint}") from None
    if not isinstance(record, dict):
        hint = ARRAY_HINT if first and isinstance(record, list) else ""
        raise Problem("not_an_object", f"expected a JSON object per line, got {JSON_TYPES.get(type(record), 'value')}"
                                       f"{hint}")
    return record


def jsonl_rows(path, columns):
    for index, (number, text, problem) in enumerate(read_lines(path)):
        try:
            if problem:
                raise problem
            yield Row(number, mapped(jsonl_record(text, first=index == 0), columns), None, text)
        except Problem as exc:
            yield Row(number, None, exc, text)


def read_utf8(path):
    with open(path, "rb") as f:
        data = f.read()
    data = data[len(UTF8_BOM):] if data.startswith(UTF8_BOM) else data
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line, line_start = data.count(b"\n", 0, exc.start) + 1, data.rfind(b"\n", 0, exc.start) + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte {exc.start - line_start + 1} of the line)") from None


def json_array_rows(path, columns):
    """Each element of a JSON array, numbered by the line where it starts. The whole text is read at
    once (an array has no lines to stream by); a syntax error ends the reading, naming its line."""
    text = read_utf8(path)
    position, line, counted = skip_space(text, skip_space(text, 0) + 1), 1, 0
    if text.startswith("]", position):
        position = skip_space(text, position + 1)
    else:
        while True:
            line, counted = line + text.count("\n", counted, position), position
            end, row = json_element(path, text, position, line, columns)
            yield row
            position = skip_space(text, end)
            if not text.startswith((",", "]"), position):
                array_syntax_error(path, text, position, "expected ',' or ']' after an element of the array")
            if text.startswith("]", position):
                position = skip_space(text, position + 1)
                break
            position = skip_space(text, position + 1)
    if position < len(text):
        array_syntax_error(path, text, position, "extra data after the array")


def json_element(path, text, position, line, columns):
    """(where the element ends, its Row)."""
    try:
        value, end = strictly(lambda: STRICT_JSON.raw_decode(text, position))
        problem = None
    except json.JSONDecodeError as exc:
        problem = Problem("invalid_json", f"invalid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})")
    except Problem as exc:
        problem = exc
    if problem:
        try:
            end = LENIENT_JSON.raw_decode(text, position)[1]
        except json.JSONDecodeError as exc:
            array_syntax_error(path, text, exc.pos, exc.msg)
    elif not isinstance(value, dict):
        problem = Problem("not_an_object", "expected a JSON object as each element of the array, got "
                                           f"{JSON_TYPES.get(type(value), 'value')}")
    return end, Row(line, None if problem else mapped(value, columns), problem, text[position:end])


def skip_space(text, position):
    while position < len(text) and text[position] in " \t\r\n":
        position += 1
    return position


def array_syntax_error(path, text, position, message):
    line, column = text.count("\n", 0, position) + 1, position - text.rfind("\n", 0, position)
    raise DataError(f"{path}:{line}: invalid JSON: {message} (column {column}); the array cannot be read past it")
