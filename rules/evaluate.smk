# Per-run evaluation (base vs tuned on the held-out split, generations) and the
# run's readable report.


rule evaluate:
    input:
        trained="results/runs/{run}/trained",
        shards=lambda wc: shards(wc.run),
        records=lambda wc: normalized_records(wc.run),
        model=lambda wc: base_model_files(RUNS[wc.run]["base_model"]),
        script=script("evaluate"),
        modules=imported_modules("evaluate"),
    output:
        eval_json="results/runs/{run}/eval.json",
        generations="results/runs/{run}/generations.jsonl",
    params:
        base_model=lambda wc: base_model_path(RUNS[wc.run]["base_model"]),
        settings=lambda wc: script_flags("evaluate", run=RUNS[wc.run]),
        gpu_pool=script("gpu_pool"),
    threads: 2
    resources:
        gpu=lambda wc: min(RUNS[wc.run]["gpus"], 1),
    log:
        "results/logs/evaluate/{run}.log",
    conda:
        "../envs/finetune.yaml"
    shell:
        "python {params.gpu_pool} --gpus {resources.gpu} --"
        " python {input.script} --run-name {wildcards.run} --base-model {params.base_model}"
        " --trained-dir {input.trained} --shards {input.shards} --records {input.records} {params.settings}"
        " --eval-json {output.eval_json} --generations {output.generations} --threads {threads} > {log} 2>&1"


rule report_run:
    input:
        metrics="results/runs/{run}/metrics.jsonl",
        summary="results/runs/{run}/train_summary.json",
        eval_json="results/runs/{run}/eval.json",
        generations="results/runs/{run}/generations.jsonl",
        samples="results/runs/{run}/samples.jsonl",
        manifest="results/runs/{run}/manifest.json",
        script=script("report_run"),
        modules=imported_modules("report_run"),
    output:
        plot=report(
            "results/runs/{run}/loss_curve.png",
            category="Runs",
            subcategory="{run}",
            caption="captions/run_loss_curve.rst",
            labels={"run": "{run}", "figure": "loss curve"},
        ),
        html=report(
            "results/runs/{run}/report.html",
            category="Runs",
            subcategory="{run}",
            caption="captions/run_page.rst",
            labels={"run": "{run}", "figure": "run page"},
        ),
    params:
        settings=lambda wc: shlex.quote(json.dumps(RUNS[wc.run], sort_keys=True)),
    log:
        "results/logs/report_run/{run}.log",
    conda:
        "../envs/finetune.yaml"
    shell:
        "python {input.script} --run-name {wildcards.run} --settings {params.settings}"
        " --metrics {input.metrics} --summary {input.summary} --eval-json {input.eval_json}"
        " --generations {input.generations} --samples {input.samples} --manifest {input.manifest}"
        " --plot {output.plot} --html {output.html}"
        " > {log} 2>&1"


rule report_sweep:
    input:
        summaries=expand("results/runs/{run}/train_summary.json", run=RUNS),
        evaluations=expand("results/runs/{run}/eval.json", run=RUNS),
        metrics=expand("results/runs/{run}/metrics.jsonl", run=RUNS),
        script=script("report_sweep"),
        modules=imported_modules("report_sweep"),
    output:
        csv=report(
            "results/report/sweep.csv",
            category="Sweep",
            caption="captions/sweep_csv.rst",
            labels={"figure": "sweep table (CSV)"},
        ),
        html=report(
            "results/report/sweep.html",
            category="Sweep",
            caption="captions/sweep_table.rst",
            labels={"figure": "sweep table"},
        ),
        loss_plot=report(
            "results/report/loss_curves.png",
            category="Sweep",
            caption="captions/loss_curves.rst",
            labels={"figure": "loss curves"},
        ),
        params_plot=report(
            "results/report/eval_loss_vs_parameters.png",
            category="Sweep",
            caption="captions/loss_vs_parameters.rst",
            labels={"figure": "eval loss vs parameters"},
        ),
        swept_plot=report(
            "results/report/metrics_vs_swept.png",
            category="Sweep",
            caption="captions/metrics_vs_swept.rst",
            labels={"figure": "metrics vs swept settings"},
        ),
    params:
        sweeps=shlex.quote(json.dumps(SWEEPS, sort_keys=True)),
        runs=" ".join(
            f"--run {name} results/runs/{name} {shlex.quote(json.dumps(run, sort_keys=True))}"
            for name, run in RUNS.items()
        ),
    log:
        "results/logs/report_sweep.log",
    conda:
        "../envs/finetune.yaml"
    shell:
        "python {input.script} {params.runs} --csv {output.csv} --html {output.html}"
        " --loss-plot {output.loss_plot} --params-plot {output.params_plot}"
        " --sweeps {params.sweeps} --swept-plot {output.swept_plot} > {log} 2>&1"
