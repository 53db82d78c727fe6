"""Rows of CSV and TSV files: a header row names the columns, each row is numbered by the line
where it starts (a quoted cell may span lines), cells are text, and a `messages` cell holds the
conversation as strict JSON.

    for row in csv_rows("data/qa.csv", columns={"output": "answer"}, delimiter=","):
        row.number, row.record, row.problem, row.text
"""
import collections
import csv

from finetune.data.text_sources import (UTF8_BOM, DataError, Problem, Row, check_columns, column_note,
                                        parse_strict_json, table_record)


class TrackedLines:
    """A file's lines for csv.reader: decoded, counted, and kept until the row they make is taken."""

    def __init__(self, file):
        self.file, self.number, self.lines, self.problem = file, 0, [], None

    def __iter__(self):
        return self

    def __next__(self):
        raw = next(self.file)
        self.number += 1
        if self.number == 1 and raw.startswith(UTF8_BOM):
            raw = raw[len(UTF8_BOM):]
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            self.problem = self.problem or Problem("not_utf8", f"not valid UTF-8 (byte {exc.start + 1} of line "
                                                               f"{self.number})")
            line = raw.decode("utf-8", "replace")
        self.lines.append(line)
        return line

    def take(self):
        """(the line where the row starts, its text, a decoding problem or None); the next row starts after it."""
        start, text, problem = self.number - len(self.lines) + 1, "".join(self.lines).rstrip("\r\n"), self.problem
        self.lines, self.problem = [], None
        return start, text, problem


def csv_rows(path, columns, delimiter):
    csv.field_size_limit(2 ** 31 - 1)
    with open(path, "rb") as f:
        lines, header = TrackedLines(f), None
        reader = csv.reader(lines, delimiter=delimiter, strict=True)
        while True:
            try:
                cells = next(reader, None)
            except csv.Error as exc:
                raise DataError(f"{path}:{lines.number}: not readable as {'CSV' if delimiter == ',' else 'TSV'}: "
                                f"{exc}") from None
            if cells is None:
                return
            start, text, problem = lines.take()
            if not cells:
                continue
            if header is None:
                header = check_header(path, start, cells, columns)
            elif problem or len(cells) != len(header):
                yield Row(start, None, problem or Problem("wrong_cell_count", f"{len(cells)} cells, but the header "
                                                                              f"names {len(header)} columns"), text)
            else:
                yield csv_row(start, table_record(dict(zip(header, cells)), columns), columns, text)


def check_header(path, line, header, columns):
    repeated = [name for name, count in collections.Counter(header).items() if count > 1]
    if repeated:
        raise DataError(f"{path}:{line}: column '{repeated[0]}' appears more than once in the header")
    check_columns(path, header, columns)
    return header


def csv_row(number, record, columns, text):
    """The row, its `messages` cell (a conversation as JSON text) parsed, and so an answer cell that holds
    a list of messages; a `label` cell of true or false (any case) is a boolean."""
    for field in ("messages", "chosen", "rejected", "completion"):
        value = record.get(field)
        if not isinstance(value, str) or (field != "messages" and not value.lstrip().startswith("[")):
            continue
        try:
            record[field] = parse_strict_json(value)
        except Problem as exc:
            return Row(number, None, Problem(exc.reason, f"field '{field}'{column_note(field, columns)}: {exc}"), text)
    if isinstance(record.get("label"), str) and record["label"].strip().lower() in ("true", "false"):
        record["label"] = record["label"].strip().lower() == "true"
    return Row(number, record, None, text)
