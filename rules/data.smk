# Data: record validation, tokenization into Arrow shards shared by every run
# of the same tokenization, and per-dataset stats.

include: "sources.smk"


rule validate:
    input:
        data=lambda wc: dataset_files(wc.dataset),
        schemas=record_schemas(),
        script=script("validate_data"),
        modules=imported_modules("validate_data"),
    output:
        records="results/data/{dataset}.jsonl",
        rejected="results/data/{dataset}.rejected.jsonl",
        stats="results/data/{dataset}.validation.json",
    params:
        source=lambda wc: config["datasets"][wc.dataset]["path"],
        settings=lambda wc: script_flags("validate_data", dataset=wc.dataset),
        schema_dir=lambda wc, input: os.path.dirname(input.schemas[0]),
    log:
        "results/logs/validate/{dataset}.log",
    conda:
        "../envs/finetune.yaml"
    shell:
        "python {input.script} --input {params.source:q} --output {output.records} --rejected {output.rejected}"
        " --stats {output.stats} --schema-dir {params.schema_dir} {params.settings} 2>&1 | tee {log}"


rule tokenize:
    input:
        records="results/data/{dataset}.jsonl",
        model=lambda wc: base_model_files(TOKENIZATIONS[wc.tokenization]["base_model"], tokenizer_only=True),
        script=script("tokenize_data"),
        modules=imported_modules("tokenize_data"),
    output:
        shard="results/tokens/{tokenization}/{dataset}.arrow",
        stats="results/tokens/{tokenization}/{dataset}.stats.json",
    params:
        tokenizer=lambda wc: tokenizer_path(TOKENIZATIONS[wc.tokenization]["base_model"]),
        source=lambda wc: config["datasets"][wc.dataset]["path"],
        settings=lambda wc: script_flags("tokenize_data", run=TOKENIZATIONS[wc.tokenization], dataset=wc.dataset),
    threads: 2
    log:
        "results/logs/tokenize/{tokenization}/{dataset}.log",
    conda:
        "../envs/finetune.yaml"
    shell:
        "RAYON_NUM_THREADS={threads} python {input.script} --input {input.records} --tokenizer {params.tokenizer}"
        " --source {params.source:q} {params.settings} --output {output.shard} --stats {output.stats} 2>&1 | tee {log}"


rule dataset_stats:
    input:
        validation="results/data/{dataset}.validation.json",
        tokenized=lambda wc: token_stats(wc.dataset),
        script=script("dataset_stats"),
        modules=imported_modules("dataset_stats"),
    output:
        "results/data/{dataset}.stats.json",
    log:
        "results/logs/dataset_stats/{dataset}.log",
    conda:
        "../envs/finetune.yaml"
    shell:
        "python {input.script} --validation {input.validation} --tokenized {input.tokenized}"
        " --output {output} > {log} 2>&1"
