"""Any common data source: JSONL, a JSON array, Parquet, CSV/TSV, a datasets save_to_disk folder
(and a Hub dataset, of which only the offline failure is tested) all become the same normalized
records, with `columns` mapping a source's column names onto the formats' fields, and messages
that name file, row and field. Editing one source reruns only what read it."""
import csv
import json
import os
import subprocess
import sys
import time

import pytest

from conftest import REPO, settings_args
from finetune.data.validation import DataError, validate_file
from finetune.settings import read_settings
from test_sweeps import create_outputs
from workflow import copy_workflow, dry_run_jobs, planned_jobs, snakemake

RECORDS = [
    {"instruction": "Add the two numbers.", "input": "1 and 2", "output": "3"},
    {"instruction": "Say hello.", "input": "", "output": "Hello,\nworld", "task": "greeting"},
    {"instruction": "Name a colour.", "input": "", "output": "Blue"},
]
CHATS = [
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                  {"role": "assistant", "content": "4"}]},
]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_json_array(path, records):
    path.write_text(json.dumps(records, indent=2) + "\n")
    return path


def all_columns(records):
    return list(dict.fromkeys(key for record in records for key in record))


def as_table(records):
    """The records as a table's rows: every column in each (null where a record has no such key)."""
    return [{column: record.get(column) for column in all_columns(records)} for record in records]


def write_parquet(path, records):
    import pyarrow
    import pyarrow.parquet
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(as_table(records)), path)
    return path


def write_csv(path, records, delimiter=","):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, all_columns(records), delimiter=delimiter)
        writer.writeheader()
        for record in records:
            writer.writerow({key: json.dumps(value) if key == "messages" else value for key, value in record.items()})
    return path


def write_datasets_folder(path, records, split=None):
    import datasets
    datasets.disable_progress_bars()
    dataset = datasets.Dataset.from_list(as_table(records))
    (datasets.DatasetDict({split: dataset, "other": dataset.select([0])}) if split else dataset).save_to_disk(path)
    return path


WRITERS = {"data.jsonl": write_jsonl, "data.json": write_json_array, "data.parquet": write_parquet,
           "data.csv": write_csv, "data.tsv": lambda p, r: write_csv(p, r, "\t"), "folder": write_datasets_folder}


def validated(path, out=None, **kwargs):
    """(normalized records, stats) of a source."""
    out = out or path.parent / f"out-{path.name}"
    stats = validate_file(path, out / "records.jsonl", out / "rejected.jsonl", **kwargs)
    return [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()], stats


def errors_of(path, **kwargs):
    """The messages of a validation that fails, which leaves nothing behind."""
    out = path.parent / f"failed-{path.name}"
    with pytest.raises(DataError) as info:
        validated(path, out, **kwargs)
    assert not list(out.glob("*")), "a failed validation writes nothing"
    return str(info.value).splitlines()


def without_lines(records):
    return [{key: value for key, value in record.items() if key != "line"} for record in records]


def test_every_kind_of_source_gives_the_same_normalized_records(tmp_path):
    expected, _ = validated(write_jsonl(tmp_path / "reference.jsonl", RECORDS))
    lines = {}
    for name, write in WRITERS.items():
        records, stats = validated(write(tmp_path / name, RECORDS))
        assert without_lines(records) == without_lines(expected), name
        assert stats["records"] == 3 and stats["format"] == "alpaca", name
        lines[stats["source"]] = [record["line"] for record in records]
    assert lines == {"jsonl": [1, 2, 3], "json_array": [2, 7, 13], "parquet": [1, 2, 3], "csv": [2, 3, 5],
                     "tsv": [2, 3, 5], "datasets_folder": [1, 2, 3]}, "the line (row) each source reports"


@pytest.mark.parametrize("name", ["data.json", "data.parquet", "data.csv", "folder"])
def test_chats_from_every_kind_of_source_are_the_same_records(tmp_path, name):
    expected, _ = validated(write_jsonl(tmp_path / "reference.jsonl", CHATS))
    records, stats = validated(WRITERS[name](tmp_path / name, CHATS))
    assert without_lines(records) == without_lines(expected) and stats["format"] == "chat"


