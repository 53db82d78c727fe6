"""Combine one dataset's validation stats with the stats of each of its
tokenizations (token-length percentiles, truncation counts) into one file.

    python scripts/dataset_stats.py --validation results/data/foo.validation.json \
        --tokenized results/tokens/TOKENIZATION/foo.stats.json --output results/data/foo.stats.json
"""
import argparse
from pathlib import Path

from finetune.files import read_json, write_json


def combine(validation_path, tokenized_paths):
    stats = read_json(validation_path)
    stats["tokenized"] = {Path(p).parent.name: read_json(p) for p in tokenized_paths}
    return stats


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--validation", type=Path, required=True)
    parser.add_argument("--tokenized", type=Path, nargs="*", default=[], help="tokens/{tokenization}/{dataset}.stats.json")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()
    write_json(args.output, combine(args.validation, args.tokenized))


if __name__ == "__main__":
    main()
