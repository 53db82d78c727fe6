# Export: the published folder (the trained adapter, or for method full the
# trained model, with its model card), the adapter merged into its unquantized
# base (with its card), and the opt-in upload to the Hugging Face Hub.


rule export:
    input:
        trained="results/runs/{run}/trained",
        summary="results/runs/{run}/train_summary.json",
        eval_json="results/runs/{run}/eval.json",
        manifest="results/runs/{run}/manifest.json",
        stats=lambda wc: dataset_stats_files(wc.run),
        script=script("model_card"),
        modules=imported_modules("model_card"),
    output:
        directory("results/runs/{run}/{published}"),
    params:
        card=lambda wc: card_flags(wc.run, wc.published),
    log:
        "results/logs/export/{run}-{published}.log",
    conda:
        "../envs/finetune.yaml"
    shell:
        "python {input.script} --kind {wildcards.published} --copy-from {input.trained} --folder {output}"
        " --run-name {wildcards.run} --summary {input.summary} --eval-json {input.eval_json}"
        " --manifest {input.manifest} --stats {input.stats} {params.card} > {log} 2>&1"


rule merge:
    input:
        trained="results/runs/{run}/trained",
        model=lambda wc: base_model_files(RUNS[wc.run]["base_model"]),
        summary="results/runs/{run}/train_summary.json",
        eval_json="results/runs/{run}/eval.json",
        manifest="results/runs/{run}/manifest.json",
        stats=lambda wc: dataset_stats_files(wc.run),
        script=script("merge"),
        modules=imported_modules("merge"),
        card_script=script("model_card"),
        card_modules=imported_modules("model_card"),
    output:
        directory("results/runs/{run}/merged"),
    params:
        base_model=lambda wc: base_model_path(RUNS[wc.run]["base_model"]),
        settings=lambda wc: script_flags("merge", run=RUNS[wc.run]),
        card=lambda wc: card_flags(wc.run, "merged"),
    threads: 2
    log:
        "results/logs/merge/{run}.log",
    conda:
        "../envs/finetune.yaml"
    shell:
        "(python {input.script} --base-model {params.base_model} --adapter-dir {input.trained}"
        " --output-dir {output} {params.settings} --threads {threads}"
        " && python {input.card_script} --kind merged --folder {output} --run-name {wildcards.run}"
        " --summary {input.summary} --eval-json {input.eval_json} --manifest {input.manifest} --stats {input.stats}"
        " {params.card}) > {log} 2>&1"


rule upload:
    input:
        folder=lambda wc: f"results/runs/{wc.run}/{RUNS[wc.run]['hub']['what']}",
        script=script("upload"),
        modules=imported_modules("upload"),
    output:
        "results/runs/{run}/upload.json",
    params:
        settings=lambda wc: script_flags("upload", run=RUNS[wc.run]),
    log:
        "results/logs/upload/{run}.log",
    conda:
        "../envs/finetune.yaml"
    shell:
        "python {input.script} --folder {input.folder} {params.settings} --output {output} 2>&1 | tee {log}"
