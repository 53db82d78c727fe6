# Fine-tuning as a Snakemake workflow:
#   data -> validate -> tokenize -> train (one job per run) -> evaluate, report
#   -> merge, export, upload; the embedded tiny base model is built and pretrained
#   by the workflow itself; searches (Optuna) propose rounds of runs. See README.md
#   and docs/.
# The rule files depend one way, in the order they are included: config (the resolved
# config), paths (file names), code (each job's code inputs), trials (a search's trials
# as runs) and common (what the rules look up by wildcards) hold functions only; then
# the rules, each file using those and the rules before it.
import re

from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


report: "rules/captions/workflow.rst"


include: "rules/config.smk"
include: "rules/paths.smk"
include: "rules/code.smk"
include: "rules/trials.smk"
include: "rules/common.smk"


# A run is any name the schema allows (not an alternation of every run: with a 1,000-run
# sweep that regex made each file-to-rule match try 1,000 names); an unknown one fails in the
# first input function that looks it up.
wildcard_constraints:
    run="[A-Za-z0-9][A-Za-z0-9_.-]*",
    dataset="|".join(config["datasets"]),
    model="|".join(re.escape(model) for model in config["base_models"]),
    tokenization="[A-Za-z0-9_.-]+",
    reference="[A-Za-z0-9_.-]+",
    published="adapter|model|merged",
    search="|".join(re.escape(search) for search in SEARCHES) or "(?!)",


localrules:
    all,


# The trials a search has proposed so far are runs (a job that parses the workflow again
# needs them before any checkpoint is read).
register_proposed_trials()


rule all:
    default_target: True
    input:
        final_outputs(),
        search_outputs,


include: "rules/settings.smk"
include: "rules/data.smk"
include: "rules/train.smk"
include: "rules/preference.smk"
include: "rules/base_model.smk"
include: "rules/evaluate.smk"
include: "rules/export.smk"
include: "rules/serve.smk"
include: "rules/search.smk"


onsuccess:
    print_exact_match(rules.evaluate.output.eval_json)
