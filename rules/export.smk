# Export: the published adapter folder (the trained adapter with its model
# card), the adapter merged into its unquantized base (with its card), and the
# opt-in upload to the Hugging Face Hub.


rule export_adapter:
    input:
        trained="results/runs/{run}/trained",
        summary="results/runs/{run}/train_summary.json",
        eval_json="results/runs/{run}/eval.json",
        stats=lambda wc: dataset_stats_files(wc.run),
        script=f"{SCRIPTS}/model_card.py",
    output:
        directory("results/runs/{run}/adapter"),
    params:
        card=lambda wc: card_flags(wc.run, "adapter"),
    log:
        "results/logs/export_adapter/{run}.log",
    conda:
        "../envs/finetune.yaml"
    shell:
        "python {input.script} --kind adapter --copy-from {input.trained} --folder {output}"
        " --run-name {wildcards.run} --summary {input.summary} --eval-json {input.eval_json}"
        " --stats {input.stats} {params.card} > {log} 2>&1"


rule merge:
    input:
        trained="results/runs/{run}/trained",
        model=lambda wc: base_model_input(RUNS[wc.run]["base_model"]),
        summary="results/runs/{run}/train_summary.json",
        eval_json="results/runs/{run}/eval.json",
        stats=lambda wc: dataset_stats_files(wc.run),
        script=f"{SCRIPTS}/merge.py",
        card_script=f"{SCRIPTS}/model_card.py",
        common=COMMON_CODE,
    output:
        directory("results/runs/{run}/merged"),
    params:
        base_model=lambda wc: base_model_path(RUNS[wc.run]["base_model"]),
        dtype=lambda wc: RUNS[wc.run]["merge_dtype"],
        card=lambda wc: card_flags(wc.run, "merged"),
    threads: 2
    log:
        "results/logs/merge/{run}.log",
    conda:
        "../envs/finetune.yaml"
    shell:
        "(python {input.script} --base-model {params.base_model} --adapter-dir {input.trained}"
        " --output-dir {output} --dtype {params.dtype} --threads {threads}"
        " && python {input.card_script} --kind merged --folder {output} --run-name {wildcards.run}"
        " --summary {input.summary} --eval-json {input.eval_json} --stats {input.stats} {params.card}) > {log} 2>&1"


rule upload:
    input:
        folder=lambda wc: f"results/runs/{wc.run}/{RUNS[wc.run]['hub']['what']}",
        script=f"{SCRIPTS}/upload.py",
    output:
        "results/runs/{run}/upload.json",
    params:
        repo_id=lambda wc: RUNS[wc.run]["hub"]["repo_id"],
        revision=lambda wc: RUNS[wc.run]["hub"]["revision"],
        private=lambda wc: "--private" if RUNS[wc.run]["hub"]["private"] else "",
    log:
        "results/logs/upload/{run}.log",
    conda:
        "../envs/finetune.yaml"
    shell:
        "python {input.script} --folder {input.folder} --repo-id {params.repo_id} --revision {params.revision}"
        " {params.private} --output {output} 2>&1 | tee {log}"
