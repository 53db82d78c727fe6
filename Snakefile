# LoRA fine-tuning as a Snakemake workflow:
#   data/*.jsonl -> validate -> tokenize -> train (one job per run) -> evaluate,
#   report -> export, merge, upload.  See README.md.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


report: "rules/captions/workflow.rst"


include: "rules/config.smk"
include: "rules/scripts.smk"
include: "rules/paths.smk"


wildcard_constraints:
    run="|".join(RUNS),
    dataset="|".join(config["datasets"]),
    model="|".join(config["base_models"]),
    tokenization="[A-Za-z0-9_.-]+",


localrules:
    all,


rule all:
    input:
        final_outputs(),
    default_target: True


include: "rules/data.smk"
include: "rules/train.smk"
include: "rules/evaluate.smk"
include: "rules/export.smk"
