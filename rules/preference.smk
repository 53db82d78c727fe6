# Preference tuning: the reference model's log-probabilities of every answer in a shard, for
# the runs whose objective compares with a reference (dpo, ipo, kto). One file per (reference,
# shard): every run with that reference (its base model, and the settings of the pass) shares
# it, so a sweep over beta makes one pass; editing one dataset recomputes only its file.


rule reference_logps:
    input:
        shard="results/tokens/{tokenization}/{dataset}.arrow",
        model=reference_model_files,
        settings="results/reference/{reference}/settings/reference_logps.json",
        script=script("reference_logps"),
        code=code_of("reference_logps"),
    output:
        "results/reference/{reference}/{tokenization}/{dataset}.arrow",
    log:
        "results/logs/reference_logps/{reference}/{tokenization}/{dataset}.log",
    conda:
        "../envs/finetune.yaml"
    threads: 2
    resources:
        gpu=reference_gpus,
    params:
        base_model=reference_model,
    shell:
        "python -m finetune.gpu_pool --gpus {resources.gpu} -- python {input.script} --settings {input.settings}"
        " --base-model {params.base_model} --shard {input.shard} --output {output} --threads {threads} > {log} 2>&1"
