# Data half of the pipeline: the tiny base model (when configured), record
# validation, tokenization into Arrow shards shared by every run with the same
# tokenizer key, and per-dataset stats.


rule build_tiny_model:
    input:
        corpus=lambda wc: config["base_models"][wc.model]["build_tiny"]["corpus"],
        script=f"{SCRIPTS}/build_tiny_model.py",
        common=COMMON_CODE,
    output:
        directory("results/base_models/{model}"),
    params:
        flags=lambda wc: cli_flags(
            config["base_models"][wc.model]["build_tiny"],
            ["vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "initializer_range", "seed"],
        ),
    log:
        "results/logs/build_tiny_model/{model}.log",
    conda:
        "../envs/finetune.yaml"
    shell:
        "python {input.script} --corpus {input.corpus} --output {output} {params.flags} > {log} 2>&1"


rule validate:
    input:
        data=lambda wc: config["datasets"][wc.dataset]["path"],
        script=f"{SCRIPTS}/validate_data.py",
        schemas=RECORD_SCHEMAS,
    output:
        records="results/data/{dataset}.jsonl",
        rejected="results/data/{dataset}.rejected.jsonl",
        stats="results/data/{dataset}.validation.json",
    params:
        flags=lambda wc: cli_flags(
            config["datasets"][wc.dataset],
            ["format", "on_error", "max_errors", "max_rejected_fraction", "drop_duplicates"],
        ),
        schema_dir=lambda wc, input: os.path.dirname(input.schemas[0]),
    log:
        "results/logs/validate/{dataset}.log",
    conda:
        "../envs/finetune.yaml"
    shell:
        "python {input.script} --input {input.data} --output {output.records} --rejected {output.rejected}"
        " --stats {output.stats} --schema-dir {params.schema_dir} {params.flags} 2>&1 | tee {log}"


rule tokenize:
    input:
        records="results/data/{dataset}.jsonl",
        model=lambda wc: base_model_input(TOKENIZATIONS[wc.key]["base_model"]),
        script=f"{SCRIPTS}/tokenize_data.py",
        common=COMMON_CODE,
    output:
        shard="results/tokens/{key}/{dataset}.arrow",
        stats="results/tokens/{key}/{dataset}.stats.json",
    params:
        tokenizer=lambda wc: base_model_path(TOKENIZATIONS[wc.key]["base_model"]),
        template=lambda wc: config["base_models"][TOKENIZATIONS[wc.key]["base_model"]]["template"],
        chat_template=lambda wc: chat_template_flag(TOKENIZATIONS[wc.key]["base_model"]),
        flags=lambda wc: cli_flags(TOKENIZATIONS[wc.key], ["max_length", "too_long", "train_on_inputs"]),
        split=lambda wc: config["datasets"][wc.dataset]["split"],
        eval_fraction=config["eval"]["fraction"],
    threads: 2
    log:
        "results/logs/tokenize/{key}/{dataset}.log",
    conda:
        "../envs/finetune.yaml"
    shell:
        "RAYON_NUM_THREADS={threads} python {input.script} --input {input.records} --tokenizer {params.tokenizer}"
        " --template {params.template} {params.chat_template} {params.flags} --split {params.split}"
        " --eval-fraction {params.eval_fraction} --output {output.shard} --stats {output.stats} > {log} 2>&1"


rule dataset_stats:
    input:
        validation="results/data/{dataset}.validation.json",
        tokenized=lambda wc: token_stats(wc.dataset),
        script=f"{SCRIPTS}/dataset_stats.py",
    output:
        "results/data/{dataset}.stats.json",
    log:
        "results/logs/dataset_stats/{dataset}.log",
    conda:
        "../envs/finetune.yaml"
    shell:
        "python {input.script} --validation {input.validation} --tokenized {input.tokenized}"
        " --output {output} > {log} 2>&1"
