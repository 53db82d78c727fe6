# LoRA fine-tuning as a Snakemake workflow:
#   data/*.jsonl -> validate -> tokenize -> train (one job per run) -> evaluate,
#   report -> export, merge, upload; the embedded tiny base model is built and
#   pretrained by the workflow itself.  See README.md.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


report: "rules/captions/workflow.rst"


include: "rules/scripts.smk"
include: "rules/config.smk"
include: "rules/paths.smk"
include: "rules/summary.smk"


wildcard_constraints:
    run="|".join(RUNS),
    dataset="|".join(config["datasets"]),
    model="|".join(config["base_models"]),
    tokenization="[A-Za-z0-9_.-]+",
    published="adapter|model",


localrules:
    all,


rule all:
    input:
        final_outputs(),
    default_target: True


onsuccess:
    print_exact_match()


include: "rules/data.smk"
include: "rules/base_model.smk"
include: "rules/train.smk"
include: "rules/evaluate.smk"
include: "rules/export.smk"
