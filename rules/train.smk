# One training job per configured run. The job's `gpu` resource comes from the
# run's `gpus`, so `snakemake --resources gpu=N` bounds concurrent GPU jobs.
# Checkpoints go to results/checkpoints/{run}, which is not an output: Snakemake
# deletes the outputs of a failed job, and a rerun resumes from the checkpoint.


rule train:
    input:
        shards=lambda wc: shards(wc.run),
        model=lambda wc: base_model_input(RUNS[wc.run]["base_model"]),
        script=f"{SCRIPTS}/train.py",
        common=COMMON_CODE,
    output:
        adapter=directory("results/runs/{run}/trained"),
        metrics="results/runs/{run}/metrics.jsonl",
        summary="results/runs/{run}/train_summary.json",
        tensorboard=directory("results/runs/{run}/tensorboard"),
    params:
        base_model=lambda wc: base_model_path(RUNS[wc.run]["base_model"]),
        launcher=lambda wc: train_launcher(wc.run),
        settings=lambda wc: cli_flags(RUNS[wc.run], TRAIN_SETTINGS),
        chat_template=lambda wc: chat_template_flag(RUNS[wc.run]["base_model"]),
        checkpoints=lambda wc: f"results/checkpoints/{wc.run}",
        gpu_pool=GPU_POOL,
    threads: 2
    resources:
        gpu=lambda wc: RUNS[wc.run]["gpus"],
    log:
        "results/logs/train/{run}.log",
    conda:
        "../envs/finetune.yaml"
    shell:
        "python {params.gpu_pool} --gpus {resources.gpu} --"
        " {params.launcher} {input.script} --run-name {wildcards.run} --base-model {params.base_model}"
        " --shards {input.shards} --adapter-dir {output.adapter} --metrics {output.metrics}"
        " --summary {output.summary} --tensorboard-dir {output.tensorboard} --checkpoint-dir {params.checkpoints}"
        " {params.chat_template} {params.settings}"
        " --threads {threads} > {log} 2>&1"
