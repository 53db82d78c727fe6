"""Standard benchmarks through lm-evaluation-harness (lm_eval), for eval.harness: the tasks resolved and
their data loaded before any training (scripts/harness_tasks.py; offline, from the local cache only), then
run by the evaluate job on the base and the tuned model it has loaded. The workflow's own task,
finetune_heldout (harness_tasks/), asks a run's held-out records exactly as evaluate.py does (the same
prompt tokens, greedy, the same answer-ending tokens) and scores them with its exact match. lm_eval is
imported here only, and this module only when eval.harness is set."""
import difflib
import functools
import importlib.metadata
from pathlib import Path

from finetune.evaluation.generation import model_stop_ids, reference_answer
from finetune.settings import declared

LOCAL_TASKS = Path(__file__).resolve().parent / "harness_tasks"
RUN_TASKS = ("finetune_heldout",)  # the tasks over a run's own records, which the evaluate job gives them


def harness_options(harness, stage="evaluate"):
    """eval.harness with the declared defaults of what it leaves out."""
    properties = declared(stage)["harness"][1]["properties"]
    return {**{name: spec.get("default") for name, spec in properties.items()}, **harness}


@functools.cache
def standard_tasks():
    """lm_eval's own tasks (indexing its thousands of task files takes seconds: once per process)."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


def task_managers(names, records=None):
    """(the manager of the workflow's own tasks, given the held-out rows they read; lm_eval's own, None when
    `names` need none of them)."""
    from lm_eval.tasks import TaskManager

    local = TaskManager(include_path=str(LOCAL_TASKS), include_defaults=False,
                        metadata={"records": records} if records is not None else None)
    return local, (standard_tasks() if set(names) - set(local.all_tasks) else None)


def unknown_tasks(names, local, standard):
    known = sorted(set(local.all_tasks) | set(standard.all_tasks if standard else ()))
    problems = []
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3)
            problems.append(f"'{name}' is no lm_eval task, group or tag"
                            + (f" (close: {', '.join(close)})" if close else ""))
    return problems


def data_problem(name, error):
    """What to do when a task's data cannot be loaded here (offline: not in the local cache)."""
    reason = (str(error).splitlines() or [type(error).__name__])[0]
    return (f"eval.harness.tasks: task '{name}' cannot load its data ({type(error).__name__}: {reason}). "
            "With HF_HUB_OFFLINE or HF_DATASETS_OFFLINE set, lm_eval's tasks read their datasets from the local "
            "Hugging Face cache only. Fill the cache once where there is a network: HF_HUB_OFFLINE=0 "
            f"HF_DATASETS_OFFLINE=0 python -c \"from lm_eval.tasks import TaskManager; TaskManager().load('{name}')\"; "
            "or put a task YAML reading local files (dataset_path: json, dataset_kwargs: {data_files: ...}) in "
            f"{LOCAL_TASKS}; or leave the task out of eval.harness.tasks")


def load(manager, name):
    """The Task or Group objects `name` stands for (a tag: its tasks), their data loaded."""
    loaded = manager.load(name)
    return [loaded["groups"][name]] if name in loaded["groups"] else list(loaded["tasks"].values())


def check_tasks(names):
    """{name: the tasks it runs} for eval.harness.tasks, each task's data loaded once (offline: from the
    cache); SystemExit saying what to do. finetune_heldout gets its records at evaluation (none here)."""
    local, standard = task_managers(names)
    problems = unknown_tasks(names, local, standard)
    if problems:
        raise SystemExit("eval.harness.tasks: " + "; ".join(problems) + " (`lm_eval ls tasks` lists them)")
    resolved = {}
    for name in names:
        if name in RUN_TASKS:
            resolved[name] = [name]
            continue
        try:
            loaded = (local if name in local.all_tasks else standard).load(name)
        except Exception as error:  # datasets' ConnectionError offline, a missing file, a bad task YAML
            raise SystemExit(data_problem(name, error)) from None
        resolved[name] = sorted(loaded["tasks"])
    return resolved


def heldout_rows(records, prompts, tokenizer):
    """What finetune_heldout reads: each held-out record's prompt as the text of evaluate's prompt tokens
    (special tokens included, so that lm_eval tokenizes it back to the same ids) and its reference."""
    return [{"id": record.get("id"), "task": record.get("task"), "prompt": tokenizer.decode(prompt),
             "reference": reference_answer(record)}
            for (source, record), prompt in zip(records, prompts) if source == "heldout"]


def run_tasks(model, tokenizer, options, rows, decoding):
    """({task or group: {metric: value}}, {task: records}) of eval.harness's tasks (options) on one model (an
    adapter switched off inside the caller's context is the base model). decoding: evaluate's
    max_new_tokens, batch_size and stop_ids, which the workflow's own tasks use."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    names = options["tasks"]
    local, standard = task_managers(names, rows)
    stops = model_stop_ids(model, decoding["stop_ids"])
    # As generate() decodes: ending at any answer-ending token (not only EOS), never the pad token.
    local_decoding = {"max_gen_toks": decoding["max_new_tokens"], "do_sample": False, "eos_token_id": stops,
                      "suppress_tokens": None if tokenizer.pad_token_id in stops else [tokenizer.pad_token_id]}
    tasks = []
    for name in names:
        own = name in local.all_tasks
        for task in load(local if own else standard, name):
            if own:
                task.set_config("generation_kwargs", local_decoding, update=True)
            tasks.append(task)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=decoding["batch_size"])
    output = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=options["num_fewshot"],
                                     limit=options["limit"], task_manager=standard or local, bootstrap_iters=0,
                                     log_samples=False)
    return ({task: metrics(values) for task, values in output["results"].items()},
            {task: counts["effective"] for task, counts in output["n-samples"].items()})


def metrics(values):
    """lm_eval's figures of one task as {metric: value}: 'metric,filter' keys, the filter named unless none."""
    table = {}
    for key, value in values.items():
        metric, _, kind = key.partition(",")
        if kind and "_stderr" not in metric and isinstance(value, (int, float)):
            table[metric if kind == "none" else f"{metric} ({kind})"] = value
    return table


def harness_section(options, results, samples):
    """eval.json's harness entry: the settings, lm_eval's version, and each side's table."""
    return {"tasks": options["tasks"], "num_fewshot": options["num_fewshot"], "limit": options["limit"],
            "lm_eval": importlib.metadata.version("lm_eval"), "samples": samples, **results}
