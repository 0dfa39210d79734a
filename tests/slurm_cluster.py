"""A throw-away single-node SLURM cluster on localhost, for the system tests in tests/test_slurm.py.

Debian's ``slurm-wlm`` and ``munge`` packages (``.ci/run`` installs them) give the daemons; :func:`start`
writes a fresh munge key and a ``slurm.conf`` (one node with this machine's cores, one partition ``cpu`` as
in workflow/profiles/slurm), starts ``munged``, ``slurmctld`` and ``slurmd`` in the foreground as child
processes, and waits until the node is idle; :meth:`Cluster.stop` cancels what is left on the cluster and
stops exactly the processes :func:`start` started. Every state, spool, log and socket file lives under the
given folder, with one exception: ``slurm.conf`` itself goes to ``/etc/slurm/slurm.conf``, where the client
commands and job steps look for it (the Snakemake job-step plugin drops ``SLURM_CONF`` from a job step's
environment). :func:`start` refuses to overwrite a ``slurm.conf`` it did not write, and ``stop`` removes it.

The cluster has no accounting database (``sacct`` needs slurmdbd), so Snakemake's SLURM executor queries
job states with ``squeue`` (``--slurm-status-command squeue``). It needs root: slurmd runs every job as its
submitting user.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from conftest import free_port

CONF = Path("/etc/slurm/slurm.conf")
MARK = "# written by perturbkit tests/slurm_cluster.py"
PARTITION = "cpu"  # the partition workflow/profiles/slurm submits to
SBIN = ("/usr/sbin", "/usr/bin", "/sbin")


class Unavailable(RuntimeError):
    """SLURM cannot be started here (missing packages, not root, a foreign slurm.conf)."""


def find(name: str) -> str | None:
    """A SLURM/munge program on PATH or in /usr/sbin (daemons are not on a normal user's PATH)."""
    return shutil.which(name) or next((f"{d}/{name}" for d in SBIN if os.access(f"{d}/{name}", os.X_OK)), None)


def mem_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 4096


def slurm_conf(root: Path, node: str, cpus: int, ports: tuple[int, int]) -> str:
    return f"""{MARK} for {root}; removed when the test cluster stops
ClusterName=perturbkit-test
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ports[0]}
SlurmdPort={ports[1]}
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge.socket
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
# no cgroups (containers), no accounting database: squeue reports job states (MinJobAge keeps finished jobs)
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MinJobAge=600
KillWait=5
SchedulerType=sched/backfill
# cores are what jobs consume; memory requests are only checked against the node's size
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem_mb()} State=UNKNOWN
PartitionName={PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


@dataclass
class Cluster:
    root: Path
    cpus: int
    procs: list[subprocess.Popen] = field(default_factory=list)

    def run(self, *cmd: str, check: bool = True) -> str:
        """A SLURM client command (``squeue``, ``scancel``, ``sbatch``, ...); its stdout."""
        res = subprocess.run([find(cmd[0]) or cmd[0], *cmd[1:]], capture_output=True, text=True, timeout=60)
        if check and res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip()}")
        return res.stdout

    def jobs(self, *fmt_args: str) -> list[list[str]]:
        """Every job the controller still knows (finished ones included): ``id|state|comment|name`` rows."""
        out = self.run("squeue", "--states=all", "--noheader", "--format=%i|%T|%k|%j", *fmt_args)
        return [line.split("|") for line in out.splitlines() if line.strip()]

    def logs(self) -> str:
        tails = []
        for log in sorted((self.root / "log").glob("*.log")):
            tails.append(f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:]))
        return "\n".join(tails)

    def stop(self) -> None:
        """Cancel every job left on the cluster, stop the daemons this cluster started, remove slurm.conf."""
        if self.procs and self.procs[-1].poll() is None:
            self.run("scancel", "--full", f"--partition={PARTITION}", check=False)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and any(
                    s in ("RUNNING", "COMPLETING", "PENDING") for _, s, *_ in self.jobs()):
                time.sleep(0.5)
        for proc in reversed(self.procs):  # slurmd, slurmctld, munged
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
        self.procs.clear()
        if CONF.is_file() and CONF.read_text().startswith(f"{MARK} for {self.root};"):
            CONF.unlink()


def start(root: str | Path, timeout: float = 60) -> Cluster:
    """Bring up munged, slurmctld and slurmd with their files under ``root``; return the running cluster.

    Raises :class:`Unavailable` when this machine cannot host it, RuntimeError (with the daemons' logs) when
    the node does not come up within ``timeout`` seconds.
    """
    progs = {name: find(name) for name in ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "sinfo")}
    missing = [name for name, path in progs.items() if path is None]
    if missing:
        raise Unavailable(f"SLURM/munge programs not found ({', '.join(missing)}); install Debian's `slurm-wlm` "
                          "and `munge` packages (.ci/run does)")
    if os.geteuid() != 0:
        raise Unavailable("the single-node SLURM test cluster needs root (slurmd runs jobs as their user, and "
                          f"{CONF} must be written)")
    if CONF.exists() and not CONF.read_text().startswith(MARK):
        raise Unavailable(f"{CONF} exists and was not written by tests/slurm_cluster.py; not starting a test "
                          "cluster over a configured SLURM")
    root = Path(root).resolve()
    for sub in ("state", "spool", "log"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    key = root / "munge.key"
    key.write_bytes(secrets.token_bytes(1024))
    key.chmod(0o600)
    node = socket.gethostname().split(".")[0]
    cpus = os.cpu_count() or 1
    CONF.parent.mkdir(parents=True, exist_ok=True)
    CONF.write_text(slurm_conf(root, node, cpus, (free_port(), free_port())))
    cluster = Cluster(root, cpus)
    daemons = (
        [progs["munged"], "--foreground", "--force", f"--key-file={key}", f"--socket={root}/munge.socket",
         f"--pid-file={root}/munged.pid", f"--log-file={root}/log/munged.log", f"--seed-file={root}/munged.seed"],
        [progs["slurmctld"], "-D", "-f", str(CONF)],
        [progs["slurmd"], "-D", "-N", node, "-f", str(CONF)],
    )
    try:
        for i, cmd in enumerate(daemons):
            with open(root / "log" / f"{Path(cmd[0]).name}.out", "wb") as out:
                cluster.procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                                      stdin=subprocess.DEVNULL, start_new_session=True))
            if i == 0:  # the daemons authenticate through munge: wait for its socket
                wait_for(lambda: (root / "munge.socket").exists(), 10, cluster, "munged")
        wait_for(lambda: cluster.run("sinfo", "--noheader", "--format=%T", check=False).strip() == "idle",
                 timeout, cluster, "the SLURM node")
    except BaseException:
        cluster.stop()
        raise
    return cluster


def wait_for(ready, timeout: float, cluster: Cluster, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        dead = [p.args[0] for p in cluster.procs if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not come up ({'exited: ' + ', '.join(dead) if dead else 'timeout'}):\n"
                               + cluster.logs())
        time.sleep(0.2)

