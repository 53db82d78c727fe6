"""Start a training script with one process per GPU: plain python for a single
process, `accelerate launch` for several; for a run over several nodes, one
launcher per node, all meeting at the first node of the SLURM job.

    python -m finetune.launch --processes 4 -- scripts/train.py --settings ...
    srun --nodes 2 --ntasks-per-node 1 python -m finetune.launch --processes 8 --nodes 2 -- scripts/train.py ...

Over several nodes everything comes from SLURM's environment: this node's rank
(SLURM_NODEID), the meeting host (the first host of SLURM_JOB_NODELIST) and the
port (derived from SLURM_JOB_ID, so that every node agrees on it without talking;
MASTER_ADDR and MASTER_PORT override them). accelerate then starts torchrun's
processes on each node. On a machine without GPUs set ACCELERATE_USE_CPU=true
(the processes then talk over gloo).
"""
import argparse
import os
import re
import socket
import sys


def first_host(nodelist):
    """The first host of a SLURM node list: 'gpu[003-005,010],cpu01' -> 'gpu003'."""
    match = re.match(r"([^,\[]+)(?:\[([^\],-]+))?", nodelist.strip())
    if not match:
        raise ValueError(f"cannot read a host from the SLURM node list {nodelist!r}")
    return match.group(1) + (match.group(2) or "")


def free_port():
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def rendezvous(nodes, environ):
    """(node rank, meeting host, port) of this node for a run over `nodes` nodes."""
    if nodes == 1:
        return 0, "127.0.0.1", int(environ.get("MASTER_PORT") or free_port())
    missing = [name for name in ("SLURM_JOB_ID", "SLURM_NODEID", "SLURM_JOB_NODELIST") if name not in environ]
    if missing:
        raise SystemExit(f"a run over {nodes} nodes starts one launcher per node under SLURM (srun), which sets "
                         f"{', '.join(missing)}; submit the workflow with a SLURM profile (see docs/slurm.md: several nodes)")
    if "SLURM_NNODES" in environ and int(environ["SLURM_NNODES"]) != nodes:
        raise SystemExit(f"the run asks for {nodes} nodes but this SLURM job step has {environ['SLURM_NNODES']}")
    host = environ.get("MASTER_ADDR") or first_host(environ["SLURM_JOB_NODELIST"])
    port = int(environ.get("MASTER_PORT") or 20000 + int(environ["SLURM_JOB_ID"]) % 20000)
    return int(environ["SLURM_NODEID"]), host, port


def launch_command(processes, nodes, script_and_args, environ):
    """The command that starts this node's share of the run's processes."""
    if processes <= 1 and nodes == 1:
        return [sys.executable, *script_and_args]
    node_rank, host, port = rendezvous(nodes, environ)
    per_node = max(processes, 1)
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
            "--num_processes", str(per_node * nodes), "--num_machines", str(nodes), "--machine_rank", str(node_rank),
            "--main_process_ip", host, "--main_process_port", str(port), "--dynamo_backend", "no",
            *script_and_args]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=1, help="processes on each node (its GPUs; 0 or 1: one)")
    parser.add_argument("--nodes", type=int, default=1, help="nodes the run spans (> 1: under SLURM, one launcher each)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- the training script and its arguments")
    args = parser.parse_args(argv)
    args.command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not args.command:
        parser.error("give the training script and its arguments after --")
    if args.nodes < 1:
        parser.error("--nodes must be at least 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    command = launch_command(args.processes, args.nodes, args.command, os.environ)
    sys.stdout.flush()
    os.execv(command[0], command)


if __name__ == "__main__":
    main()