def test_a_json_file_of_one_object_per_line_is_jsonl(tmp_path):
    records, stats = validated(write_jsonl(tmp_path / "lines.json", RECORDS))
    assert stats["source"] == "jsonl" and len(records) == 3


def test_a_split_of_a_datasetdict_folder(tmp_path):
    folder = write_datasets_folder(tmp_path / "dict", RECORDS, split="train")
    records, stats = validated(folder)
    assert len(records) == 3 and stats["source"] == "datasets_folder"
    records, stats = validated(folder, source_split="other")
    assert len(records) == 1 and stats["source_split"] == "other"
    assert errors_of(folder, source_split="test") == [
        f"{folder}: no split 'test' (its splits: train, other); set the dataset's source_split"]


QA = [{"question": r["instruction"], "context": r["input"], "answer": r["output"], "source": "quiz"} for r in RECORDS]
QA_COLUMNS = {"instruction": "question", "input": "context", "output": "answer"}


@pytest.mark.parametrize("name", ["data.jsonl", "data.parquet", "data.csv", "folder"])
def test_columns_map_a_sources_names_onto_the_formats_fields(tmp_path, name):
    expected, _ = validated(write_jsonl(tmp_path / "reference.jsonl", [
        {key: value for key, value in r.items() if key != "task"} for r in RECORDS]))
    records, stats = validated(WRITERS[name](tmp_path / name, QA), columns=QA_COLUMNS)
    assert without_lines(records) == without_lines(expected)
    assert stats["columns"] == QA_COLUMNS


def test_a_null_in_a_parquet_row_is_named_by_row_field_and_column(tmp_path):
    path = write_parquet(tmp_path / "qa.parquet", QA[:1] + [{**QA[1], "answer": None}] + QA[2:])
    assert errors_of(path, columns=QA_COLUMNS) == [
        f"1 invalid record(s) in {path}:", f"{path}:2: field 'output' (column 'answer'): expected string, got null"]


def test_a_bad_csv_row_is_named_by_the_line_it_starts_on(tmp_path):
    path = write_csv(tmp_path / "data.csv", RECORDS + [{**RECORDS[0], "output": " "}])
    assert errors_of(path)[1:] == [f"{path}:6: field 'output': must not be empty or whitespace only"]
    path.write_text(path.read_text() + "just,two\n")
    assert errors_of(path)[2:] == [f"{path}:7: 2 cells, but the header names 4 columns"]
    path.write_text(path.read_text() + '"an open quote,x,y,z\n')
    assert errors_of(path) == [f"{path}:8: not readable as CSV: unexpected end of data"]


def test_a_bad_messages_cell_of_a_csv_is_invalid_json_named_by_field(tmp_path):
    path = write_csv(tmp_path / "chat.csv", CHATS)
    path.write_text(path.read_text() + '"[{""role"": ""user"", ""content"": ""Hi""}"\n')
    assert errors_of(path)[1:] == [f"{path}:4: field 'messages': invalid JSON: Expecting ',' delimiter (column 35)"]
    assert errors_of(path, columns={"messages": "messages"})[1:] == [
        f"{path}:4: field 'messages' (column 'messages'): invalid JSON: Expecting ',' delimiter (column 35)"]


def test_a_bad_json_array_element_is_named_by_the_line_it_starts_on(tmp_path):
    path = write_json_array(tmp_path / "data.json", RECORDS + [{**RECORDS[0], "output": None}, 42])
    assert errors_of(path)[1:] == [f"{path}:18: field 'output': expected string, got null",
                                   f"{path}:23: expected a JSON object as each element of the array, got integer"]


