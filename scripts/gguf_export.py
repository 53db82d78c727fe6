"""Write a run's model (its merged model, or for method full its trained model) as GGUF files for
llama.cpp and Ollama, {run}-{type}.gguf for each type the run's `gguf` setting lists, with an Ollama
Modelfile (FROM the first type listed) beside them. A model whose family or tokenizer GGUF cannot hold
stops before anything is written; the folder appears whole or not at all.

    python scripts/gguf_export.py --model results/runs/r8/merged_weights --run-name r8 \
        --settings results/runs/r8/settings/gguf_export.json --output-dir results/runs/r8/gguf
"""
import argparse
import sys
from pathlib import Path

from finetune.export.gguf import problem, write_gguf
from finetune.export.modelfile import modelfile
from finetune.files import atomic_path
from finetune.settings import read_settings


def export(model_dir, output_dir, run_name, types):
    """Write every type's file and the Modelfile into `output_dir`; ValueError naming the run when the
    model cannot be written (nothing is written then)."""
    if not types:
        raise ValueError(f"run '{run_name}': no GGUF types requested (set gguf, e.g. [f16, q8_0])")
    found = problem(model_dir)
    if found:
        raise ValueError(f"run '{run_name}': {model_dir}: {found}")
    with atomic_path(output_dir) as partial:
        partial.mkdir()
        for kind in types:
            tokenizer = write_gguf(model_dir, partial / f"{run_name}-{kind}.gguf", kind, run_name)
            print(f"wrote {run_name}-{kind}.gguf")
        (partial / "Modelfile").write_text(modelfile(f"{run_name}-{types[0]}.gguf", tokenizer, model_dir, run_name),
                                           encoding="utf-8")
    return Path(output_dir)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="the merged (or fully fine-tuned) model folder")
    parser.add_argument("--run-name", required=True)
    parser.add_argument("--settings", type=Path, required=True, help="this stage's settings (JSON)")
    parser.add_argument("--output-dir", type=Path, required=True, help="the folder of the GGUF files")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    settings = read_settings(args.settings, "gguf_export")
    try:
        export(args.model, args.output_dir, args.run_name, list(settings.gguf))
    except ValueError as error:
        sys.exit(str(error))
    print(f"GGUF files and Modelfile written to {args.output_dir}")


if __name__ == "__main__":
    main()
