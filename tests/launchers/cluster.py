"""Real multi-node infrastructure on one machine for the launcher tests: a local SLURM (own munged,
slurmctld and one slurmd per node) and two network namespaces joined by a veth.

Everything started here is stopped by its pid (never by name); daemons and namespaces carry unique
names so that parallel sessions on the same machine do not collide.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "distributed"))
import launch  # noqa: E402  (tests/distributed/launch.py: env, free ports, identical shards)

RECIPE = REPO / "recipes" / "tiny_cpu.yaml"
# Tiny, fast and comparable across world sizes: identical samples, no FLOPs loss (its square of a
# global mean is not additive over micro-batches), no validation, one loader worker.
COMMON = ["data.workers=1", "data.shuffle_buffer=0", "data.batch_size=2", "validation.every_steps=1000",
          "log.tensorboard=false", "dynamic.complete_warmup_steps=1", "dynamic.target_hold_steps=0",
          "dynamic.target_warmup_steps=2", "dynamic.flops_loss_weight=0", "checkpoint.keep=5"]


def launch_env(**extra: str) -> dict[str, str]:
    """launch.env() plus the venv's bin on PATH (launchers call `deepspeed`/`torchrun` by name)."""
    env = launch.env()
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def start(command: list[str], log: Path, env: dict[str, str], timeout_s: int = 150, prefix: list[str] = ()) -> subprocess.Popen:
    """Start `command` under a hard `timeout`, output to `log`, in its own session."""
    handle = open(log, "w")
    return subprocess.Popen([*prefix, "timeout", "-k", "5", str(timeout_s), *command], cwd=REPO, env=env,
                            stdout=handle, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(process: subprocess.Popen, log: Path, timeout_s: float = 170) -> int:
    """Wait for `process`; a failure shows the log's tail."""
    try:
        return process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)
        process.wait(timeout=10)
        raise AssertionError(f"{log.name}: still running after {timeout_s} s:\n{tail(log)}")


def tail(log: Path, n: int = 3000) -> str:
    text = log.read_text(errors="replace").replace("\r", "\n")
    return "\n".join(line for line in text.splitlines() if not line.startswith("train:"))[-n:]


