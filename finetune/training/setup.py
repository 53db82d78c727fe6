"""Setting up a training run (scripts/train.py): the device and precision, the data and the
steps it makes, the base model with its adapter, the optimizer and schedule, and the state of
a matching checkpoint, as one typed `Training` (state.py). `args` are train.py's paths."""
import math
import sys
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import parse_flag_from_env, set_seed
from peft import get_peft_model
from transformers import get_scheduler

from finetune.data.batches import micro_batch_indices
from finetune.data.mixing import describe_mix, source_of_positions
from finetune.data.shards import read_shards
from finetune.data.tokenizer import load_tokenizer
from finetune.models import resolve_precision
from finetune.training.adapters import load_model, make_optimizer, peft_config
from finetune.training.checkpoints import fingerprint, load_checkpoint
from finetune.training.distributed import shard_model
from finetune.training.preflight import check_architecture, hardware_problems, quantization_of
from finetune.training.selection import load_best_weights
from finetune.training.state import Progress, Training


def setup_device(args, settings):
    """The accelerator, device and resolved precision, or exit naming why this hardware cannot run the run."""
    # The state must know about ACCELERATE_USE_CPU before anything else initializes it (DDP on CPU).
    device = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU")).device
    precision = resolve_precision(settings.precision, device)
    problems = hardware_problems(settings, device, precision)
    if problems:
        sys.exit(f"[{args.run_name}] cannot train on {device.type}: " + "; ".join(problems))
    return Accelerator(mixed_precision="no" if precision == "fp32" else precision), device, precision


def mix_weights(args, settings):
    """The weight of each shard's dataset (in shard order), or None when the datasets carry none."""
    if not isinstance(settings.datasets, dict):
        return None
    return [settings.datasets[Path(shard).stem] for shard in args.shards]


def objective_data_problem(objective, kind):
    """Why a run with this objective cannot train on shards of this kind, or None."""
    wanted = {"sft": "sft", "kto": "unpaired"}.get(objective, "preference")
    if kind == wanted or objective == "grpo":  # grpo takes the prompts of any records
        return None
    formats = {"sft": "alpaca, chat or completion", "preference": "preference", "unpaired": "unpaired"}
    return (f"objective {objective} trains on records of format {formats[wanted]}, but the shards hold "
            f"{formats[kind]} records (choose the run's datasets, or its objective, to match)")


def read_examples(args, settings):
    """Train and held-out examples of the shards, with the reference's log-probabilities when the
    objective compares with a reference (dpo, ipo, kto)."""
    try:
        train_examples, eval_examples = read_shards(args.shards, "train"), read_shards(args.shards, "eval")
    except ValueError as error:
        sys.exit(f"[{args.run_name}] {error}")
    problem = objective_data_problem(settings.objective, train_examples.kind)
    if problem:
        sys.exit(f"[{args.run_name}] {problem}")
    if settings.objective in ("dpo", "ipo", "kto"):
        if not args.reference or len(args.reference) != len(args.shards):
            sys.exit(f"[{args.run_name}] objective {settings.objective} needs the reference's log-probabilities of "
                     "each shard (--reference, one file per shard, from scripts/reference_logps.py)")
        try:
            for examples in (train_examples, eval_examples):
                examples.attach_reference(args.reference)
        except ValueError as error:
            sys.exit(f"[{args.run_name}] {error}")
    return train_examples, eval_examples


