"""The default workflow, every job submitted to a real SLURM controller through
snakemake-executor-plugin-slurm with a profile derived from profiles/slurm."""
import json
import re

import pytest
import yaml

from conftest import REPO
from slurm_cluster import Cluster, unavailable_reason
from workflow import copy_workflow, snakemake

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

reason = unavailable_reason()
if reason:
    pytest.skip(f"no SLURM here: {reason}", allow_module_level=True)
pytest.importorskip("snakemake_executor_plugin_slurm", reason="snakemake-executor-plugin-slurm is not installed")

SUBMITTED = re.compile(r"Job (\d+) has been submitted with SLURM jobid (\d+)")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = Cluster(tmp_path_factory.mktemp("slurm")).start()
    yield cluster
    cluster.stop()


def make_test_profile(workdir):
    """profiles/slurm, adapted to the test cluster: its partition, no accounts, and
    squeue for status (there is no slurmdbd here for sacct)."""
    profile = yaml.safe_load((REPO / "profiles/slurm/config.yaml").read_text())
    profile["default-resources"].update(slurm_partition="debug", mem_mb=1000, runtime=30, cpus_per_task=1)
    profile["default-resources"].pop("slurm_account")
    for rule, resources in profile["set-resources"].items():
        resources.update(mem_mb=min(resources.get("mem_mb", 1000), 1500), runtime=30)
        resources.pop("cpus_per_task", None)
        if "cpus_per_gpu" in resources:
            resources["cpus_per_gpu"] = 1
    profile.update({"slurm-no-account": True, "slurm-status-command": "squeue", "jobs": 4, "latency-wait": 5,
                    "slurm-init-seconds-before-status-checks": 2, "seconds-between-status-checks": 1})
    folder = workdir / "test-profile"
    folder.mkdir()
    (folder / "config.yaml").write_text(yaml.safe_dump(profile))
    return folder


def train_jobs(output):
    """Snakemake job id of each run's training job, from the job blocks Snakemake prints."""
    found = {}
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", output):
        if block.startswith("rule train:"):
            run = re.search(r"wildcards: run=(\S+)", block).group(1)
            found[run] = int(re.search(r"jobid: (\d+)", block).group(1))
    return found


def job_ids(output, rules):
    """Snakemake job ids of the jobs of these rules, from the job blocks Snakemake prints."""
    return [int(re.search(r"jobid: (\d+)", block).group(1))
            for block in re.split(r"\n(?=(?:local)?rule \w+:)", output)
            if re.match(r"rule (\w+):", block) and re.match(r"rule (\w+):", block).group(1) in rules]


# A job submitted to SLURM: any but the local rules (the target, and the printf jobs that write settings files).
SUBMITTED_RULE = r"^rule (?!all:|settings:|run_settings:|serving:)\w+:$"


def submissions(output):
    return {int(job): int(slurm_id) for job, slurm_id in SUBMITTED.findall(output)}


# A small sweep (no pretraining, one task file, one LoRA run on a GPU): every SLURM job
# waits for the plugin's status polling, whose interval grows while nothing finishes, so the DAG is kept shallow.
SLURM_CONFIG = """
base_models:
  tiny: {build_tiny: {corpus: corpus, vocab_size: 512, hidden_size: 32, num_layers: 1}}
datasets:
  corpus: {path: data/pretrain_corpus.jsonl, format: completion, split: train}
  word_tasks: {path: data/word_tasks.jsonl, format: alpaca}
eval: {num_samples: 4, max_new_tokens: 4}
run_defaults: {max_steps: 10, eval_every: 0, log_every: 5, max_length: 64, checkpoint_every: 0}
runs:
  lora-r16: {gpus: 1}
search:
  s: {space: {learning_rate: [0.001, 0.002]}, objective: {metric: loss, direction: minimize}, trials: 1, parallel: 1}
"""
# The jobs of a search's trial, which no plan shows before its round is proposed; each is a SLURM job whose
# Snakemake parses the workflow again and must know the trial as a run (rules/trials.smk: register_proposed_trials).
TRIAL_JOBS = ["train", "manifest", "evaluate", "report_run"]


