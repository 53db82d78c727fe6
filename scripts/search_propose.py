"""Propose a round of a search's trials from its Optuna study (finetune/search/study.py): the study is
brought to the told trials of the rounds before (rebuilt from them when the journal holds anything else),
then asked for the round's trials. The same told trials and seed propose the same trials.

    python scripts/search_propose.py --settings results/search/S/settings/search_propose.json --search S \
        --round 2 --told results/search/S/told-1.json --journal results/search/S/study.journal \
        --output results/search/S/round-2.json
"""
import argparse
import sys
from pathlib import Path

from finetune.files import read_json, write_json
from finetune.search.study import propose
from finetune.settings import read_settings


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", type=Path, required=True, help="this stage's settings (JSON)")
    parser.add_argument("--search", required=True, help="the search's name (its study's name)")
    parser.add_argument("--round", type=int, required=True, help="the round to propose (from 1)")
    parser.add_argument("--told", type=Path, nargs="?", default=None,
                        help="the told file of the round before (none for round 1)")
    parser.add_argument("--journal", type=Path, required=True, help="the study's Optuna journal file")
    parser.add_argument("--output", type=Path, required=True, help="the round's proposal (JSON)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    settings = read_settings(args.settings, "search_propose")
    history = read_json(args.told)["trials"] if args.told else []
    try:
        trials = propose(settings, args.search, args.round, history, args.journal)
    except ValueError as problem:
        sys.exit(str(problem))
    write_json(args.output, {"search": args.search, "round": args.round, "trials": trials})
    for trial in trials:
        print(f"[{args.search}] round {args.round}: trial {trial['number']} {trial['params']}")


if __name__ == "__main__":
    main()
