"""Tokenize one file of normalized records into an Arrow shard for training
(finetune/data/tokenization.py), with the prompt template of the base model's
tokenizer, and write its stats (counts, truncation, token-length percentiles).

    python scripts/tokenize_data.py --input results/data/foo.jsonl --settings tokenize_data.json \
        --tokenizer results/base_models/tiny-llama \
        --output results/tokens/TOKENIZATION/foo.arrow --stats results/tokens/TOKENIZATION/foo.stats.json
"""
import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

import argparse  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from finetune.data.tokenization import RecordError, tokenize_file  # noqa: E402
from finetune.data.tokenizer import load_tokenizer  # noqa: E402
from finetune.files import write_json  # noqa: E402
from finetune.settings import read_settings  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", type=Path, required=True, help="normalized records from validate_data.py")
    parser.add_argument("--settings", type=Path, required=True, help="this stage's settings (JSON)")
    parser.add_argument("--tokenizer", required=True, help="local path or Hub id of the base model")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--stats", type=Path, required=True)
    parser.add_argument("--source", default=None,
                        help="the dataset's source (a file, a folder or hf://datasets/...), named in errors")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    settings = read_settings(args.settings, "tokenize_data")
    tokenizer = load_tokenizer(args.tokenizer, settings.chat_template, settings.trust_remote_code)
    try:
        stats = tokenize_file(args.input, tokenizer, settings.template, settings.max_length, args.output,
                              settings.train_on_inputs, settings.too_long, settings.split, settings.fraction,
                              source=args.source)
    except RecordError as exc:
        sys.exit(str(exc))
    write_json(args.stats, stats)
    print(f"{args.input}: {stats['records']} records ({stats['train']} train, {stats['eval']} eval), "
          f"{stats['tokens']} tokens, {stats['too_long']} longer than {settings.max_length} "
          f"({stats['truncated']} truncated, {stats['dropped_too_long']} dropped)"
          + (f"; {stats['no_answer_left']} dropped with an answer cut away" if "no_answer_left" in stats else ""))


if __name__ == "__main__":
    main()
