"""The data and the score of the finetune_heldout task (finetune_heldout.yaml)."""
import datasets

from finetune.evaluation.metrics import is_exact_match
from finetune.files import read_jsonl


def load_records(records=None, **_):
    """The held-out records with a reference: rows {prompt, reference, id, task} given by the evaluate job, or
    the path of a run's generations.jsonl (its held-out rows)."""
    if records is None:
        raise ValueError("finetune_heldout reads a run's held-out records: pass --metadata "
                         "'{\"records\": \"results/runs/RUN/generations.jsonl\"}'")
    rows = list(read_jsonl(records)) if isinstance(records, str) else records
    rows = [{key: row.get(key) for key in ("id", "task", "prompt", "reference")} for row in rows
            if row.get("source", "heldout") == "heldout" and row["reference"].strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def process_results(doc, results):
    return {"exact_match": float(is_exact_match(results[0], doc["reference"]))}
