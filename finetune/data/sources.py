"""Read a dataset from any common source as rows of records, for validation.

The kind of source follows from its path:

    hf://datasets/OWNER/NAME   a Hugging Face Hub dataset: datasets.load_dataset(OWNER/NAME, split=source_split
                               (default train), revision=revision); offline, only from the local cache
    a folder                   written by datasets' save_to_disk (of a DatasetDict: its split source_split)
    .jsonl                     one JSON object per line; row: the line
    .json                      one JSON array of objects (row: the line where each element starts), or JSONL
    .parquet, .pq              read in record batches; row: the row, from 1; nulls are null
    .csv, .tsv                 a header row names the columns; row: the line where the row starts; cells are
                               text, and a `messages` cell holds the conversation as JSON

Only a path that starts with hf://datasets/ is read from the Hub: any other is a local file or folder,
so a mistyped one is "file not found", never a look-up on the Hub; another extension is refused with
the list above. `columns` maps a format's fields to the source's column names (e.g.
{"instruction": "question", "output": "answer"}); other columns are kept as they are. A tabular source
(Parquet, CSV, a datasets folder, the Hub) must have every mapped column, checked before any row is read.
The text files are read by text_sources.py (JSON) and csv_source.py.

    for row in read_source("data/qa.parquet", columns={"output": "answer"}):
        row.number, row.record, row.problem, row.text   # record or problem; text: the row as it was read
"""
import json
import os
import re

from finetune.data.csv_source import csv_rows
from finetune.data.text_sources import UTF8_BOM, DataError, Row, check_columns, json_array_rows, jsonl_rows, table_record

HUB_PREFIX = "hf://datasets/"
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")
SUFFIXES = {".jsonl": "jsonl", ".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".tsv": "tsv"}
SUPPORTED = ("JSONL (.jsonl), JSON (.json), Parquet (.parquet, .pq), CSV (.csv, .tsv), a folder written by datasets' "
             "save_to_disk, or a Hub dataset (hf://datasets/OWNER/NAME)")
DATASETS_FOLDER_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")
BATCH_ROWS = 1000


def is_hub_dataset(path):
    return str(path).startswith(HUB_PREFIX)


def source_kind(path):
    """hub, datasets_folder, jsonl, json_array, parquet, csv or tsv; DataError for anything else."""
    path = str(path)
    if is_hub_dataset(path):
        return "hub"
    if os.path.isdir(path):
        if not any(os.path.isfile(os.path.join(path, name)) for name in DATASETS_FOLDER_FILES):
            raise DataError(f"{path}: a folder, but not one written by datasets' save_to_disk (it has none of "
                            f"{', '.join(DATASETS_FOLDER_FILES)})")
        return "datasets_folder"
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".json":
        return "json_array" if first_character(path) == "[" else "jsonl"
    if suffix not in SUFFIXES:
        raise DataError(f"{path}: unknown kind of data file ('{suffix or 'no extension'}'); supported: {SUPPORTED}")
    return SUFFIXES[suffix]


def first_character(path):
    """The file's first character that is not whitespace (after a BOM), or '' for a blank file."""
    with open(path, "rb") as f:
        start = f.read(len(UTF8_BOM))
        chunk = start if start != UTF8_BOM else b""
        while True:
            stripped = chunk.lstrip(b" \t\r\n")
            if stripped:
                return stripped[:1].decode("latin-1")
            chunk = f.read(65536)
            if not chunk:
                return ""


def read_source(path, columns=None, source_split=None, revision=None):
    """The source's rows (see Row), read as they are consumed. DataError when the source as a whole
    cannot be read: not found, an unknown kind, a mapped column it lacks, a JSON array that breaks off."""
    kind, columns = source_kind(path), columns or {}
    if revision is not None and kind != "hub":
        raise DataError(f"{path}: revision applies only to a Hub dataset (a path hf://datasets/OWNER/NAME)")
    if source_split is not None and kind not in ("hub", "datasets_folder"):
        raise DataError(f"{path}: source_split applies only to a Hub dataset or a datasets folder with splits")
    if kind == "jsonl":
        return jsonl_rows(path, columns)
    if kind == "json_array":
        return json_array_rows(path, columns)
    if kind in ("csv", "tsv"):
        return csv_rows(path, columns, delimiter="," if kind == "csv" else "\t")
    if kind == "parquet":
        return table_rows(path, lambda: parquet_table(path), columns)
    if kind == "datasets_folder":
        return table_rows(path, lambda: datasets_folder_table(path, source_split), columns)
    return table_rows(path, lambda: hub_table(path, source_split, revision), columns)


# Tables: Parquet, datasets folders and the Hub

def table_rows(path, open_table, columns):
    """The rows of a table that `open_table()` opens as (column names, batches of row dicts)."""
    names, batches = open_table()
    check_columns(path, names, columns)
    number = 0
    for batch in batches:
        for row in batch:
            number += 1
            yield Row(number, table_record(row, columns), None, json.dumps(row, ensure_ascii=False, default=str))


def parquet_table(path):
    import pyarrow
    import pyarrow.parquet

    try:
        file = pyarrow.parquet.ParquetFile(path)
    except (pyarrow.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    return file.schema_arrow.names, (batch.to_pylist() for batch in file.iter_batches(batch_size=BATCH_ROWS))


def dataset_table(dataset):
    """A datasets.Dataset as a table, read in Arrow batches (memory-mapped, as datasets keeps it)."""
    batches = dataset.with_format("arrow").iter(batch_size=BATCH_ROWS)
    return dataset.column_names, (batch.to_pylist() for batch in batches)


def datasets_folder_table(path, source_split):
    import datasets

    try:
        loaded = datasets.load_from_disk(path)
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise DataError(f"{path}: not readable as a folder written by datasets' save_to_disk ({exc})") from None
    if isinstance(loaded, datasets.DatasetDict):
        split = source_split or "train"
        if split not in loaded:
            raise DataError(f"{path}: no split '{split}' (its splits: {', '.join(loaded)}); set the dataset's "
                            "source_split")
        loaded = loaded[split]
    return dataset_table(loaded)


def hub_offline():
    return any(os.environ.get(name, "").upper() in ("1", "ON", "YES", "TRUE")
               for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def hub_table(path, source_split, revision):
    name, split = path[len(HUB_PREFIX):], source_split or "train"
    if not HUB_ID.match(name):
        raise DataError(f"{path}: not a Hub dataset id (write hf://datasets/OWNER/NAME)")
    offline = hub_offline()
    if offline:
        os.environ["HF_HUB_OFFLINE"] = "1"  # also when only HF_DATASETS_OFFLINE says so; read when datasets loads
    import datasets

    what = f"split '{split}'" + (f" at revision '{revision}'" if revision else "")
    try:
        dataset = datasets.load_dataset(name, split=split, revision=revision)
    except Exception as exc:  # datasets raises many kinds (ConnectionError, DatasetNotFoundError, ValueError, ...)
        if offline:
            call = f"datasets.load_dataset({name!r}, split={split!r}" + (f", revision={revision!r})" if revision else ")")
            raise DataError(
                f"{path}: {what} is not in the local Hugging Face cache, and the Hub cannot be reached offline "
                f"(HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set). Download it where there is a network ({call} "
                f"fills the cache), or save it there with save_to_disk and set this dataset's path to that folder. "
                f"({type(exc).__name__}: {exc})") from None
        raise DataError(f"{path}: cannot load {what} from the Hub ({type(exc).__name__}: {exc})") from None
    return dataset_table(dataset)
