"""Run a search trial's training so that its failure is a result: the search tells the study the trial
failed and goes on, instead of the workflow stopping.

    python -m finetune.search.guard --log L --trained D --metrics M --summary S --samples P --tensorboard T -- CMD...

When CMD exits with an error, its outputs are written as a failed trial's (the trained folder holds
trial_failed.json with the error, train_summary.json says failed) and the guard exits 0; evaluation then
writes a failed eval.json without loading anything. When CMD is killed by a signal (a killed job, a
cluster's time limit) the guard fails like it: the job reruns and resumes from its checkpoint.
"""
import argparse
import json
import signal
import subprocess
import sys
from pathlib import Path

from finetune.files import atomic_path, write_json

FAILED = "trial_failed.json"  # in the trained folder of a failed trial


def last_error(log, lines=3):
    """The last lines of the job's log that say what went wrong (a traceback's last line first)."""
    if not log or not Path(log).exists():
        return "training failed (no log)"
    text = [line.strip() for line in Path(log).read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in text if "Error" in line or "error:" in line or line.startswith("[")]
    return " | ".join((errors or text)[-lines:])[-1000:] or "training failed"


def write_failure(args, exit_code):
    failure = {"error": last_error(args.log), "exit_code": exit_code}
    with atomic_path(args.trained) as partial:
        partial.mkdir(parents=True)
        (partial / FAILED).write_text(json.dumps(failure, indent=1) + "\n")
    for path in (args.metrics, args.samples):
        if not path.exists():
            path.write_text("")
    args.tensorboard.mkdir(parents=True, exist_ok=True)
    write_json(args.summary, {"failed": failure, "stop_reason": "failed"})
    return failure


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in ("trained", "metrics", "summary", "samples", "tensorboard"):
        parser.add_argument(f"--{name}", type=Path, required=True, help=f"the training job's {name} output")
    parser.add_argument("--log", type=Path, default=None, help="the job's log (the error is read from it)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- the training command")
    args = parser.parse_args(argv)
    args.command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not args.command:
        parser.error("give the training command after --")
    return args


def main(argv=None):
    args = parse_args(argv)
    process, signals = subprocess.Popen(args.command), []

    def forward(number, frame):
        signals.append(number)
        process.send_signal(number)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    code = process.wait()
    if code == 0:
        return 0
    if code < 0 or signals:  # killed: the job fails and reruns (resuming from its checkpoint)
        number = -code if code < 0 else signals[0]
        print(f"training was stopped by signal {number}: not a result of the trial", file=sys.stderr)
        return 128 + number
    failure = write_failure(args, code)
    print(f"the trial failed (exit code {code}): {failure['error']}; told as failed, the search goes on",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
