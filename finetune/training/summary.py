"""train_summary.json: what a run trained (parameters, records, steps, how it stopped, the
examples each dataset gave), how (precision, attention, packing, processes), at what cost
(time, tokens/s, memory) and on what (library versions, device)."""
import time

from finetune.data.tokenizer import ADDED_PAD
from finetune.environment import device_description, library_versions, peak_memory_mb
from finetune.training.experts import has_fused_experts, wrapped_parameters
from finetune.training.preflight import quantization_of


def training_summary(run, tokens_seen, stopped_at, stop, contributed):
    """The summary of a finished run (run: state.Training); contributed: examples trained per dataset,
    summed over processes."""
    settings, progress, processes = run.settings, run.progress, run.accelerator.num_processes
    session_time = time.perf_counter() - progress.started
    selection = progress.history["selection"]
    experts = {"adapted_expert_parameters": wrapped_parameters(run.unwrapped)} if has_fused_experts(run.unwrapped) else {}
    return {
        **experts,
        "run": run.run_name, "method": settings.method, "trainable_parameters": run.trainable_parameters,
        "total_parameters": run.total_parameters, "train_records": len(run.train_examples),
        "eval_records": len(run.eval_examples), "steps": run.total_steps, "resumed_from_step": progress.start_step,
        "quantization": quantization_of(settings), "trust_remote_code": settings.trust_remote_code,
        "added_pad_token": run.tokenizer.pad_token == ADDED_PAD, "precision": run.precision,
        "attn_implementation": run.unwrapped.config._attn_implementation, "packing": run.packing,
        "processes": processes, "distributed": settings.distributed if processes > 1 else "none",
        "wall_time_s": progress.elapsed_before + session_time, "peak_memory_mb": peak_memory_mb(run.device),
        "session_time_s": session_time, "session_tokens": tokens_seen * processes,
        "session_tokens_per_s": tokens_seen * processes / session_time,
        "kept": settings.keep, **{key: value for key, value in selection.items() if key.startswith("best_")},
        "stopped_at_step": stopped_at, "stop_reason": stop or "max_steps",
        "environment": {"libraries": library_versions(), "device": device_description(run.device, processes)},
        "sources": {name: {**spec, "examples_trained": int(count)}
                    for (name, spec), count in zip(run.mix.items(), contributed)},
    }
