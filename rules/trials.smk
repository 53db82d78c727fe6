# A search's trials as runs (rules/search.smk has the search's jobs): each round's trials
# are registered as runs (RUNS, TRIALS) when its proposal, a checkpoint, is read; and what
# the search's jobs, the sweep page and the `all` target look up about them. They wait on
# proposals only, and only while a proposal is to be made, never on told results (Snakemake
# may find a job it planned up to date once its inputs are made, and would leave what waits
# for that job unresolved). Uses config.smk and paths.smk; common.smk and the rule files
# use it.
import os

from finetune.files import read_json
from finetune.search.runs import resolve_trial
from finetune.search.space import round_sizes, trial_name

TRIALS = {}  # trial run name -> (search, number, proposed values)


def register_trial(search, number, values):
    """A proposed trial as a run (resolved exactly as a configured run with these settings); its name."""
    name = trial_name(search, number)
    if TRIALS.get(name) != (search, number, values):
        run, models = resolve_trial(RAW_CONFIG, search, name, values, validated)
        for model, spec in models.items():
            config["base_models"].setdefault(model, spec)
        add_run(name, run)
        TRIALS[name] = (search, number, values)
    return name


def search_round_count(search):
    return len(round_sizes(SEARCHES[search]["trials"], SEARCHES[search]["parallel"]))


def proposed_trials(search, round_number):
    """The runs of a round's trials, once its proposal (a checkpoint) is made."""
    proposal = checkpoints.search_propose.get(search=search, round=str(round_number)).output[0]
    return [register_trial(search, trial["number"], trial["params"]) for trial in read_json(proposal)["trials"]]


def searched_trials(search):
    """Every trial of a search, round by round as their proposals are made."""
    return [run for n in range(1, search_round_count(search) + 1) for run in proposed_trials(search, n)]


def register_proposed_trials():
    """A job that runs in a process of its own (a cluster job) parses the workflow again: the trials it may run
    are those of the proposals already made."""
    for search in SEARCHES:
        for round_number in range(1, search_round_count(search) + 1):
            proposal = f"results/search/{search}/round-{round_number}.json"
            if os.path.exists(proposal):
                for trial in read_json(proposal)["trials"]:
                    register_trial(search, trial["number"], trial["params"])


def earlier_told(wildcards):
    """The told file of the round before (none for the first round)."""
    round_number = int(wildcards.round)
    return [f"results/search/{wildcards.search}/told-{round_number - 1}.json"] if round_number > 1 else []


def round_trials(wildcards):
    return proposed_trials(wildcards.search, wildcards.round)


def round_files(kind):
    """Each trial's eval.json, train_summary.json or metrics.jsonl, of the round's proposal."""
    names = {"evaluations": "eval.json", "summaries": "train_summary.json", "metrics": "metrics.jsonl"}
    return lambda wildcards: [f"results/runs/{run}/{names[kind]}" for run in round_trials(wildcards)]


def last_told_file(search):
    return f"results/search/{search}/told-{search_round_count(search)}.json"


def last_told(wildcards):
    return last_told_file(wildcards.search)


def search_outputs(wildcards):
    """Each search's report, and its trials' evaluations and run pages."""
    outputs = []
    for search in SEARCHES:
        outputs += [f"results/search/{search}/report.html"]
        for run in searched_trials(search):
            outputs += [f"results/runs/{run}/eval.json", f"results/runs/{run}/report.html"]
    return outputs


def swept_runs():
    """The runs the sweep page compares: the configured ones and every search's trials (a failed trial's
    files say so; the page leaves it out)."""
    return CONFIGURED_RUNS + [run for search in SEARCHES for run in searched_trials(search)]


def swept(path):
    return lambda wildcards: [path.format(run=name) for name in swept_runs()]


def pruned_trial(run):
    return run in TRIALS and SEARCHES[TRIALS[run][0]]["pruning"] != "none"


def trial_guard(wildcards, output):
    """A search trial's training runs under the guard: its failure is told to the study, not the workflow's."""
    if getattr(wildcards, "run", None) not in TRIALS:  # pretraining runs this rule's command too
        return ""
    names = ("trained", "metrics", "summary", "samples", "tensorboard")  # the train rule's outputs, in order
    outputs = " ".join(f"--{name} {path}" for name, path in zip(names, output))
    return f"python -m finetune.search.guard --log results/logs/train/{wildcards.run}.log {outputs} -- "


def trial_pruning(wildcards):
    """A trial of a search that prunes reports to its study (train.py --study, --trial)."""
    if not pruned_trial(getattr(wildcards, "run", None)):
        return ""
    search, number, _ = TRIALS[wildcards.run]
    return f" --study results/search/{search}/study.journal --trial {number}"
