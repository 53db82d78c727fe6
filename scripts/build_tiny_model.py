"""Build the embedded tiny Llama model offline (finetune/tiny_model.py): a tokenizer
trained on the corpus, standard random initialization, saved with save_pretrained.
The workflow then pretrains it on the same corpus (scripts/train.py, method full).

    python scripts/build_tiny_model.py --corpus results/data/pretrain_corpus.jsonl \
        --settings build_tiny_model.json --output results/pretrain/tiny-llama/init
"""
import argparse
from pathlib import Path

from finetune.settings import read_settings
from finetune.tiny_model import build_tiny_model


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, nargs="+", required=True,
                        help="JSONL records whose text trains the tokenizer")
    parser.add_argument("--settings", type=Path, required=True, help="this stage's settings (JSON)")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)
    for path in args.corpus:
        if not path.is_file():
            parser.error(f"corpus file not found: {path}")
    return args


def main(argv=None):
    args = parse_args(argv)
    s = read_settings(args.settings, "build_tiny_model")
    build_tiny_model(args.corpus, args.output, s.vocab_size, s.hidden_size, s.num_layers, s.num_heads,
                     s.num_kv_heads, s.intermediate_size, s.initializer_range, s.seed)
    print(f"tiny model written to {args.output}")


if __name__ == "__main__":
    main()
