"""Publish a run's weights: a copy of the trained adapter, the fully fine-tuned model or the
merged model (its files hard-linked where the file system allows), with a model card
(finetune/export/model_card.py) and the run's manifest beside it. The folder appears whole
or not at all.

    python scripts/export.py --kind adapter --weights results/runs/r8/trained \
        --folder results/runs/r8/adapter --settings results/runs/r8/settings/export.json \
        --run-name r8 --base-model results/base_models/tiny-llama \
        --summary results/runs/r8/train_summary.json --eval-json results/runs/r8/eval.json \
        --manifest results/runs/r8/manifest.json --stats results/data/*.stats.json
"""
import argparse
import shutil
from pathlib import Path

from finetune.export.model_card import DESCRIPTIONS, render
from finetune.files import atomic_path, copy_folder, read_json
from finetune.settings import read_settings


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", choices=sorted(DESCRIPTIONS), required=True)
    parser.add_argument("--weights", type=Path, required=True, help="the folder to publish (trained or merged)")
    parser.add_argument("--folder", type=Path, required=True, help="the published folder")
    parser.add_argument("--settings", type=Path, required=True, help="this stage's settings (JSON)")
    parser.add_argument("--run-name", required=True)
    parser.add_argument("--base-model", required=True)
    parser.add_argument("--summary", type=Path, required=True)
    parser.add_argument("--eval-json", type=Path, required=True)
    parser.add_argument("--manifest", type=Path, required=True, help="manifest.json of the run (its settings too)")
    parser.add_argument("--stats", type=Path, nargs="+", required=True)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    settings = read_settings(args.settings, "export")
    manifest = read_json(args.manifest)
    repo_hint = settings.repo_id if settings.what == args.kind else str(args.folder)
    card = render(args.kind, args.run_name, args.base_model, manifest["settings"], read_json(args.summary),
                  read_json(args.eval_json), [read_json(path) for path in args.stats], settings.license, repo_hint,
                  manifest)
    with atomic_path(args.folder) as partial:
        copy_folder(args.weights, partial)
        for name in ("README.md", "manifest.json"):  # a link to the source's own file: replace it, never write into it
            (partial / name).unlink(missing_ok=True)
        (partial / "README.md").write_text(card, encoding="utf-8")
        shutil.copyfile(args.manifest, partial / "manifest.json")
    print(f"{args.kind} published in {args.folder} with its model card")


if __name__ == "__main__":
    main()
