# What a finished workflow prints last: each run's held-out exact match, overall
# and per task, beside its base model's (the full tables are in the reports).
import json
import os


def print_exact_match():
    lines, records = [], set()
    for name in RUNS:
        path = f"results/runs/{name}/eval.json"
        if not os.path.exists(path):
            continue
        with open(path) as f:
            result = json.load(f)
        tuned, base = result["tuned"], result["base"]
        if tuned.get("exact_match") is None:
            continue
        records.add(result["eval_records"])
        tasks = ", ".join(f"{task} {value:.2f}" for task, value in tuned.get("exact_match_by_task", {}).items())
        lines.append(f"  {name}: {tuned['exact_match']:.3f} (base {base['exact_match']:.3f})"
                     + (f"; per task: {tasks}" if tasks else ""))
    if lines:
        print(f"Held-out exact match ({'/'.join(map(str, sorted(records)))} records; "
              "results/report/sweep.html has the tables):",
              *lines, sep="\n")
