"""The reference model's log-probabilities of every answer in one preference (or unpaired) shard:
what dpo, ipo and kto compare the model being trained with. Computed once per (reference model,
shard) and shared by every run with that reference, so a sweep over beta makes one pass, and
editing one dataset recomputes only its shard's file.

The output is an Arrow stream with one row per shard row, in the shard's order: id, split, and
the summed log-probability of each sequence of the row (`logps` of the chosen answer or the
completion; `rejected_logps` of the rejected answer, or `kl_logps` of kto's mismatched completion).
The model is loaded as training loads the frozen base (the same dtype and quantization), so that
with a fresh adapter the policy and the reference agree exactly (the dpo loss at step 0 is ln 2).

    python scripts/reference_logps.py --settings results/reference/REF/settings/reference_logps.json \
        --base-model results/base_models/tiny-llama --shard results/tokens/TOKENIZATION/pairs.arrow \
        --output results/reference/REF/TOKENIZATION/pairs.arrow
"""
import argparse
import sys
import types
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from accelerate import PartialState

from finetune.data.shards import shard_kind
from finetune.data.tokenizer import load_tokenizer
from finetune.files import atomic_path
from finetune.models import resolve_precision
from finetune.settings import read_settings
from finetune.training.adapters import load_model
from finetune.training.objectives import answer_logps, preference_batch, second_sequence


def load_reference(base_model, settings, device):
    """The frozen base as an adapter run's training loads it (the settings' precision and quantization)."""
    tokenizer = load_tokenizer(base_model, trust_remote_code=settings.trust_remote_code)
    precision = resolve_precision(settings.precision, device)
    as_training_loads = types.SimpleNamespace(
        method="lora", quantization=settings.quantization, distributed="ddp", gradient_checkpointing=False,
        attn_implementation=settings.attn_implementation, trust_remote_code=settings.trust_remote_code)
    model = load_model(base_model, as_training_loads, precision, types.SimpleNamespace(device=device), tokenizer)
    return model.to(device).eval() if settings.quantization == "none" else model.eval(), tokenizer


@torch.no_grad()
def reference_logps(model, table, kind, batch_size, pad_token_id):
    """{column: summed log-probabilities} of every row of the shard table, batched by length."""
    prefix = second_sequence(kind)
    first, second = np.zeros(len(table)), np.zeros(len(table))
    order = np.argsort(table.column("length").to_numpy(), kind="stable")
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        examples = table.take(pa.array(rows)).to_pylist()
        batch = preference_batch(examples, pad_token_id, kind)
        batch = {name: value.to(model.device) for name, value in batch.items()}
        logps, _ = answer_logps(model, batch)
        first[rows], second[rows] = (part.double().cpu().numpy() for part in logps.chunk(2))
    return {"logps": first, f"{prefix}logps": second}


def write_reference(path, table, columns):
    schema = pa.schema([("id", pa.string()), ("split", pa.string())] + [(name, pa.float64()) for name in columns])
    batch = pa.record_batch([table.column("id").combine_chunks(), table.column("split").combine_chunks()]
                            + [pa.array(values) for values in columns.values()], schema=schema)
    with atomic_path(path) as partial:
        with pa.OSFile(str(partial), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            writer.write_batch(batch)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", type=Path, required=True, help="this stage's settings (JSON)")
    parser.add_argument("--base-model", required=True, help="the reference: local path or Hub id")
    parser.add_argument("--shard", type=Path, required=True, help="a preference or unpaired shard (tokenize_data.py)")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    settings = read_settings(args.settings, "reference_logps")
    if args.threads:
        torch.set_num_threads(args.threads)
    table = pa.ipc.open_stream(pa.OSFile(str(args.shard))).read_all()
    kind = shard_kind(table.schema)
    if kind == "sft":
        sys.exit(f"{args.shard}: holds SFT records; reference log-probabilities are of preference or unpaired "
                 "records (a run with objective dpo, ipo or kto trains on datasets of format preference or unpaired)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_reference(args.base_model, settings, device)
    columns = reference_logps(model, table, kind, settings.batch_size, tokenizer.pad_token_id)
    write_reference(args.output, table, columns)
    print(f"{args.shard}: reference log-probabilities of {len(table)} {kind} rows under {args.base_model} "
          f"(mean {columns['logps'].mean():.3f} for the first answers)")


if __name__ == "__main__":
    main()