def test_a_strict_json_problem_in_one_element_leaves_the_others_readable(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[\n  {"instruction": "x", "output": NaN},\n  {"instruction": "y",\n   "output": "z"}\n]\n')
    assert errors_of(path)[1:] == [
        f"{path}:2: invalid JSON: NaN is not a JSON value (RFC 8259 has no NaN or Infinity)"]
    records, stats = validated(path, on_error="skip", max_rejected_fraction=0.5)
    assert [(r["instruction"], r["line"]) for r in records] == [("y", 3)] and stats["rejected"] == 1


def test_a_json_array_syntax_error_stops_the_reading_and_names_its_line(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[\n  {"instruction": "x", "output": "y"},\n  {"instruction": "x" "output": "y"}\n]\n')
    assert errors_of(path, on_error="skip") == [
        f"{path}:3: invalid JSON: Expecting ',' delimiter (column 23); the array cannot be read past it"]


def test_a_mapped_column_the_source_lacks_is_named_with_the_columns_it_has(tmp_path):
    for name in ("data.parquet", "data.csv", "folder"):
        path = WRITERS[name](tmp_path / name, QA)
        assert errors_of(path, columns={"instruction": "question", "output": "response"}) == [
            f"{path}: `columns` maps column(s) it does not have: 'response' (for output); "
            "its columns: question, context, answer, source"], name


def test_unknown_kinds_of_path_are_refused_with_what_is_supported(tmp_path):
    sheet = tmp_path / "data.xlsx"
    sheet.write_bytes(b"PK")
    assert errors_of(sheet) == [
        f"{sheet}: unknown kind of data file ('.xlsx'); supported: JSONL (.jsonl), JSON (.json), Parquet (.parquet, "
        ".pq), CSV (.csv, .tsv), a folder written by datasets' save_to_disk, or a Hub dataset (hf://datasets/OWNER/NAME)"]
    (tmp_path / "plain").mkdir()
    assert "not one written by datasets' save_to_disk" in errors_of(tmp_path / "plain")[0]


def test_a_mistyped_local_path_is_not_found_not_looked_up_on_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for path in ("data/missing.jsonl", "someone/dataset"):
        with pytest.raises(DataError, match=f"^{path}: file not found$"):
            validate_file(path, tmp_path / "out.jsonl", tmp_path / "rejected.jsonl")


def test_a_mapping_from_no_field_is_refused_before_any_job(workdir):
    (workdir / "columns.yaml").write_text("datasets:\n  number_tasks: {columns: {answer: output}}\n")
    result = snakemake(workdir, "-n", "--configfile", "columns.yaml", check=False)
    assert result.returncode != 0 and "'answer' is not one of ['instruction'" in result.stdout + result.stderr


def test_hub_settings_on_a_local_file_are_refused(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", RECORDS)
    assert errors_of(path, revision="v1") == [
        f"{path}: revision applies only to a Hub dataset (a path hf://datasets/OWNER/NAME)"]
    assert errors_of(path, source_split="test") == [
        f"{path}: source_split applies only to a Hub dataset or a datasets folder with splits"]


def cli(tmp_path, source, env=None, **settings):
    out = tmp_path / "results"
    return subprocess.run([sys.executable, REPO / "scripts" / "validate_data.py", "--input", source,
                           *settings_args(tmp_path / "settings", "validate_data", **settings),
                           "--output", out / "d.jsonl", "--rejected", out / "d.rejected.jsonl",
                           "--stats", out / "d.validation.json"],
                          capture_output=True, text=True, env={**os.environ, **(env or {})}), out


def test_offline_a_hub_dataset_outside_the_cache_fails_at_once_saying_what_to_do(tmp_path):
    started = time.monotonic()
    result, out = cli(tmp_path, "hf://datasets/someone/not-cached", revision="v1",
                      env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert result.returncode == 1 and time.monotonic() - started < 30
    message = result.stderr.strip()
    assert message.startswith("hf://datasets/someone/not-cached: split 'train' at revision 'v1' is not in the local "
                              "Hugging Face cache, and the Hub cannot be reached offline"), message
    assert "datasets.load_dataset('someone/not-cached', split='train', revision='v1')" in message
    assert "save_to_disk and set this dataset's path to that folder" in message
    assert not list(out.glob("*"))


def test_the_cli_maps_columns_and_records_where_the_records_came_from(tmp_path):
    path = write_parquet(tmp_path / "qa.parquet", QA)
    result, out = cli(tmp_path, path, columns=QA_COLUMNS)
    assert result.returncode == 0, result.stderr
    stats = json.loads((out / "d.validation.json").read_text())
    assert stats["source"] == "parquet" and stats["columns"] == QA_COLUMNS and stats["records"] == 3
    assert result.stdout.startswith(f"{path} (parquet): 3 alpaca records")


# The workflow: a source's files are the validate job's inputs.

@pytest.fixture
def workdir(tmp_path):
    workdir = copy_workflow(tmp_path / "wf")
    records = [json.loads(line) for line in (workdir / "data/number_tasks.jsonl").read_text().splitlines()]
    write_parquet(workdir / "data/number_tasks.parquet", records)
    (workdir / "data/number_tasks.jsonl").unlink()
    records = [json.loads(line) for line in (workdir / "data/word_tasks.jsonl").read_text().splitlines()]
    write_datasets_folder(workdir / "data/word_tasks", records)
    (workdir / "data/word_tasks.jsonl").unlink()
    (workdir / "sources.yaml").write_text("datasets:\n  number_tasks: {path: data/number_tasks.parquet}\n"
                                          "  word_tasks: {path: data/word_tasks}\n")
    return workdir


def edit(path):
    later = time.time() + 10
    os.utime(path, (later, later))


def create_outputs_of_data_edited_long_ago(workdir, args):
    """Every output of the workflow, newer than each data file."""
    earlier = time.time() - 3600
    for folder, _, names in os.walk(workdir / "data"):
        for name in names:
            os.utime(os.path.join(folder, name), (earlier, earlier))
    create_outputs(workdir, snakemake(workdir, "-n", *args).stdout)


def rerun_datasets(jobs):
    return sorted({job.split("dataset=")[1].rstrip("]") for job in jobs
                   if job.startswith(("validate[", "tokenize[", "dataset_stats["))})


def test_editing_a_parquet_file_or_a_datasets_folder_reruns_only_its_dataset(workdir):
    args = ["--configfile", "sources.yaml"]
    create_outputs_of_data_edited_long_ago(workdir, args)
    assert planned_jobs(workdir, *args) == []
    edit(workdir / "data/number_tasks.parquet")
    jobs = planned_jobs(workdir, *args)
    assert rerun_datasets(jobs) == ["number_tasks"] and "validate[dataset=number_tasks]" in jobs
    assert "train[run=lora-r16]" in jobs, "what depends on the dataset reruns too"

    create_outputs_of_data_edited_long_ago(workdir, args)
    edit(next((workdir / "data/word_tasks").glob("*.arrow")))
    assert rerun_datasets(planned_jobs(workdir, *args)) == ["word_tasks"]


def test_a_hub_dataset_has_no_input_file_and_its_split_and_revision_are_its_settings(workdir):
    (workdir / "hub.yaml").write_text("datasets:\n  word_tasks: {path: 'hf://datasets/someone/word-tasks', "
                                      "source_split: validation, revision: v1.0, columns: {output: answer}}\n")
    jobs = dry_run_jobs(workdir, "results/data/word_tasks.jsonl", "--configfile", "hub.yaml")
    [(inputs, shell)] = [(inputs, shell) for rule, inputs, shell in jobs if rule == "validate"]
    assert not [path for path in inputs if path.startswith("data/")]
    settings_file = "results/data/word_tasks/settings/validate_data.json"
    assert "--input hf://datasets/someone/word-tasks" in shell and f"--settings {settings_file}" in shell, shell
    snakemake(workdir, settings_file, "--cores", "1", "--configfile", "hub.yaml")
    settings = read_settings(workdir / settings_file, "validate_data")
    assert (settings.source_split, settings.revision, settings.columns) == ("validation", "v1.0", {"output": "answer"})
