# Data: each dataset validated into normalized records, tokenized into an Arrow shard
# per tokenization (shared by every run that agrees on it), and its stats.


rule validate:
    input:
        data=dataset_source_files,
        settings="results/data/{dataset}/settings/validate_data.json",
        schemas=sorted(os.path.relpath(path) for path in (SOURCE_DIR / "schemas" / "records").glob("*.schema.json")),
        script=script("validate_data"),
        code=code_of("validate_data"),
    output:
        records="results/data/{dataset}.jsonl",
        rejected="results/data/{dataset}.rejected.jsonl",
        stats="results/data/{dataset}.validation.json",
    log:
        "results/logs/validate/{dataset}.log",
    conda:
        "../envs/finetune.yaml"
    params:
        source=dataset_source,
        schema_dir=lambda wildcards, input: os.path.dirname(input.schemas[0]),
    shell:
        "python {input.script} --input {params.source:q} --settings {input.settings} --output {output.records}"
        " --rejected {output.rejected} --stats {output.stats} --schema-dir {params.schema_dir} 2>&1 | tee {log}"


rule tokenize:
    input:
        records=rules.validate.output.records,
        settings="results/tokens/{tokenization}/{dataset}/settings/tokenize_data.json",
        tokenizer=tokenizer_files,
        script=script("tokenize_data"),
        code=code_of("tokenize_data"),
    output:
        shard="results/tokens/{tokenization}/{dataset}.arrow",
        stats="results/tokens/{tokenization}/{dataset}.stats.json",
    log:
        "results/logs/tokenize/{tokenization}/{dataset}.log",
    conda:
        "../envs/finetune.yaml"
    threads: 2
    params:
        tokenizer=tokenizer_of,
        source=dataset_source,
    shell:
        "RAYON_NUM_THREADS={threads} python {input.script} --input {input.records} --settings {input.settings}"
        " --tokenizer {params.tokenizer} --source {params.source:q} --output {output.shard} --stats {output.stats}"
        " 2>&1 | tee {log}"


rule dataset_stats:
    input:
        validation=rules.validate.output.stats,
        tokenized=tokenization_stats,
        script=script("dataset_stats"),
        code=code_of("dataset_stats"),
    output:
        "results/data/{dataset}.stats.json",
    log:
        "results/logs/dataset_stats/{dataset}.log",
    conda:
        "../envs/finetune.yaml"
    shell:
        "python {input.script} --validation {input.validation} --tokenized {input.tokenized}"
        " --output {output} > {log} 2>&1"
