# Searches beyond grids (config `search:`; docs/search.md). Each search runs in rounds: a
# checkpoint proposes the round's trials from the search's Optuna study (its journal,
# results/search/{search}/study.journal), each trial becomes a run named {search}-trial{number}
# with the same jobs as a run listed with those settings, and a local job tells the study
# their objectives (a failed trial as failed) before the next round is proposed. The trials'
# jobs run wherever training runs (GPU pool, SLURM). A proposal, once made, is kept: the told
# results of the round before are an `ancient` input of the next proposal (needed, never a
# reason to propose again), so a proposal that must run always runs, and whatever waits for it
# (a tell, the sweep page) is resolved when it finishes; the search's own settings and code
# propose again.


checkpoint search_propose:
    input:
        settings="results/search/{search}/settings/search_propose.json",
        told=lambda wildcards: [ancient(path) for path in earlier_told(wildcards)],
        script=script("search_propose"),
        code=code_of("search_propose"),
    output:
        "results/search/{search}/round-{round}.json",
    log:
        "results/logs/search/{search}/propose-{round}.log",
    wildcard_constraints:
        round=r"\d+",
    localrule: True
    conda:
        "../envs/finetune.yaml"
    params:
        journal="results/search/{search}/study.journal",
    shell:
        "python {input.script} --settings {input.settings} --search {wildcards.search} --round {wildcards.round}"
        " --told {input.told} --journal {params.journal} --output {output} > {log} 2>&1"


rule search_tell:
    input:
        settings="results/search/{search}/settings/search_tell.json",
        proposal=rules.search_propose.output[0],
        told=earlier_told,
        evaluations=round_files("evaluations"),
        summaries=round_files("summaries"),
        metrics=round_files("metrics"),
        script=script("search_tell"),
        code=code_of("search_tell"),
    output:
        "results/search/{search}/told-{round}.json",
    log:
        "results/logs/search/{search}/tell-{round}.log",
    wildcard_constraints:
        round=r"\d+",
    localrule: True
    conda:
        "../envs/finetune.yaml"
    params:
        runs=round_trials,
        journal="results/search/{search}/study.journal",
    shell:
        "python {input.script} --settings {input.settings} --search {wildcards.search} --round {wildcards.round}"
        " --proposal {input.proposal} --told {input.told} --runs {params.runs} --evaluations {input.evaluations}"
        " --summaries {input.summaries} --metrics {input.metrics} --journal {params.journal} --output {output}"
        " > {log} 2>&1"


rule search_report:
    input:
        settings="results/search/{search}/settings/search_report.json",
        told=last_told,
        script=script("search_report"),
        code=code_of("search_report"),
    output:
        html=reported("results/search/{search}/report.html", "Searches", "search_report", "report", per="search"),
        history=reported("results/search/{search}/history.png", "Searches", "search_history", "history", per="search"),
        settings_plot=reported(
            "results/search/{search}/settings.png",
            "Searches",
            "search_settings",
            "objective vs settings",
            per="search",
        ),
        importance=reported(
            "results/search/{search}/importance.png", "Searches", "search_importance", "importances", per="search"
        ),
        best="results/search/{search}/best.yaml",
    log:
        "results/logs/search/{search}/report.log",
    conda:
        "../envs/finetune.yaml"
    shell:
        "python {input.script} --settings {input.settings} --search {wildcards.search} --told {input.told}"
        " --html {output.html} --history-plot {output.history} --settings-plot {output.settings_plot}"
        " --importance-plot {output.importance} --best {output.best} > {log} 2>&1"
