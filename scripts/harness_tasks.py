"""Check the lm-evaluation-harness tasks of eval.harness before any training: each name is a task, group
or tag lm_eval knows (or the workflow's own, finetune/evaluation/harness_tasks/), and each standard task's
data loads here (offline: from the local Hugging Face cache). Writes the tasks each name runs; stops
naming the task and saying what to do otherwise.

    python scripts/harness_tasks.py --settings results/harness/settings/harness_tasks.json \
        --output results/harness/tasks.json
"""
import argparse
import importlib.metadata
from pathlib import Path

from finetune.evaluation.harness import check_tasks, harness_options
from finetune.files import write_json
from finetune.settings import read_settings


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", type=Path, required=True, help="this stage's settings (JSON)")
    parser.add_argument("--output", type=Path, required=True, help="the resolved tasks (JSON)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    harness = read_settings(args.settings, "harness_tasks").harness
    if not harness:
        raise SystemExit(f"{args.settings}: eval.harness is not set; there are no tasks to check")
    options = harness_options(harness, "harness_tasks")
    resolved = check_tasks(options["tasks"])
    write_json(args.output, {"tasks": resolved, "lm_eval": importlib.metadata.version("lm_eval")})
    print(f"lm_eval tasks ready: {', '.join(f'{name} ({len(tasks)} task(s))' for name, tasks in resolved.items())}")


if __name__ == "__main__":
    main()