def rank_pid(root: int, rank: int) -> int | None:
    """The pid of training rank `rank` below process `root` (the rank, not its data-loader workers)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    todo, found = [root], None
    while todo:
        pid = todo.pop()
        try:
            cmd = (Path(f"/proc/{pid}/cmdline").read_bytes()).split(b"\0")
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"dydit_scale.train" in cmd and f"RANK={rank}".encode() in environ:
            return pid  # the topmost trainer process is the rank; its children are loader workers
        todo.extend(children.get(pid, []))
    return found


def wait_for(predicate, timeout_s: float, what: str, process: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        if process is not None and process.poll() is not None:
            raise AssertionError(f"exited (rc {process.returncode}) before {what}:\n{tail(log) if log else ''}")
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}:\n{tail(log) if log else ''}")


SLURM_PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def slurm_missing() -> str | None:
    """Why a local SLURM cannot be started here, or None."""
    for tool in ("slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel", "munged"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            return (f"{tool} not installed (apt-get install -y --no-install-recommends {' '.join(SLURM_PACKAGES)}; "
                    ".ci/run does it as root)")
    if os.geteuid() != 0:
        return "a local SLURM with SlurmUser=root needs root"
    if not Path("/etc/munge/munge.key").is_file():
        return "no /etc/munge/munge.key (the munge package creates it)"
    return None


def _wait_for(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


class LocalSlurm:
    """A SLURM cluster of `nodes` nodes (n1, n2, ...) on 127.0.0.1, all state under `root`."""

    def __init__(self, root: Path, nodes: int = 2):
        self.root, self.nodes = root, nodes
        self.conf = root / "slurm.conf"
        self.names = [f"n{i + 1}" for i in range(nodes)]
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.pid_files: list[Path] = []

    def run(self, *command: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        out = subprocess.run(list(command), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and out.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed (rc {out.returncode}): {out.stderr.strip()}")
        return out

    def start(self) -> LocalSlurm:
        root = self.root
        for sub in ("state", "log", *[f"spool/{n}" for n in self.names]):
            (root / sub).mkdir(parents=True, exist_ok=True)
        # Our own munged on a private socket (other sessions may run theirs on the default one).
        socket_path = root / "munge.sock"
        munged = shutil.which("munged") or "/usr/sbin/munged"
        subprocess.run([munged, "--force", f"--socket={socket_path}", f"--pid-file={root / 'munged.pid'}",
                        f"--log-file={root / 'log/munged.log'}", f"--seed-file={root / 'munge.seed'}",
                        "--key-file=/etc/munge/munge.key"], check=True, timeout=30, capture_output=True)
        self.pid_files.append(root / "munged.pid")
        _wait_for(lambda: socket_path.exists(), 10, "munged")
        hardware = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout.split("\n")[0]
        fields = [f for f in hardware.split() if f.split("=")[0] in
                  ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore")]
        host = socket.gethostname().split(".")[0]
        ctld_port = free_port()
        lines = [
            f"ClusterName=dydit{uuid.uuid4().hex[:6]}", f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}", "SlurmUser=root", "SlurmdUser=root", "AuthType=auth/munge",
            # cred_expire also holds a requeued job back (default 120 s) until its revoked credential has
            # expired on the nodes; forcing it to start sooner races that ("Job 1 already killed").
            "CredType=cred/munge", f"AuthInfo=socket={socket_path},cred_expire=10",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none", "MpiDefault=none", "MailProg=/bin/true",
            "SchedulerParameters=batch_sched_delay=0", "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
            "ReturnToService=2", "JobRequeue=1", "KillWait=10", "MinJobAge=600",
            f"StateSaveLocation={root / 'state'}", f"SlurmdSpoolDir={root / 'spool'}/%n",
            f"SlurmctldPidFile={root / 'slurmctld.pid'}", f"SlurmdPidFile={root / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={root / 'log/slurmctld.log'}", f"SlurmdLogFile={root / 'log/slurmd-%n.log'}",
        ]
        for name in self.names:
            lines.append(f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={free_port()} "
                         f"{' '.join(fields)} State=UNKNOWN")
        lines.append("PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")
        subprocess.run(["slurmctld", "-i", "-f", str(self.conf)], env=self.env, check=True, timeout=30)
        self.pid_files.append(root / "slurmctld.pid")
        _wait_for(lambda: self.run("scontrol", "ping", check=False).returncode == 0, 20, "slurmctld")
        for name in self.names:
            subprocess.run(["slurmd", "-N", name, "-f", str(self.conf)], env=self.env, check=True, timeout=30)
            self.pid_files.append(root / f"slurmd-{name}.pid")
        _wait_for(lambda: self.idle_nodes() >= self.nodes, 30, f"{self.nodes} idle SLURM nodes")
        return self

    def idle_nodes(self) -> int:
        out = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout.split("\n")
        return sum(1 for line in out if line.split()[-1:] in (["idle"], ["idle*"]) and not line.endswith("*"))

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` fields (JobState, ExitCode, Restarts, ...)."""
        out = self.run("scontrol", "show", "job", "-o", job_id, check=False).stdout
        return dict(f.split("=", 1) for f in out.split() if "=" in f)

    def daemon_logs(self, lines: int = 15) -> str:
        """The last lines of slurmctld's and each slurmd's log, for failure messages."""
        return "\n".join(f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
                         for log in sorted((self.root / "log").glob("slurm*.log")))

    def _our_processes(self) -> list[int]:
        """Job step daemons (slurmstepd) and job processes that our slurmd started: they carry our SLURM_CONF."""
        marker = f"SLURM_CONF={self.conf}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                try:
                    if marker in (entry / "environ").read_bytes().split(b"\0"):
                        found.append(int(entry.name))
                except OSError:
                    pass
        return found

    def stop(self) -> None:
        """Cancel jobs, SIGTERM every daemon we started (by pid file) and what they started, then SIGKILL."""
        jobs = self.run("squeue", "-h", "-o", "%i", check=False).stdout.split() if self.conf.exists() else []
        for job in jobs:
            self.run("scancel", job, check=False)
        if jobs:
            try:
                _wait_for(lambda: not self.run("squeue", "-h", check=False).stdout.strip(), 20, "jobs to end")
            except (TimeoutError, subprocess.SubprocessError):
                pass
        daemons = [p for p in (_read_pid(f) for f in reversed(self.pid_files)) if p]
        pids = daemons + [p for p in self._our_processes() if p not in daemons]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.time() + 10
        for pid in pids:
            while time.time() < deadline and Path(f"/proc/{pid}").exists():
                time.sleep(0.1)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


class NetnsPair:
    """Two network namespaces joined by a veth pair: node 0 at 10.x.y.1, node 1 at 10.x.y.2."""

    def __init__(self):
        tag = uuid.uuid4().hex[:6]
        self.names = [f"dyd{tag}a", f"dyd{tag}b"]
        self.ifaces = [f"vd{tag}a", f"vd{tag}b"]
        octet = int(tag[:2], 16) % 250 + 2
        self.addrs = [f"10.213.{octet}.1", f"10.213.{octet}.2"]
        self.made: list[str] = []

    def start(self) -> NetnsPair:
        def ip(*args: str) -> None:
            subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)

        for ns in self.names:
            ip("netns", "add", ns)
            self.made.append(ns)
        ip("link", "add", self.ifaces[0], "netns", self.names[0], "type", "veth", "peer", "name", self.ifaces[1],
           "netns", self.names[1])
        for ns, iface, addr in zip(self.names, self.ifaces, self.addrs):
            ip("-n", ns, "addr", "add", f"{addr}/24", "dev", iface)
            ip("-n", ns, "link", "set", iface, "up")
            ip("-n", ns, "link", "set", "lo", "up")
        return self

    def prefix(self, node: int) -> list[str]:
        return ["ip", "netns", "exec", self.names[node]]

    def stop(self) -> None:
        for ns in self.made:  # deleting a namespace removes its end of the veth, and so the pair
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True, timeout=10)
        self.made = []
