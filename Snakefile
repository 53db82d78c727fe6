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


# A run is any name the schema allows (not an alternation of every run: with a 1,000-run
# sweep that regex made each file-to-rule match try 1,000 names); an unknown one fails in the
# first input function that looks it up.
wildcard_constraints:
    run="[A-Za-z0-9][A-Za-z0-9_.-]*",
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
