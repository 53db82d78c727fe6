# One training job per configured run, and its manifest. The job's `gpu` resource is
# the run's `gpus`, so `snakemake --resources gpu=N` bounds concurrent GPU jobs; a run
# with `nodes` > 1 asks SLURM for that many nodes instead (training_resources).
# A run with objective dpo, ipo or kto also reads its reference's log-probabilities of each
# shard (rules/preference.smk); a grpo run reads its records (prompts and answers) and the
# project files of its rewards; a chained run's manifest includes its parent's.
# Checkpoints go to results/checkpoints/{run}, which is not an output: Snakemake
# deletes the outputs of a failed job, and a rerun resumes from the checkpoint.
# The GPU pool and the launcher (finetune/gpu_pool.py, finetune/launch.py) are not
# inputs: they start the script on its devices and change no result.


rule train:
    input:
        shards=run_shards,
        reference=run_reference_files,
        records=run_records,
        rewards=run_reward_files,
        model=run_base_model_files,
        settings="results/runs/{run}/settings/train.json",
        script=script("train"),
        code=training_code,
    output:
        trained=directory("results/runs/{run}/trained"),
        metrics="results/runs/{run}/metrics.jsonl",
        summary="results/runs/{run}/train_summary.json",
        samples="results/runs/{run}/samples.jsonl",
        tensorboard=directory("results/runs/{run}/tensorboard"),
    log:
        "results/logs/train/{run}.log",
    conda:
        "../envs/finetune.yaml"
    threads: 2
    resources:
        gpu=training_resources("gpu"),
        nodes=training_resources("nodes"),
        gres=training_resources("gres"),
        tasks=training_resources("tasks"),
        tasks_per_gpu=training_resources("tasks_per_gpu"),
        mpi=training_resources("mpi"),
    params:
        run_name="{run}",
        base_model=run_base_model,
        gpus=lambda wildcards: run_of(wildcards)["gpus"],
        launcher=lambda wildcards: launcher(run_of(wildcards)["gpus"], run_of(wildcards)["nodes"]),
        checkpoints="results/checkpoints/{run}",
        guard=trial_guard,
        pruning=trial_pruning,
    shell:
        "{params.guard}python -m finetune.gpu_pool --gpus {params.gpus} -- {params.launcher} {input.script}"
        " --run-name {params.run_name} --settings {input.settings} --base-model {params.base_model}"
        " --shards {input.shards} --reference {input.reference} --records {input.records} --output-dir {output.trained} --metrics {output.metrics}"
        " --summary {output.summary} --samples {output.samples} --tensorboard-dir {output.tensorboard}"
        " --tracker-dir results/trackers --checkpoint-dir {params.checkpoints} --threads {threads}{params.pruning} > {log} 2>&1"


rule manifest:
    input:
        settings=rules.run_settings.output,
        summary=rules.train.output.summary,
        parent=parent_manifest,
        shards=run_shards,
        model=run_base_model_files,
        script=script("manifest"),
        code=code_of("manifest"),
    output:
        "results/runs/{run}/manifest.json",
    log:
        "results/logs/manifest/{run}.log",
    conda:
        "../envs/finetune.yaml"
    params:
        base_model=run_base_model,
        workflow_dir=WORKFLOW_DIR,
    shell:
        "python {input.script} --run-name {wildcards.run} --settings {input.settings} --summary {input.summary}"
        " --parent-manifest {input.parent} --shards {input.shards} --base-model {params.base_model:q} --workflow-dir {params.workflow_dir:q}"
        " --output {output} > {log} 2>&1"
