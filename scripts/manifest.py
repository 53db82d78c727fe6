"""Write a run's manifest (finetune/export/manifest.py has what it holds): versions and
device of the training job, the workflow's git commit, hashes of the shards and the base
model, and the run's resolved settings, to paste under `runs:` to train it again.

    python scripts/manifest.py --run-name r8 --settings results/runs/r8/settings.json \
        --summary results/runs/r8/train_summary.json --shards results/tokens/T/*.arrow \
        --base-model results/base_models/tiny-llama --workflow-dir . --output results/runs/r8/manifest.json
"""
import argparse
from pathlib import Path

from finetune.export.manifest import build_manifest
from finetune.files import read_json, write_json


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-name", required=True)
    parser.add_argument("--settings", type=Path, required=True, help="the run's resolved settings (settings.json)")
    parser.add_argument("--summary", type=Path, required=True, help="train_summary.json of the run")
    parser.add_argument("--parent-manifest", type=Path, nargs="*", default=[],
                        help="the manifest of the run this run starts from (base_model {run: NAME})")
    parser.add_argument("--shards", type=Path, nargs="+", required=True)
    parser.add_argument("--base-model", required=True, help="local folder or Hub id")
    parser.add_argument("--workflow-dir", type=Path, required=True, help="where the Snakefile is (for its git commit)")
    parser.add_argument("--output", type=Path, required=True)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    manifest = build_manifest(args.run_name, read_json(args.settings), read_json(args.summary), args.shards,
                              args.base_model, args.workflow_dir,
                              read_json(args.parent_manifest[0]) if args.parent_manifest else None)
    write_json(args.output, manifest)
    commit = (manifest["workflow"] or {}).get("commit", "no git checkout")
    print(f"{args.run_name}: manifest written to {args.output} (workflow {commit})")


if __name__ == "__main__":
    main()
