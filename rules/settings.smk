# Settings files. Every stage reads its settings from a file of its own: its share of the
# settings (the ones the schema declares for its script, x-script), resolved, in
# {folder}/settings/{stage}.json beside what it writes. One small local job writes each
# file from that share, given as its parameter: a changed setting changes the parameter
# of the files that hold it, so it rewrites those and reruns their stages (and what
# depends on their outputs), and no other. results/runs/{run}/settings.json holds all of
# a run's settings (for the manifest and the reports). The jobs are shell jobs: a `run:`
# job runs in a process of its own that parses the whole workflow again (Snakemake 9).


rule settings:
    output:
        "results/{subject}/settings/{stage}.json",
    log:
        "results/logs/settings/{subject}/{stage}.log",
    wildcard_constraints:
        subject=r"(runs|pretrain|data|reference|search)/[^/]+|tokens/[^/]+/[^/]+|report",
        stage=SETTINGS_STAGES,
    localrule: True
    conda:
        "../envs/finetune.yaml"
    params:
        settings=stage_settings,
    shell:
        "printf '%s\\n' {params.settings:q} > {output} 2> {log}"


# The settings of the lm-evaluation-harness check, first of all (as the check itself: a
# missing task or dataset stops the workflow before anything is trained).
rule harness_settings:
    output:
        "results/harness/settings/{stage}.json",
    log:
        "results/logs/settings/harness/{stage}.log",
    wildcard_constraints:
        stage="harness_tasks",
    priority: 100
    localrule: True
    conda:
        "../envs/finetune.yaml"
    params:
        settings=lambda wildcards: settings_text("harness", wildcards.stage),
    shell:
        "printf '%s\\n' {params.settings:q} > {output} 2> {log}"


rule run_settings:
    output:
        "results/runs/{run}/settings.json",
    log:
        "results/logs/run_settings/{run}.log",
    localrule: True
    conda:
        "../envs/finetune.yaml"
    params:
        settings=run_settings_text,
    shell:
        "printf '%s\\n' {params.settings:q} > {output} 2> {log}"
