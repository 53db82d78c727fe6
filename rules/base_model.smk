# The embedded tiny base model: built offline (a tokenizer trained on its corpus,
# standard random initialization), then pretrained on the same corpus by the train
# rule itself (method full). The result is a cached stage that every run on this
# base model shares. Tokenizing the corpus and pretraining are the tokenize and
# train rules with the model's own files.


rule build_tiny_model:
    input:
        corpus=corpus_records,
        settings="results/pretrain/{model}/settings/build_tiny_model.json",
        script=script("build_tiny_model"),
        code=code_of("build_tiny_model"),
    output:
        directory("results/pretrain/{model}/init"),
    log:
        "results/logs/build_tiny_model/{model}.log",
    conda:
        "../envs/finetune.yaml"
    shell:
        "python {input.script} --corpus {input.corpus} --settings {input.settings} --output {output} > {log} 2>&1"


use rule tokenize as tokenize_corpus with:
    input:
        records=corpus_records,
        settings="results/pretrain/{model}/settings/tokenize_data.json",
        tokenizer=rules.build_tiny_model.output,
        script=script("tokenize_data"),
        code=code_of("tokenize_data"),
    output:
        shard="results/pretrain/{model}/corpus.arrow",
        stats="results/pretrain/{model}/corpus.stats.json",
    log:
        "results/logs/tokenize_corpus/{model}.log",
    params:
        tokenizer=rules.build_tiny_model.output,
        source=corpus_source,


use rule train as pretrain with:
    input:
        shards=rules.tokenize_corpus.output.shard,
        reference=[],
        records=[],
        rewards=[],
        model=rules.build_tiny_model.output,
        settings="results/pretrain/{model}/settings/train.json",
        script=script("train"),
        code=code_of("train", leave_out=SAMPLING + PREFERENCE + GRPO + PRUNING),
    output:
        trained=directory("results/base_models/{model}"),
        metrics="results/pretrain/{model}/metrics.jsonl",
        summary="results/pretrain/{model}/train_summary.json",
        samples="results/pretrain/{model}/samples.jsonl",
        tensorboard=directory("results/pretrain/{model}/tensorboard"),
    log:
        "results/logs/pretrain/{model}.log",
    resources:
        gpu=pretraining_gpus,
    params:
        run_name="pretrain-{model}",
        base_model=rules.build_tiny_model.output,
        gpus=pretraining_gpus,
        launcher=lambda wildcards: launcher(pretraining_gpus(wildcards)),
        checkpoints="results/checkpoints/pretrain-{model}",
