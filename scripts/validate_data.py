"""Validate one dataset and write its normalized records and stats.

The dataset is a JSONL, JSON, Parquet or CSV file, a folder written by
datasets' save_to_disk, or a Hub dataset (finetune/data/sources.py reads each).
Every record is checked against its format's schema (finetune/data/validation.py);
bad input stops here naming file, line and field, and nothing is written, so no
training starts on bad data (with on_error: skip, bad records are set aside).

    python scripts/validate_data.py --input data/foo.jsonl --settings validate_data.json \
        --output results/data/foo.jsonl --rejected results/data/foo.rejected.jsonl \
        --stats results/data/foo.validation.json
"""
import argparse
import sys
from pathlib import Path

from finetune.data.text_sources import DataError
from finetune.data.validation import SCHEMA_DIR, validate_file
from finetune.files import write_json
from finetune.settings import read_settings


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="a data file, a datasets folder or hf://datasets/OWNER/NAME")
    parser.add_argument("--settings", type=Path, required=True, help="this stage's settings (JSON)")
    parser.add_argument("--output", type=Path, required=True, help="normalized records (JSONL)")
    parser.add_argument("--rejected", type=Path, required=True, help="bad records with their reasons (JSONL)")
    parser.add_argument("--stats", type=Path, required=True)
    parser.add_argument("--schema-dir", type=Path, default=SCHEMA_DIR, help="one JSON Schema per record format")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    settings = read_settings(args.settings, "validate_data")
    try:
        stats = validate_file(args.input, args.output, args.rejected, settings.format, settings.on_error,
                              settings.max_errors, settings.max_rejected_fraction, settings.drop_duplicates,
                              args.schema_dir, settings.columns, settings.source_split, settings.revision)
    except DataError as exc:
        print(exc, file=sys.stderr)
        sys.exit(1)
    write_json(args.stats, stats)
    print(f"{args.input} ({stats['source']}): {stats['records']} {stats['format']} records, {stats['rejected']} "
          f"rejected, {stats['duplicates']} duplicate(s) ({stats['duplicates_dropped']} dropped)")


if __name__ == "__main__":
    main()
