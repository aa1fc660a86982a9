"""A throw-away single-node Slurm cluster on localhost, for tests (Debian's Slurm 22.05 + munge).

`SlurmCluster(root).start()` installs the packages if missing (apt, as root), starts `munged`
with its own key and socket, writes a `slurm.conf` whose every path is under root, starts
`slurmctld` and `slurmd`, and waits until the node is idle; `stop()` cancels the jobs and ends
every process it started. All daemons, and the jobs through sbatch's exported environment,
carry MARKER=root in their environment: `stop()` and a watchdog process (which acts if the test
process dies without tearing down, e.g. killed by a timeout) end exactly those processes.

Nothing here touches /etc: the cluster is reached through `SLURM_CONF` (see `env()`).
"""

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MARKER = "MPIGPT2_TEST_SLURM"
PACKAGES = {"slurmctld": "slurmctld", "slurmd": "slurmd", "sbatch": "slurm-client",
            "munged": "munge"}
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
            "BOOT_FAIL", "DEADLINE", "PREEMPTED", "SPECIAL_EXIT"}


class Unavailable(Exception):
    """Slurm cannot be installed here (not root, no apt); the caller decides: skip or fail."""


def tool(name):
    for d in ("/usr/sbin", "/usr/bin", "/sbin", "/bin"):
        if os.access(os.path.join(d, name), os.X_OK):
            return os.path.join(d, name)
    return shutil.which(name)


