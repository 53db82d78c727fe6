# Export: each run's adapter merged into its (unquantized) base model.


rule merge:
    input:
        adapter="results/runs/{run}/adapter",
        model=lambda wc: base_model_input(RUNS[wc.run]["base_model"]),
        script=f"{SCRIPTS}/merge.py",
        common=COMMON_CODE,
    output:
        directory("results/runs/{run}/merged"),
    params:
        base_model=lambda wc: base_model_path(RUNS[wc.run]["base_model"]),
        dtype=lambda wc: RUNS[wc.run]["merge_dtype"],
    threads: 2
    log:
        "results/logs/merge/{run}.log",
    conda:
        "../envs/finetune.yaml"
    shell:
        "python {input.script} --base-model {params.base_model} --adapter-dir {input.adapter}"
        " --output-dir {output} --dtype {params.dtype} --threads {threads} > {log} 2>&1"
