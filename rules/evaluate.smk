# Per-run evaluation (base vs tuned on the held-out split, generations), the run's
# page, and the sweep page comparing every run; all registered in `snakemake --report`.
# With eval.harness, lm-evaluation-harness's tasks are checked first (resolved, their data
# loaded: offline, from the local cache) by a local job that runs before any other that is
# ready (priority), so a missing dataset stops the workflow before training; it is an input
# of the evaluations only, so configuring it retrains nothing.


rule harness_tasks:
    input:
        settings="results/harness/settings/harness_tasks.json",
        script=script("harness_tasks"),
        code=code_of("harness_tasks"),
        tasks=harness_task_files(),
    output:
        HARNESS_TASKS,
    log:
        "results/logs/harness_tasks.log",
    priority: 100
    localrule: True
    conda:
        "../envs/finetune.yaml"
    shell:
        "python {input.script} --settings {input.settings} --output {output} > {log} 2>&1"


rule evaluate:
    input:
        trained=rules.train.output.trained,
        shards=run_shards,
        records=normalized_records,
        model=run_base_model_files,
        root_model=run_root_model_files,
        settings="results/runs/{run}/settings/evaluate.json",
        script=script("evaluate"),
        code=evaluation_code,
        harness=harness_check,
    output:
        eval_json="results/runs/{run}/eval.json",
        generations="results/runs/{run}/generations.jsonl",
    log:
        "results/logs/evaluate/{run}.log",
    conda:
        "../envs/finetune.yaml"
    threads: 2
    resources:
        gpu=evaluation_gpus,
    params:
        base_model=run_base_model,
        root_model=run_root_model,
    shell:
        "python -m finetune.gpu_pool --gpus {resources.gpu} -- python {input.script} --run-name {wildcards.run}"
        " --settings {input.settings} --base-model {params.base_model} --root-model {params.root_model}"
        " --trained-dir {input.trained}"
        " --shards {input.shards} --records {input.records} --eval-json {output.eval_json}"
        " --generations {output.generations} --threads {threads} > {log} 2>&1"


rule report_run:
    input:
        metrics=rules.train.output.metrics,
        summary=rules.train.output.summary,
        samples=rules.train.output.samples,
        eval_json=rules.evaluate.output.eval_json,
        generations=rules.evaluate.output.generations,
        manifest=rules.manifest.output,
        script=script("report_run"),
        code=code_of("report_run"),
    output:
        plot=reported("results/runs/{run}/loss_curve.png", "Runs", "run_loss_curve", "loss curve", per_run=True),
        html=reported("results/runs/{run}/report.html", "Runs", "run_page", "run page", per_run=True),
    log:
        "results/logs/report_run/{run}.log",
    conda:
        "../envs/finetune.yaml"
    shell:
        "python {input.script} --run-name {wildcards.run} --manifest {input.manifest} --metrics {input.metrics}"
        " --summary {input.summary} --eval-json {input.eval_json} --generations {input.generations}"
        " --samples {input.samples} --plot {output.plot} --html {output.html} > {log} 2>&1"


rule report_sweep:
    input:
        settings="results/report/settings/report_sweep.json",
        run_settings=swept(rules.run_settings.output[0]),
        summaries=swept(rules.train.output.summary),
        evaluations=swept(rules.evaluate.output.eval_json),
        metrics=swept(rules.train.output.metrics),
        search_told=[last_told_file(search) for search in SEARCHES],
        search_reports=expand("results/search/{search}/report.html", search=SEARCHES),
        script=script("report_sweep"),
        code=code_of("report_sweep"),
    output:
        csv=reported("results/report/sweep.csv", "Sweep", "sweep_csv", "sweep table (CSV)"),
        html=reported("results/report/sweep.html", "Sweep", "sweep_table", "sweep table"),
        loss_plot=reported("results/report/loss_curves.png", "Sweep", "loss_curves", "loss curves"),
        params_plot=reported(
            "results/report/eval_loss_vs_parameters.png", "Sweep", "loss_vs_parameters", "eval loss vs parameters"
        ),
        swept_plot=reported(
            "results/report/metrics_vs_swept.png", "Sweep", "metrics_vs_swept", "metrics vs swept settings"
        ),
    log:
        "results/logs/report_sweep.log",
    conda:
        "../envs/finetune.yaml"
    params:
        runs=lambda wildcards: swept_runs(),
    shell:
        "python {input.script} --settings {input.settings} --runs {params.runs} --run-settings {input.run_settings}"
        " --summaries {input.summaries} --evaluations {input.evaluations} --metrics {input.metrics}"
        " --csv {output.csv} --html {output.html} --loss-plot {output.loss_plot} --params-plot {output.params_plot}"
        " --swept-plot {output.swept_plot} --search-told {input.search_told} --search-reports {input.search_reports}"
        " > {log} 2>&1"
