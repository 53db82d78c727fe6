"""Tell a search's study the results of a round's trials, and write the told file: every trial so far with
its parameters, state (COMPLETE, PRUNED or FAIL), objective, held-out losses and why it stopped or failed,
and the best trial. A trial whose training failed (its eval.json says so) or whose objective is not a
number is told as failed, and the search goes on.

    python scripts/search_tell.py --settings results/search/S/settings/search_tell.json --search S --round 1 \
        --proposal results/search/S/round-1.json --runs S-trial0 S-trial1 \
        --evaluations results/runs/S-trial{0,1}/eval.json --summaries results/runs/S-trial{0,1}/train_summary.json \
        --metrics results/runs/S-trial{0,1}/metrics.jsonl --journal results/search/S/study.journal \
        --output results/search/S/told-1.json
"""
import argparse
import sys
from pathlib import Path

from finetune.files import read_json, read_jsonl, write_json
from finetune.search.study import outcome, tell
from finetune.settings import read_settings


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", type=Path, required=True, help="this stage's settings (JSON)")
    parser.add_argument("--search", required=True, help="the search's name (its study's name)")
    parser.add_argument("--round", type=int, required=True, help="the round told (from 1)")
    parser.add_argument("--proposal", type=Path, required=True, help="the round's proposal (search_propose.py)")
    parser.add_argument("--told", type=Path, nargs="?", default=None, help="the told file of the round before")
    parser.add_argument("--runs", nargs="+", required=True, help="the trials' run names, in the proposal's order")
    parser.add_argument("--evaluations", type=Path, nargs="+", required=True, help="each trial's eval.json")
    parser.add_argument("--summaries", type=Path, nargs="+", required=True, help="each trial's train_summary.json")
    parser.add_argument("--metrics", type=Path, nargs="+", required=True, help="each trial's metrics.jsonl")
    parser.add_argument("--journal", type=Path, required=True, help="the study's Optuna journal file")
    parser.add_argument("--output", type=Path, required=True, help="the told file (JSON)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    settings = read_settings(args.settings, "search_tell")
    proposal = read_json(args.proposal)["trials"]
    if not len(proposal) == len(args.runs) == len(args.evaluations) == len(args.summaries) == len(args.metrics):
        sys.exit(f"{args.proposal}: {len(proposal)} trials, but {len(args.runs)} runs, {len(args.evaluations)} "
                 f"evaluations, {len(args.summaries)} summaries and {len(args.metrics)} metrics files were given")
    history = read_json(args.told)["trials"] if args.told else []
    told_now = []
    for trial, run, evaluation, summary, metrics in zip(proposal, args.runs, args.evaluations, args.summaries,
                                                         args.metrics):
        try:
            told_now.append(outcome(trial, run, args.round, read_json(evaluation), read_json(summary),
                                    list(read_jsonl(metrics)), settings.objective))
        except KeyError as problem:
            sys.exit(f"{evaluation}: {problem.args[0]}")
    told = tell(settings, args.search, args.round, history, told_now, args.journal)
    write_json(args.output, told)
    for trial in told_now:
        result = trial["error"] if trial["state"] == "FAIL" else f"{settings.objective['metric']} {trial['value']:.4g}"
        print(f"[{args.search}] trial {trial['number']} ({trial['run']}): {trial['state']}, {result}")
    best = told["best"]
    print(f"[{args.search}] best so far: " + (f"trial {best['number']} ({best['run']}), {best['value']:.4g}"
                                              if best else "no trial completed"))


if __name__ == "__main__":
    main()