def test_whole_workflow_runs_as_slurm_jobs_and_reruns_only_stale_ones(tmp_path, cluster):
    workdir = copy_workflow(tmp_path / "wf")
    (workdir / "slurm.yaml").write_text(SLURM_CONFIG)
    profile = make_test_profile(workdir)
    args = ["--profile", str(profile), "--configfile", "slurm.yaml", "--replace-workflow-config"]
    planned = snakemake(workdir, "-n", *args, env=cluster.env).stdout
    expected_jobs = len(re.findall(SUBMITTED_RULE, planned, flags=re.M))

    first = snakemake(workdir, *args, env=cluster.env, timeout=900)
    output = first.stdout + first.stderr
    jobs = submissions(output)
    assert len(jobs) == len(re.findall(SUBMITTED_RULE, output, flags=re.M)) >= expected_jobs, output[-3000:]
    trial = [block for block in re.split(r"\n(?=(?:local)?rule \w+:)", output)
             if block.startswith("rule ") and "wildcards: run=s-trial0" in block]
    assert sorted(re.match(r"rule (\w+):", block).group(1) for block in trial) == sorted(TRIAL_JOBS), \
        "the trial's jobs are SLURM jobs, like a run's"
    assert json.loads((workdir / "results/search/s/told-1.json").read_text())["trials"][0]["state"] == "COMPLETE"
    assert "localrule all:" in output and "localrule settings:" in output, \
        "the target rule and the jobs that write settings files run in Snakemake's process, the rest under SLURM"
    assert json.loads((workdir / "results/runs/lora-r16/eval.json").read_text())["tuned"]["loss"] > 0

    train = {run: jobs[job] for run, job in train_jobs(output).items()}
    assert "TresPerJob=gres:gpu:1" in cluster.scontrol_job(train["lora-r16"]), "gpus: 1 reached SLURM as one GPU"
    assert "s-trial0" in train, "the search's trial trained as a SLURM job"
    cpu_only = [jobs[job] for job in job_ids(output, ("validate", "tokenize", "build_tiny_model"))]
    assert cpu_only and not any("gres:gpu" in cluster.scontrol_job(slurm_id) for slurm_id in cpu_only), \
        "jobs that use no GPU ask for none"

    # An edit to code only evaluation imports (data edits are covered by dry runs elsewhere; every SLURM job
    # costs seconds of polling here): evaluation and what follows it are resubmitted, training is not.
    metrics = workdir / "finetune/evaluation/metrics.py"
    metrics.write_text(metrics.read_text() + "\n# an edit to the task metrics\n")
    stale = snakemake(workdir, "-n", *args, env=cluster.env).stdout
    stale_jobs = len(re.findall(SUBMITTED_RULE, stale, flags=re.M))
    second = snakemake(workdir, *args, env=cluster.env, timeout=900)
    resubmitted = submissions(second.stdout + second.stderr)
    # The plan counts the jobs after the search's tell; told the same results, Snakemake finds them up to date.
    assert stale_jobs - 2 <= len(resubmitted) <= stale_jobs < expected_jobs
    assert len(re.findall(r"^rule evaluate:$", second.stdout + second.stderr, flags=re.M)) == 2, \
        "lora-r16's evaluation and the trial's"
    assert "rule train:" not in second.stdout + second.stderr and "rule build_tiny_model:" not in second.stdout


TWO_NODE_CONFIG = """
base_models:
  tiny: {build_tiny: {corpus: corpus, vocab_size: 512, hidden_size: 32, num_layers: 2}}
datasets:
  corpus: {path: data/pretrain_corpus.jsonl, format: completion, split: train}
  word_tasks: {path: data/word_tasks.jsonl, format: alpaca}
eval: {num_samples: 4, max_new_tokens: 4}
run_defaults: {max_steps: 10, eval_every: 0, log_every: 5, max_length: 64, checkpoint_every: 5}
runs:
  lora-2nodes: {gpus: 1, nodes: 2, distributed: fsdp}
"""


def test_a_run_over_two_nodes_is_one_slurm_job_with_a_launcher_on_each_node(tmp_path, cluster):
    """nodes: 2 becomes one sbatch job over both nodes of the test cluster; srun starts
    finetune/launch.py on each, and they meet at the first node (CPU here: gloo). Both nodes
    are this machine under names that do not resolve, hence MASTER_ADDR (the launcher's
    override of the first host of SLURM_JOB_NODELIST, which is tested on its own)."""
    workdir = copy_workflow(tmp_path / "wf")
    (workdir / "nodes.yaml").write_text(TWO_NODE_CONFIG)
    config = ["--configfile", "nodes.yaml", "--replace-workflow-config"]
    snakemake(workdir, "--cores", "2", *config, "--omit-from", "train")
    profile = make_test_profile(workdir)
    env = {**cluster.env, "ACCELERATE_USE_CPU": "true", "MASTER_ADDR": "127.0.0.1"}
    result = snakemake(workdir, "--profile", str(profile), *config, "results/runs/lora-2nodes/train_summary.json",
                       env=env, timeout=600)
    output = result.stdout + result.stderr
    jobs = submissions(output)
    assert len(jobs) == 1, output[-3000:]
    job = cluster.scontrol_job(next(iter(jobs.values())))
    assert "NumNodes=2" in job and "NodeList=node[1-2]" in job, job
    summary = json.loads((workdir / "results/runs/lora-2nodes/train_summary.json").read_text())
    assert summary["processes"] == 2 and summary["distributed"] == "fsdp"
    log = (workdir / "results/logs/train/lora-2nodes.log").read_text()
    assert "2 process(es), FSDP" in log
    assert (workdir / "results/runs/lora-2nodes/trained/adapter_model.safetensors").exists()
