"""Merge a LoRA adapter into its base model and save a standalone model
(safetensors, config, generation config, tokenizer) that loads with
`AutoModelForCausalLM.from_pretrained` and needs no peft. (The export stage
publishes it with its model card.)

The base is loaded unquantized in merge_dtype: merging into quantized weights
loses quality, so even QLoRA adapters are merged into a full-precision base.

    python scripts/merge.py --base-model results/base_models/tiny-llama --settings merge.json \
        --adapter-dir results/runs/r8/trained --output-dir results/runs/r8/merged_weights
"""
import argparse
from pathlib import Path

import torch

from finetune.data.tokenizer import load_tokenizer
from finetune.files import save_pretrained_atomically
from finetune.models import DTYPES, load_adapter, load_base_model
from finetune.settings import read_settings


def merge(base_model, adapter_dir, output_dir, merge_dtype="fp32", trust_remote_code=False):
    tokenizer = load_tokenizer(adapter_dir, trust_remote_code=trust_remote_code)
    base = load_base_model(base_model, dtype=DTYPES[merge_dtype], tokenizer=tokenizer,
                           trust_remote_code=trust_remote_code)
    merged = load_adapter(base, adapter_dir).merge_and_unload()
    return save_pretrained_atomically(output_dir, merged, tokenizer)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-model", required=True, help="local path or Hub id")
    parser.add_argument("--settings", type=Path, required=True, help="this stage's settings (JSON)")
    parser.add_argument("--adapter-dir", type=Path, required=True, help="the trained adapter")
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    settings = read_settings(args.settings, "merge")
    if args.threads:
        torch.set_num_threads(args.threads)
    merge(args.base_model, args.adapter_dir, args.output_dir, settings.merge_dtype, settings.trust_remote_code)
    print(f"merged model written to {args.output_dir}")


if __name__ == "__main__":
    main()
