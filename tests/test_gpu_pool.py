"""Local GPU assignment: concurrent jobs get distinct devices from the lock-file pool."""
import os
import signal
import subprocess
import sys
import time

POOL = [sys.executable, "-m", "finetune.gpu_pool"]
SHOW = [sys.executable, "-c", "import os, sys, time; print(os.environ['CUDA_VISIBLE_DEVICES'], flush=True); "
                              "time.sleep(float(sys.argv[1]))"]


def start(lock_dir, gpus, hold_seconds, env=None, devices="0,1"):
    return subprocess.Popen(POOL + ["--gpus", str(gpus), "--devices", devices, "--lock-dir", str(lock_dir), "--",
                                    *SHOW, str(hold_seconds)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


def test_concurrent_jobs_get_distinct_devices_and_a_third_waits(tmp_path):
    first, second = start(tmp_path, 1, 3), start(tmp_path, 1, 3)
    devices = {first.stdout.readline().strip(), second.stdout.readline().strip()}
    assert devices == {"0", "1"}
    began = time.time()
    third = start(tmp_path, 1, 0)
    assert third.stdout.readline().strip() in {"0", "1"}
    assert time.time() - began > 1.0, "the third job waited for a device to be released"
    assert "waiting for 1 of GPUs 0, 1" in third.communicate()[1]
    for job in (first, second):
        job.wait()


def test_a_killed_job_releases_its_device(tmp_path):
    holder = start(tmp_path, 2, 60)
    assert holder.stdout.readline().strip() == "0,1"
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    after = start(tmp_path, 2, 0)
    assert after.communicate(timeout=30)[0].strip() == "0,1"


def test_zero_gpus_hides_all_devices(tmp_path):
    job = start(tmp_path, 0, 0)
    assert job.communicate(timeout=30)[0] == "\n" and job.returncode == 0


def test_under_slurm_the_environment_is_left_alone(tmp_path):
    job = start(tmp_path, 1, 0, env={"SLURM_JOB_ID": "42", "CUDA_VISIBLE_DEVICES": "3"})
    assert job.communicate(timeout=30)[0].strip() == "3"


def test_asking_for_more_devices_than_exist_fails_clearly(tmp_path):
    job = start(tmp_path, 3, 0)
    _, err = job.communicate(timeout=30)
    assert job.returncode != 0 and "3 GPU(s) asked for, but this machine offers 2 (0, 1)" in err
