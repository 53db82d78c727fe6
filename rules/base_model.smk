# The embedded tiny base model: built offline (a tokenizer trained on its corpus,
# standard random initialization), then pretrained on the same corpus by a full
# run of the training script, the same code path as every run. The result is a
# cached stage that every run on this base model shares.


rule build_tiny_model:
    input:
        corpus=lambda wc: f"results/data/{config['base_models'][wc.model]['build_tiny']['corpus']}.jsonl",
        script=script("build_tiny_model"),
        modules=imported_modules("build_tiny_model"),
    output:
        directory("results/pretrain/{model}/init"),
    params:
        settings=lambda wc: script_flags("build_tiny_model", model=wc.model),
    log:
        "results/logs/build_tiny_model/{model}.log",
    conda:
        "../envs/finetune.yaml"
    shell:
        "python {input.script} --corpus {input.corpus} --output {output} {params.settings} > {log} 2>&1"


rule tokenize_corpus:
    input:
        records=lambda wc: f"results/data/{config['base_models'][wc.model]['build_tiny']['corpus']}.jsonl",
        model="results/pretrain/{model}/init",
        script=script("tokenize_data"),
        modules=imported_modules("tokenize_data"),
    output:
        shard="results/pretrain/{model}/corpus.arrow",
        stats="results/pretrain/{model}/corpus.stats.json",
    params:
        settings=lambda wc: script_flags("tokenize_data", run=pretraining(wc.model),
                                         dataset=config["base_models"][wc.model]["build_tiny"]["corpus"]),
    threads: 2
    log:
        "results/logs/tokenize_corpus/{model}.log",
    conda:
        "../envs/finetune.yaml"
    shell:
        "RAYON_NUM_THREADS={threads} python {input.script} --input {input.records} --tokenizer {input.model}"
        " {params.settings} --output {output.shard} --stats {output.stats} > {log} 2>&1"


rule pretrain:
    input:
        shard="results/pretrain/{model}/corpus.arrow",
        model="results/pretrain/{model}/init",
        script=script("train"),
        modules=imported_modules("train"),
    output:
        model=directory("results/base_models/{model}"),
        metrics="results/pretrain/{model}/metrics.jsonl",
        summary="results/pretrain/{model}/train_summary.json",
        samples="results/pretrain/{model}/samples.jsonl",
        tensorboard=directory("results/pretrain/{model}/tensorboard"),
    params:
        settings=lambda wc: script_flags("train", run=pretraining(wc.model)),
        launcher=lambda wc: train_launcher(pretraining(wc.model)["gpus"]),
        checkpoints=lambda wc: f"results/checkpoints/pretrain-{wc.model}",
        gpu_pool=script("gpu_pool"),
    threads: 2
    resources:
        gpu=lambda wc: pretraining(wc.model)["gpus"],
    log:
        "results/logs/pretrain/{model}.log",
    conda:
        "../envs/finetune.yaml"
    shell:
        "python {params.gpu_pool} --gpus {resources.gpu} -- {params.launcher} {input.script}"
        " --run-name pretrain-{wildcards.model}"
        " --base-model {input.model} --shards {input.shard} --output-dir {output.model} --metrics {output.metrics}"
        " --summary {output.summary} --samples {output.samples} --tensorboard-dir {output.tensorboard}"
        " --tracker-dir results/trackers"
        " --checkpoint-dir {params.checkpoints} {params.settings} --threads {threads} > {log} 2>&1"