def setup_data(args, settings, num_processes):
    """Train and held-out examples, and the number of optimizer steps they make."""
    train_examples, eval_examples = read_examples(args, settings)
    if not train_examples:
        sys.exit(f"[{args.run_name}] no training records in {', '.join(map(str, args.shards))}")
    if not eval_examples and (settings.keep == "best" or settings.early_stopping):
        sys.exit(f"[{args.run_name}] keep best and early stopping compare held-out losses, but the shards hold no "
                 "held-out records (raise eval.fraction, or give a dataset with split: eval)")
    for path, size, weight in zip(args.shards, train_examples.sizes, mix_weights(args, settings) or []):
        if size == 0:
            sys.exit(f"[{args.run_name}] {path} has no training records, but its dataset has weight {weight}")
    micro_batches_per_epoch = len(train_examples) // settings.batch_size // num_processes
    steps_per_epoch = max(micro_batches_per_epoch // settings.grad_accum, 1) * steps_per_window(settings)
    total_steps = settings.max_steps or math.ceil(settings.epochs * steps_per_epoch)
    return train_examples, eval_examples, steps_per_epoch, total_steps


def steps_per_window(settings):
    """Optimizer steps on one accumulation window of examples: grpo's iterations, else 1."""
    return settings.iterations if settings.objective == "grpo" else 1


def micro_batches_before(settings, step):
    """The micro-batches the steps before `step` drew (a resumed run skips them)."""
    return -(-step // steps_per_window(settings)) * settings.grad_accum


def setup_grpo(args, settings, train_examples, eval_examples):
    """A grpo run's rewards (a broken one stops the run here, before the model loads) and its prompts."""
    from finetune.data.prompts import resolve_template, stop_token_ids
    from finetune.training import grpo, rewards
    try:
        loaded = rewards.load_rewards(settings.rewards)
        tokenizer = load_tokenizer(args.base_model, settings.chat_template, settings.trust_remote_code)
        template = resolve_template(tokenizer, settings.template)
        prompts = grpo.read_prompts(args.records, train_examples.record_ids(), tokenizer, template)
        eval_ids = eval_examples.record_ids()[:settings.reward_eval_prompts]
        eval_prompts = grpo.read_prompts(args.records, eval_ids, tokenizer, template)
    except (ValueError, SyntaxError, ImportError) as error:
        sys.exit(f"[{args.run_name}] {error}")
    return grpo.GrpoState(prompts=prompts, eval_prompts=eval_prompts, stop_ids=stop_token_ids(tokenizer, template),
                          rewards=loaded)


def setup_model(args, settings, precision, accelerator, total_steps, empty=False):
    """The base model with a fresh adapter (every parameter trainable for full), and its tokenizer.
    empty: build it without weights (a sharded run's other processes receive theirs)."""
    tokenizer = load_tokenizer(args.base_model, settings.chat_template, settings.trust_remote_code)
    model = load_model(args.base_model, settings, precision, accelerator, tokenizer, empty)
    if settings.gradient_checkpointing and quantization_of(settings) == "none":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if settings.method != "full":
            model.enable_input_require_grads()
    if settings.method != "full":
        model = get_peft_model(model, peft_config(settings, total_steps))
    if settings.objective != "sft":
        disable_dropout(model)
    return model, tokenizer


def disable_dropout(model):
    """A preference objective compares the model with its reference, computed without dropout: dropout in the
    model being trained would add noise to every log-probability ratio (and the first loss would not be the
    reference's). Off in every layer, LoRA's included, as TRL's disable_dropout (on by default) does."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def prepared_samples(settings, tokenizer):
    """The prompts to answer during training, encoded; imported only by runs that sample, so that the
    generation code is an input of those runs alone (rules/common.smk: code_of)."""
    if not (settings.sample_every and settings.prompts):
        return [], []
    from finetune.training.samples import prepare_samples
    return prepare_samples(settings.prompts, settings.template, tokenizer)


def setup(args, settings):
    """Everything the loop needs, resumed from a matching checkpoint when there is one."""
    accelerator, device, precision = setup_device(args, settings)
    check_architecture(args.base_model, settings, args.run_name)
    set_seed(settings.seed)
    train_examples, eval_examples, steps_per_epoch, total_steps = setup_data(args, settings, accelerator.num_processes)
    grpo = setup_grpo(args, settings, train_examples, eval_examples) if settings.objective == "grpo" else None
    sharded = settings.distributed == "fsdp" and accelerator.num_processes > 1
    # A quantized base is quantized as it loads, on every process; otherwise only the first reads the weights.
    first_reads = sharded and quantization_of(settings) == "none"
    model, tokenizer = setup_model(args, settings, precision, accelerator, total_steps,
                                   empty=first_reads and not accelerator.is_main_process)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    if sharded:
        shard_model(model, precision, device, weights_on_first_process_only=first_reads)
    optimizer = make_optimizer(settings, [p for p in model.parameters() if p.requires_grad])
    scheduler = get_scheduler(settings.lr_scheduler, optimizer, num_training_steps=total_steps,
                              num_warmup_steps=round(settings.warmup_ratio * total_steps))
    weights = mix_weights(args, settings)
    run = Training(
        run_name=args.run_name, settings=settings, accelerator=accelerator, device=device, precision=precision,
        packing=train_examples.kind == "sft" and (settings.packing == "on" or (
            settings.packing == "auto" and settings.attn_implementation == "flash_attention_2")),
        sharded=sharded, tokenizer=tokenizer, model=model, unwrapped=model, optimizer=optimizer, scheduler=scheduler,
        train_examples=train_examples, eval_examples=eval_examples, total_steps=total_steps,
        trainable_parameters=trainable, total_parameters=total,
        # Without weights each dataset's share is its share of the data.
        mix=describe_mix([Path(path).stem for path in args.shards], train_examples.sizes,
                         weights or train_examples.sizes),
        source_of=source_of_positions(train_examples.sizes), samples=prepared_samples(settings, tokenizer),
        checkpoints=args.checkpoint_dir, progress=Progress(contributed=np.zeros(len(args.shards), dtype=np.int64)),
        grpo=grpo)
    if grpo and settings.beta and settings.method == "full":  # the KL term's reference: a frozen base model
        grpo.reference = load_model(args.base_model, settings, precision, accelerator, tokenizer).eval()
        grpo.reference.requires_grad_(False)
    run.say(f"{settings.method}: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%); "
             f"{len(train_examples)} train / {len(eval_examples)} eval records; {total_steps} steps "
             f"({steps_per_epoch} per epoch); {precision}, {model.config._attn_implementation} attention, "
             f"{'packed' if run.packing else 'length-grouped'} batches, {accelerator.num_processes} process(es)"
             f"{', FSDP' if sharded else ''}")
    if weights:
        run.say("mix per epoch: " + ", ".join(f"{name} {spec['per_epoch']} of {spec['train_records']}"
                                               for name, spec in run.mix.items()))
    if grpo:  # the random state completions are sampled from: each process its own (a checkpoint restores it)
        torch.manual_seed(settings.seed * 1_000_003 + accelerator.process_index)
    resume(run, args)
    if not sharded:
        run.model, run.optimizer = accelerator.prepare(model, optimizer)
        run.unwrapped = accelerator.unwrap_model(run.model)
    # grpo draws its prompts in random order: batches of similar length would hold one task each, and a step's
    # groups learn more spread over tasks (sampling pads each batch of prompts to its longest anyway).
    lengths = np.zeros_like(train_examples.lengths) if settings.objective == "grpo" else train_examples.lengths
    run.batches = micro_batch_indices(lengths, settings.batch_size, settings.seed,
                                      accelerator.process_index, accelerator.num_processes,
                                      (train_examples.sizes, weights) if weights else None)
    for _ in range(micro_batches_before(settings, run.progress.start_step)):
        run.next_micro_batch()
    return run


def resume(run, args):
    """Restore the last checkpoint when it is of this run's settings and data."""
    if not run.checkpoints:
        return
    run.fingerprint = fingerprint(run.settings, args.base_model, args.shards)
    progress = run.progress
    progress.start_step, history, progress.elapsed_before = load_checkpoint(run, lambda m: run.say(m))
    progress.history = {**progress.history, **(history or {})}
    if run.settings.keep == "best" and run.accelerator.is_main_process:
        progress.best_state = load_best_weights(run.checkpoints)