def ensure_installed(log=print, timeout=240):
    """apt-get install what is missing (apt-get update only when the install needs it)."""
    missing = sorted({pkg for exe, pkg in PACKAGES.items() if not tool(exe)})
    if not missing:
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise Unavailable(f"Slurm packages {missing} are missing and cannot be installed here "
                          f"(needs root and apt-get)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", "-o", "DPkg::Lock::Timeout=300", *missing]
    log(f"installing {' '.join(missing)}")
    r = subprocess.run(install, env=env, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:  # most often: no package lists yet on a fresh machine
        u = subprocess.run(["apt-get", "update", "-q", "-o", "DPkg::Lock::Timeout=300"],
                           env=env, capture_output=True, text=True, timeout=timeout)
        r = subprocess.run(install, env=env, capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"apt-get install {missing} failed:\n{u.stdout[-2000:]}"
                               f"{u.stderr[-2000:]}\n{r.stdout[-3000:]}{r.stderr[-3000:]}")
    still = [exe for exe in PACKAGES if not tool(exe)]
    if still:
        raise RuntimeError(f"after apt-get install, still missing: {still}")


def free_ports(n):
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def marked_pids(marker_value):
    """Processes whose environment has MARKER=marker_value (not this process)."""
    want = f"{MARKER}={marker_value}".encode()
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            with open(f"/proc/{d}/environ", "rb") as f:
                if want in f.read().split(b"\0"):
                    out.append(int(d))
        except OSError:
            pass
    return out


def kill_marked(marker_value, grace=3.0):
    """SIGTERM, then SIGKILL, every process carrying the marker; returns how many there were."""
    pids = marked_pids(marker_value)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in pids:
            try:
                os.kill(p, sig)
            except OSError:
                pass
        deadline = time.time() + grace
        while time.time() < deadline:
            pids = [p for p in pids if _alive(p)]
            if not pids:
                return 0
            time.sleep(0.1)
    return len(pids)


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"  # a zombie has exited
    except OSError:
        return False


def fnv1a(text):
    h = 2166136261
    for c in text.encode():
        h = ((h ^ c) * 16777619) & 0xFFFFFFFF
    return h


def remove_mpich_shm(job_ids, steps=32):
    """Shared memory that killed MPICH ranks of these jobs left: mpich_{shm,vci}_<FNV-1a of
    "JOBID.STEPID">_<node> in /dev/shm (what train.sbatch removes before a restart)."""
    prefixes = {f"mpich_{kind}_{fnv1a(f'{j}.{s}'):x}_" for j in job_ids for s in range(steps)
                for kind in ("shm", "vci")}
    try:
        names = os.listdir("/dev/shm")
    except OSError:
        return
    for name in names:
        if any(name.startswith(p) for p in prefixes):
            try:
                os.unlink(os.path.join("/dev/shm", name))
            except OSError:
                pass


# The watchdog: a separate interpreter that ends the marked processes when the test process
# is gone (pytest-timeout's thread method calls os._exit, which skips every teardown).
WATCHDOG = r"""
import os, sys, time
sys.path.insert(0, sys.argv[3])
from slurm_cluster import kill_marked
parent, marker = int(sys.argv[1]), sys.argv[2]
while True:
    try:
        os.kill(parent, 0)
    except OSError:
        break
    if os.getppid() != parent:
        break
    time.sleep(0.5)
kill_marked(marker)
"""


class SlurmCluster:
    def __init__(self, root, cpus=8, log=print):
        self.root = Path(root)
        self.cpus = cpus
        self.log = log
        self.procs = {}
        self.jobs = []
        self.watchdog = None
        if len(str(self.root / "munge" / "munge.socket.2")) > 100:  # AF_UNIX path limit
            raise ValueError(f"{root}: path too long for a unix socket")
        self.conf = self.root / "slurm.conf"
        self.marker = str(self.root)
        self.nodes = ["localhost"]  # the slurmd node names

    # -- environment for daemons and clients ----------------------------------------------------
    def env(self, extra=None):
        """os.environ without any outer Slurm job's variables, pointed at this cluster."""
        e = {k: v for k, v in os.environ.items()
             if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "MPIGPT2_"))
             or k == "MPIGPT2_TEXT"}
        e.update(SLURM_CONF=str(self.conf), **{MARKER: self.marker})
        e.update(extra or {})
        return e

    def run(self, *cmd, timeout=60, check=True, env=None):
        r = subprocess.run([str(c) for c in cmd], env=self.env(env), capture_output=True,
                           text=True, timeout=timeout, start_new_session=True)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({r.returncode}):\n"
                               f"{r.stdout}{r.stderr}")
        return r

    # -- start / stop ---------------------------------------------------------------------------------
    def start(self, timeout=90):
        ensure_installed(self.log)
        for d in ("munge", "state", "spool", "log", "run"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o700)
        self._start_watchdog()
        try:
            self._start_munge()
            self._write_conf()
            self._daemon("slurmctld", [tool("slurmctld"), "-D", "-f", self.conf])
            self._daemon("slurmd", [tool("slurmd"), "-D", "-f", self.conf, "-N", "localhost"])
            self._wait_idle(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_watchdog(self):
        self.watchdog = subprocess.Popen(
            [sys.executable, "-c", WATCHDOG, str(os.getpid()), self.marker,
             str(Path(__file__).parent)], start_new_session=True,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def _daemon(self, name, cmd):
        out = open(self.root / "log" / f"{name}.out", "wb")
        self.procs[name] = subprocess.Popen(
            [str(c) for c in cmd], env=self.env(), stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True, cwd=self.root)
        out.close()

    def _start_munge(self):
        key = self.root / "munge" / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        os.chmod(key, 0o600)
        sock = self.root / "munge" / "munge.socket.2"
        self._daemon("munged", [
            tool("munged"), "--foreground", "--force", f"--socket={sock}", f"--key-file={key}",
            f"--pid-file={self.root / 'munge' / 'munged.pid'}",
            f"--seed-file={self.root / 'munge' / 'munged.seed'}",
            f"--log-file={self.root / 'log' / 'munged.log'}"])
        deadline = time.time() + 20
        while time.time() < deadline:
            self._check_alive()
            if sock.exists():
                r = subprocess.run(f"munge -n -S {sock} | unmunge -S {sock}", shell=True,
                                   capture_output=True, text=True, timeout=10)
                if r.returncode == 0:
                    return
            time.sleep(0.1)
        raise RuntimeError("munged did not come up:\n" + self.logs())

    def _write_conf(self, title="a single-node cluster", host="localhost", per_node="",
                    nodes=None, extra=""):
        """slurm.conf with every path under root; nodes: NodeName lines (default: this one
        node on localhost); per_node: "%n" where each node needs its own spool, pid and log
        files (several slurmds on one machine)."""
        ctld_port, d_port = free_ports(2)
        r = self.root
        n = "." + per_node if per_node else ""
        nodes = nodes or {"localhost": "127.0.0.1"}
        node_lines = "".join(f"NodeName={name} NodeAddr={addr} CPUs={self.cpus} State=UNKNOWN\n"
                             for name, addr in nodes.items())
        self.conf.write_text(f"""\
# generated by tests/{type(self).__module__}.py: {title}, every path under {r}
ClusterName=mpigpt2test
# job ids differ between test sessions: MPICH names its shared memory after JOBID.STEPID
FirstJobId={secrets.randbelow(50_000_000) + 1_000_000}
SlurmctldHost={host}
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued job may start only this many seconds (+1) later (default 120)
AuthInfo=socket={r}/munge/munge.socket.2,cred_expire=5
SlurmUser=root
SlurmdUser=root
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool{'/' + per_node if per_node else ''}
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd{n}.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd{n}.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
SchedulerParameters=bf_interval=1,sched_interval=1
MpiDefault=none
ReturnToService=2
KillWait=5
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MailProg=/bin/true
{extra}{node_lines}PartitionName=test Nodes={','.join(nodes)} Default=YES MaxTime=INFINITE State=UP
""")

    def _check_alive(self):
        for name, p in self.procs.items():
            if p.poll() is not None:
                raise RuntimeError(f"{name} exited with status {p.returncode}:\n" + self.logs())

    def _wait_idle(self, timeout):
        deadline = time.time() + timeout
        state = ""
        while time.time() < deadline:
            self._check_alive()
            r = self.run("sinfo", "-h", "-N", "-o", "%N %T", check=False, timeout=20)
            state = r.stdout.strip()
            if r.returncode == 0 and sorted(state.splitlines()) == sorted(
                    f"{n} idle" for n in self.nodes):
                return
            time.sleep(0.3)
        raise RuntimeError(f"the node is not idle after {timeout}s (sinfo: {state!r}):\n"
                           + self.logs())

    def stop(self):
        """Cancel all jobs, stop the daemons, end every marked process (jobs included)."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            try:
                self.run("scancel", "--user", str(os.getuid()), check=False, timeout=20)
                deadline = time.time() + 15
                while time.time() < deadline:
                    r = self.run("squeue", "-h", "-o", "%i", check=False, timeout=20)
                    if r.returncode != 0 or not r.stdout.strip():
                        break
                    time.sleep(0.3)
            except (subprocess.TimeoutExpired, OSError):
                pass
        for name in ("slurmd", "slurmctld", "munged"):
            p = self.procs.pop(name, None)
            if p is None:
                continue
            for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
                try:
                    os.killpg(p.pid, sig)
                except OSError:
                    pass
                try:
                    p.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    pass
        left = kill_marked(self.marker)
        if not left:
            remove_mpich_shm(self.jobs)
        if self.watchdog is not None:
            self.watchdog.kill()
            self.watchdog.wait()
            self.watchdog = None
        if left:
            raise RuntimeError(f"{left} processes of the test cluster could not be ended")

    # -- jobs -------------------------------------------------------------------------------------------
    def submit(self, *args, env=None):
        """sbatch --parsable ARGS...; the job id."""
        r = self.run("sbatch", "--parsable", *args, env=env)
        job_id = int(r.stdout.strip().split(";")[0])
        self.jobs.append(job_id)
        return job_id

    def job(self, job_id):
        """`scontrol show job -o` as a dict (JobState, Restarts, ExitCode, ...)."""
        r = self.run("scontrol", "show", "job", "-o", str(job_id), timeout=20)
        return dict(re.findall(r"(\w+)=(\S*)", r.stdout))

    def wait_finished(self, job_id, timeout):
        """Poll until the job has finished for good (a requeued job goes back to PENDING)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            self._check_alive()
            info = self.job(job_id)
            if info.get("JobState") in FINISHED:
                return info
            time.sleep(0.3)
        raise TimeoutError(f"job {job_id} not finished after {timeout}s: {self.job(job_id)}")

    def logs(self, tail=40):
        out = []
        for f in sorted((self.root / "log").glob("*")):
            lines = f.read_text(errors="replace").splitlines()[-tail:]
            out.append(f"--- {f.name}\n" + "\n".join(lines))
        return "\n".join(out)


def serve(request, make, prefix, refused=(Unavailable,)):
    """The body of a module fixture: make(root) a cluster in a fresh short directory (munged's
    unix socket lives there), start it and yield it; stop it at the end and remove the
    directory unless a test failed (then its logs stay). A cluster this machine cannot run
    (`refused`) skips the tests, except in CI, where it fails them."""
    import pytest
    root = Path(tempfile.mkdtemp(prefix=prefix))
    failed = request.session.testsfailed
    cluster = make(root)
    try:
        cluster.start()
    except refused as e:
        shutil.rmtree(root, ignore_errors=True)
        if os.environ.get("CI"):  # CI runs as root with apt: never skip there
            raise
        pytest.skip(str(e))
    try:
        yield cluster
    finally:
        cluster.stop()
        if request.session.testsfailed == failed:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"[slurm] cluster state and logs kept in {root}")
