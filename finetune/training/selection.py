"""Which weights a run keeps and when it stops, from its held-out losses.

- keep `last`: the weights after the last step; `best`: those of the evaluation
  with the lowest held-out loss (the seed's `load_best_model_at_end`).
- early_stopping {patience: N, min_delta: x}: stop after N evaluations in a row
  that did not lower the best held-out loss by more than x.

The record of evaluations lives in the run's history, which checkpoints save,
so a resumed run decides exactly as an uninterrupted one would; the best weights
are kept in memory and, when the run has a checkpoint folder, on disk beside
the checkpoint, so that a resumed run still has them.
"""
from safetensors.torch import load_file, save_file

from finetune.files import atomic_path


def new_record():
    return {"best_step": None, "best_eval_loss": None, "evaluations_without_improvement": 0}


def note_evaluation(record, step, eval_loss, min_delta):
    """Count one evaluation; True when it is the new best (lower than the best by more than min_delta)."""
    best = record["best_eval_loss"]
    if best is None or eval_loss < best - min_delta:
        record.update(best_step=step, best_eval_loss=eval_loss, evaluations_without_improvement=0)
        return True
    record["evaluations_without_improvement"] += 1
    return False


def stop_reason(record, early_stopping):
    """Why to stop now, or None to go on."""
    if not early_stopping or record["evaluations_without_improvement"] < early_stopping["patience"]:
        return None
    return (f"early stopping: {record['evaluations_without_improvement']} evaluations without lowering the best "
            f"held-out loss ({record['best_eval_loss']:.4f} at step {record['best_step']}) by more than "
            f"{early_stopping.get('min_delta', 0.0)}")


def save_best_weights(folder, state):
    """The best weights beside the checkpoints (folder/best.safetensors), replaced whole or not at all."""
    with atomic_path(folder / "best.safetensors") as partial:
        save_file({name: tensor.contiguous() for name, tensor in state.items()}, partial)


def load_best_weights(folder):
    path = folder / "best.safetensors"
    return load_file(path) if path.exists() else None
