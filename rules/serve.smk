# Serving: per base model, what scripts/serve.py loads (the base and every run trained on
# it) and the equivalent vLLM command for GPU machines. Written once every run on that base
# has trained; serving itself is a long-running process, not a job (docs/using.md).


rule serving:
    input:
        trained=served_trained,
    output:
        manifest="results/serve/{model}.json",
        vllm="results/serve/{model}.vllm.sh",
    log:
        "results/logs/serving/{model}.log",
    localrule: True
    conda:
        "../envs/finetune.yaml"
    params:
        manifest=serving_manifest,
        vllm=vllm_command,
    shell:
        "(printf '%s\\n' {params.manifest:q} > {output.manifest}"
        " && printf '%s\\n' {params.vllm:q} > {output.vllm}) 2> {log}"
