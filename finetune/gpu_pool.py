"""Run a command on GPUs of its own: claim N free devices from a lock-file pool,
set CUDA_VISIBLE_DEVICES to them, and exec the command.

Snakemake's `--resources gpu=N` only bounds how many GPUs jobs use at once; it
does not say which ones (Snakemake issue #281), so two concurrent 1-GPU jobs
would both land on GPU 0. Each device has a lock file; a claim is an flock on
it, held by the command's process until it exits (a crash or `kill -9`
releases it too). Under SLURM the job's devices are SLURM's business: the
command runs as it is.

    python -m finetune.gpu_pool --gpus 1 -- python scripts/train.py ...

The lock files live in --lock-dir, by default $SNAKEMAKE_GPU_LOCK_DIR or
/tmp/snakemake-gpu-locks, shared by every workflow on the machine.
"""
import argparse
import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path


def visible_devices():
    """Device ids this machine offers: CUDA_VISIBLE_DEVICES if set, else what nvidia-smi lists."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", "").strip():
        return [d.strip() for d in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()]
    try:
        listing = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in listing.splitlines() if line.strip()]


def try_claim(devices, count, lock_dir):
    """Open lock files holding flocks on `count` free devices, or None if not enough are free."""
    held = []
    for device in devices:
        lock = open(lock_dir / f"gpu{device}.lock", "a")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            continue
        held.append((device, lock))
        if len(held) == count:
            return held
    for _, lock in held:
        lock.close()
    return None


def claim(count, lock_dir, devices, poll_seconds=2.0, log=print):
    """Wait until `count` devices are free; return [(device, open lock file)]."""
    if count > len(devices):
        sys.exit(f"gpu_pool: {count} GPU(s) asked for, but this machine offers {len(devices)} "
                 f"({', '.join(devices) or 'none'})")
    lock_dir.mkdir(parents=True, exist_ok=True)
    waited = False
    while (held := try_claim(devices, count, lock_dir)) is None:
        if not waited:
            log(f"gpu_pool: waiting for {count} of GPUs {', '.join(devices)} to be free")
            waited = True
        time.sleep(poll_seconds)
    return held


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, required=True, help="devices to claim (0: hide all GPUs)")
    parser.add_argument("--lock-dir", type=Path,
                        default=Path(os.environ.get("SNAKEMAKE_GPU_LOCK_DIR", "/tmp/snakemake-gpu-locks")))
    parser.add_argument("--devices", default=None, help="comma-separated device ids (default: detect)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given")
    if "SLURM_JOB_ID" in os.environ:
        os.execvp(command[0], command)
    if args.gpus == 0:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        os.execvp(command[0], command)
    devices = args.devices.split(",") if args.devices else visible_devices()
    held = claim(args.gpus, args.lock_dir, devices, log=lambda message: print(message, file=sys.stderr, flush=True))
    for _, lock in held:
        os.set_inheritable(lock.fileno(), True)
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(device for device, _ in held)
    print(f"gpu_pool: CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']}", file=sys.stderr, flush=True)
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()
