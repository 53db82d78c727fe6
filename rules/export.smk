# Export: the adapter merged into its unquantized base; the published folders (the
# trained adapter, or for method full the trained model, and the merged model), each
# with its model card, written by one rule; the GGUF files (llama.cpp, Ollama) of runs that
# ask for them; and the opt-in upload to the Hugging Face Hub.


rule merge:
    input:
        trained=rules.train.output.trained,
        model=run_base_model_files,
        settings="results/runs/{run}/settings/merge.json",
        script=script("merge"),
        code=code_of("merge"),
    output:
        directory("results/runs/{run}/merged_weights"),
    log:
        "results/logs/merge/{run}.log",
    conda:
        "../envs/finetune.yaml"
    threads: 2
    params:
        base_model=run_base_model,
    shell:
        "python {input.script} --base-model {params.base_model} --settings {input.settings}"
        " --adapter-dir {input.trained} --output-dir {output} --threads {threads} > {log} 2>&1"


rule export:
    input:
        weights=lambda wildcards: (
            rules.merge.output[0] if wildcards.published == "merged" else rules.train.output.trained
        ),
        settings="results/runs/{run}/settings/export.json",
        summary=rules.train.output.summary,
        eval_json=rules.evaluate.output.eval_json,
        manifest=rules.manifest.output,
        stats=run_stats,
        script=script("export"),
        code=code_of("export"),
    output:
        directory("results/runs/{run}/{published}"),
    log:
        "results/logs/export/{run}-{published}.log",
    conda:
        "../envs/finetune.yaml"
    params:
        base_model=run_base_model,
    shell:
        "python {input.script} --kind {wildcards.published} --weights {input.weights} --folder {output}"
        " --settings {input.settings} --run-name {wildcards.run} --base-model {params.base_model:q}"
        " --summary {input.summary} --eval-json {input.eval_json} --manifest {input.manifest}"
        " --stats {input.stats} > {log} 2>&1"


rule gguf:
    input:
        weights=lambda wildcards: (
            rules.train.output.trained if run_of(wildcards)["method"] == "full" else rules.merge.output[0]
        ),
        settings="results/runs/{run}/settings/gguf_export.json",
        script=script("gguf_export"),
        code=code_of("gguf_export"),
    output:
        directory("results/runs/{run}/gguf"),
    log:
        "results/logs/gguf/{run}.log",
    conda:
        "../envs/finetune.yaml"
    shell:
        "python {input.script} --model {input.weights} --run-name {wildcards.run} --settings {input.settings}"
        " --output-dir {output} > {log} 2>&1"


rule upload:
    input:
        folder=uploaded_folder,
        settings="results/runs/{run}/settings/upload.json",
        script=script("upload"),
        code=code_of("upload"),
    output:
        "results/runs/{run}/upload.json",
    log:
        "results/logs/upload/{run}.log",
    conda:
        "../envs/finetune.yaml"
    shell:
        "python {input.script} --folder {input.folder} --settings {input.settings} --output {output} 2>&1 | tee {log}"
