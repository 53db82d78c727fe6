"""A real SLURM cluster on this machine, for the SLURM tests: Debian's
slurm-wlm and munge, two nodes (two slurmd daemons on this host, `node1`
and `node2`, each with its own port) of 2 CPUs and a fake GPU (gres with
File=/dev/null) so that GPU jobs, and jobs over both nodes, are accepted. Started as root; its config goes
to /etc/slurm (where srun inside jobs looks for it; files that were there are
put back on stop), its state and logs to a temporary folder. Stopped by the
pids it started."""
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

SLURM_CONF = """\
ClusterName=local
GresTypes=gpu
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmUser=root
AuthType=auth/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool-%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
MpiDefault=none
MinJobAge=3600
NodeName=node1 NodeHostname={hostname} NodeAddr=127.0.0.1 Port={port_1} CPUs=2 RealMemory=8000 Gres=gpu:1 State=UNKNOWN
NodeName=node2 NodeHostname={hostname} NodeAddr=127.0.0.1 Port={port_2} CPUs=2 RealMemory=8000 Gres=gpu:1 State=UNKNOWN
PartitionName=debug Nodes=node1,node2 Default=YES MaxTime=INFINITE State=UP
"""
# Both nodes are this host. Their names do not resolve (jobs over both must be told MASTER_ADDR=127.0.0.1).
NODES = ("node1", "node2")
GRES_CONF = "".join(f"NodeName={node} Name=gpu Count=1 File=/dev/null\n" for node in NODES)


def unavailable_reason():
    if os.geteuid() != 0:
        return "starting slurmctld, slurmd and munged needs root"
    missing = [tool for tool in ("slurmctld", "slurmd", "munged", "sbatch", "squeue", "scontrol")
               if shutil.which(tool) is None]
    if missing:
        return f"not installed: {', '.join(missing)} (apt-get install slurm-wlm munge)"
    return None


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_munge(started):
    pid_file = Path("/run/munge/munged.pid")
    if pid_file.exists() and Path(f"/proc/{pid_file.read_text().strip()}").exists():
        return
    Path("/run/munge").mkdir(parents=True, exist_ok=True)
    shutil.chown("/run/munge", "munge", "munge")
    if not Path("/etc/munge/munge.key").exists():
        subprocess.run(["mungekey", "--create"], check=True)
        shutil.chown("/etc/munge/munge.key", "munge", "munge")
    subprocess.run(["su", "-s", "/bin/sh", "munge", "-c", "/usr/sbin/munged"], check=True)
    for _ in range(50):
        if pid_file.exists():
            started.append(int(pid_file.read_text().strip()))
            return
        time.sleep(0.1)
    raise RuntimeError("munged did not start")


CONFIG_DIR = Path("/etc/slurm")


class Cluster:
    def __init__(self, root):
        self.root = Path(root)
        self.env = dict(os.environ)
        self.saved_config = {}
        self.pids = []
        self.daemons = []

    def start(self, timeout=60):
        for folder in ("state", *(f"spool-{node}" for node in NODES)):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        CONFIG_DIR.mkdir(parents=True, exist_ok=True)
        config = {"slurm.conf": SLURM_CONF.format(root=self.root, hostname=socket.gethostname(),
                                                  ctld_port=free_port(), port_1=free_port(),
                                                  port_2=free_port()),
                  "gres.conf": GRES_CONF}
        for name, text in config.items():
            path = CONFIG_DIR / name
            self.saved_config[name] = path.read_text() if path.exists() else None
            path.write_text(text)
        start_munge(self.pids)
        for command in (["slurmctld", "-D", "-i"], *(["slurmd", "-D", "-N", node] for node in NODES)):
            log = open(self.root / f"{command[0]}-{command[-1]}.out", "w")
            self.daemons.append(subprocess.Popen(command, env=self.env, stdout=log, stderr=log))
        deadline = time.time() + timeout
        while time.time() < deadline:
            state = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=self.env, capture_output=True, text=True)
            if sorted(state.stdout.split()) == ["idle"] * len(NODES):
                return self
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"SLURM did not come up: {(self.root / 'slurmctld.log').read_text()[-2000:]}")

    def scontrol_job(self, job_id):
        return subprocess.run(["scontrol", "show", "job", str(job_id)], env=self.env, capture_output=True,
                              text=True).stdout

    def stop(self):
        """Stop the daemons this cluster started, by their pids."""
        for daemon in reversed(self.daemons):
            daemon.terminate()
            try:
                daemon.wait(timeout=15)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
        for pid in self.pids:  # munged, which daemonizes itself
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for name, text in self.saved_config.items():
            if text is None:
                (CONFIG_DIR / name).unlink(missing_ok=True)
            else:
                (CONFIG_DIR / name).write_text(text)
