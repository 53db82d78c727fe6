# One training job per configured run. The job's `gpu` resource comes from the
# run's `gpus`, so `snakemake --resources gpu=N` bounds concurrent GPU jobs; a run
# with `nodes` > 1 asks SLURM for that many nodes instead (training_resources).
# Checkpoints go to results/checkpoints/{run}, which is not an output: Snakemake
# deletes the outputs of a failed job, and a rerun resumes from the checkpoint.
# The GPU pool wrapper and the launcher are not inputs: editing them changes no result.


rule train:
    input:
        shards=lambda wc: shards(wc.run),
        model=lambda wc: base_model_files(RUNS[wc.run]["base_model"]),
        script=script("train"),
        modules=imported_modules("train"),
    output:
        trained=directory("results/runs/{run}/trained"),
        metrics="results/runs/{run}/metrics.jsonl",
        summary="results/runs/{run}/train_summary.json",
        samples="results/runs/{run}/samples.jsonl",
        tensorboard=directory("results/runs/{run}/tensorboard"),
    params:
        base_model=lambda wc: base_model_path(RUNS[wc.run]["base_model"]),
        launcher=lambda wc: train_launcher(RUNS[wc.run]["gpus"], RUNS[wc.run]["nodes"]),
        settings=lambda wc: script_flags("train", run=RUNS[wc.run]),
        weights=lambda wc: mix_weights(wc.run),
        checkpoints=lambda wc: f"results/checkpoints/{wc.run}",
        gpu_pool=script("gpu_pool"),
        gpus=lambda wc: RUNS[wc.run]["gpus"],
    threads: 2
    resources:
        gpu=lambda wc: training_resources(RUNS[wc.run], "gpu"),
        nodes=lambda wc: training_resources(RUNS[wc.run], "nodes"),
        gres=lambda wc: training_resources(RUNS[wc.run], "gres"),
        tasks=lambda wc: training_resources(RUNS[wc.run], "tasks"),
        tasks_per_gpu=lambda wc: training_resources(RUNS[wc.run], "tasks_per_gpu"),
        mpi=lambda wc: training_resources(RUNS[wc.run], "mpi"),
    log:
        "results/logs/train/{run}.log",
    conda:
        "../envs/finetune.yaml"
    shell:
        "python {params.gpu_pool} --gpus {params.gpus} --"
        " {params.launcher} {input.script} --run-name {wildcards.run} --base-model {params.base_model}"
        " --shards {input.shards} {params.weights} --output-dir {output.trained} --metrics {output.metrics}"
        " --summary {output.summary} --samples {output.samples} --tensorboard-dir {output.tensorboard}"
        " --tracker-dir results/trackers"
        " --checkpoint-dir {params.checkpoints}"
        " {params.settings} --threads {threads} > {log} 2>&1"


rule manifest:
    input:
        summary="results/runs/{run}/train_summary.json",
        shards=lambda wc: shards(wc.run),
        model=lambda wc: base_model_files(RUNS[wc.run]["base_model"]),
        script=script("manifest"),
        modules=imported_modules("manifest"),
    output:
        "results/runs/{run}/manifest.json",
    params:
        # In the config's order: the order of a run's datasets is the order of its shards.
        settings=lambda wc: shlex.quote(json.dumps(RUNS[wc.run])),
        base_model=lambda wc: base_model_path(RUNS[wc.run]["base_model"]),
        workflow_dir=WORKFLOW_DIR,
    log:
        "results/logs/manifest/{run}.log",
    conda:
        "../envs/finetune.yaml"
    shell:
        "python {input.script} --run-name {wildcards.run} --settings {params.settings} --summary {input.summary}"
        " --shards {input.shards} --base-model {params.base_model:q} --workflow-dir {params.workflow_dir:q}"
        " --output {output} > {log} 2>&1"
