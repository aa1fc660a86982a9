"""One attempt of a Slurm batch job (`python -m mpigpt2.launch slurm -- [train flags]`, what
slurm/train.sbatch runs): flags and output directory, stale MPICH shared memory, the launcher
(srun with a PMI plugin that passes a probe, else mpiexec), the run with the USR1 warning passed
on, and the requeue when the ranks checkpointed (status 3). slurm/README.md has the rules.
"""

import argparse
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace

from mpigpt2.base.errors import EXIT_USAGE
from mpigpt2.base.watchdog import MPICH_SHM_KINDS, SHM_DIR
from mpigpt2.formats import checkpoint as ck
from mpigpt2.launch import find_mpiexec, flavour, mpiexec_cmd
from mpigpt2.options import parse_args

NOJOB = "nojob"  # SLURM_JOB_ID outside a job
PREEMPTED = 3  # the trainer's "checkpointed, requeue me"
UNSET = "\x01unset"  # a default the user's flags did not override
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
SHM_STEPS = 32  # job steps of one attempt whose segments are removed (probes, cleanup, run)
REQUEUE_WAIT = 30  # seconds to wait for Slurm to end this attempt after `scontrol requeue`
STOP_GRACE = 5  # seconds between SIGTERM and SIGKILL for a probe that does not answer

# The probe: rank 0 exits 7 if the ranks came up as separate 1-rank jobs (srun --mpi=none).
PROBE = ("import sys\nfrom mpi4py import MPI\nc = MPI.COMM_WORLD\nc.Barrier()\n"
         "sys.exit(0 if c.Get_size() == int(sys.argv[1]) else 7)")


def log(msg, err=False):
    """One line on stdout (stderr if err); os.write, since a signal handler may log too."""
    data = f"[train.sbatch {time.strftime('%Y-%m-%d %H:%M:%S')}] {msg}\n".encode()
    while data:
        data = data[os.write(2 if err else 1, data):]


def die(msg):
    log(f"error: {msg}", err=True)
    sys.exit(EXIT_USAGE)


@dataclass
class Settings:
    """What Slurm and the MPIGPT2_* variables say about this attempt."""
    job: str
    restart: int
    nodes: int
    ntasks: int
    threads: int
    max_restarts: int
    probe_timeout: float
    launcher: str  # auto | srun | mpiexec
    srun_mpi: str  # auto, or plugins separated by spaces or commas
    default_out: str
    dry_run: bool
    env: dict  # for every command started: the venv's bin first on PATH, threads per rank


def _get(environ, name, default):
    return environ.get(name) or default  # set but empty counts as unset


def _first(environ, *names):
    """The first of names that is set (Slurm versions differ in which they set), else None."""
    return next((name for name in names if environ.get(name)), None)


def _number(environ, name, default, kind=int):
    value = _get(environ, name, default)
    try:
        number = kind(value)
    except (TypeError, ValueError):
        number = -1
    if number < 0:
        die(f"{name} must be a number ≥ 0, not {value!r}")
    return number


def settings(environ, dry_run=False):
    """Settings from environ; a malformed value ends the job with one line and status 2."""
    launcher = _get(environ, "MPIGPT2_LAUNCHER", "auto")
    if launcher not in ("auto", "srun", "mpiexec"):
        die(f"MPIGPT2_LAUNCHER must be auto, srun or mpiexec, not '{launcher}'")
    job = _get(environ, "SLURM_JOB_ID", NOJOB)
    nodes = _number(environ, _first(environ, "SLURM_JOB_NUM_NODES", "SLURM_NNODES")
                    or "SLURM_JOB_NUM_NODES", 1)
    given = _first(environ, "SLURM_NTASKS", "SLURM_NPROCS")
    if given:
        ntasks = _number(environ, given, 1)
    else:  # read only when needed: it may be "2(x3)" on uneven allocations
        ntasks = nodes * _number(environ, "SLURM_NTASKS_PER_NODE", 1)
    runs = _get(environ, "MPIGPT2_RUNS",
                os.path.join(_get(environ, "SLURM_SUBMIT_DIR", os.getcwd()), "runs"))
    threads = _number(environ, "SLURM_CPUS_PER_TASK", 1)
    env = dict(environ)
    if environ.get("MPIGPT2_VENV") != "none":  # the venv's mpiexec and tools before the system's
        env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), environ.get("PATH", "")])
    env.update({var: str(threads) for var in THREAD_VARIABLES})
    return Settings(
        job=job, restart=_number(environ, "SLURM_RESTART_COUNT", 0), nodes=nodes, ntasks=ntasks,
        threads=threads,
        max_restarts=_number(environ, "MPIGPT2_MAX_RESTARTS", 20),
        probe_timeout=_number(environ, "MPIGPT2_PROBE_TIMEOUT", 20, float),
        launcher=launcher, srun_mpi=_get(environ, "MPIGPT2_SRUN_MPI", "auto"),
        default_out=_get(environ, "MPIGPT2_OUT", os.path.join(runs, job)),
        dry_run=dry_run or environ.get("MPIGPT2_DRY_RUN") == "1", env=env)


# -- training flags, output directory, resume ------------------------------------------------
def train_flags(s, argv):
    """(output directory, the trainer's argv, resume note): the script's defaults, then
    $MPIGPT2_ARGS, then argv, checked with the trainer's own parser (so that `--out-dir X`,
    `--out-dir=X` and abbreviations count as the trainer will see them)."""
    raw = s.env.get("MPIGPT2_ARGS", "")
    try:
        env_args = shlex.split(raw)
    except ValueError as e:
        die(f"MPIGPT2_ARGS cannot be split ({e}; unbalanced quotes?): {raw!r}")
    env_args = env_args[1:] if env_args[:1] == ["--"] else env_args
    argv = argv[1:] if argv[:1] == ["--"] else argv
    try:
        args = parse_args(["--out-dir", UNSET, "--resume", UNSET, *env_args, *argv])
    except SystemExit as e:  # argparse printed the usage error (or the help)
        code = e.code if isinstance(e.code, int) else EXIT_USAGE
        if code:
            log("the training flags were rejected (see above)", err=True)
        sys.exit(code)
    out = s.default_out if args.out_dir == UNSET else args.out_dir
    note = resume_note(args.resume, out, s.restart)
    flags = ["--out-dir", out, "--resume", "auto", "--threads", str(s.threads), *env_args, *argv]
    return out, flags + (["--resume", "auto"] if note else []), note


def done_step(path):
    """The step a complete checkpoint directory holds (its DONE marker), else None."""
    try:
        with open(os.path.join(path, ck.DONE)) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def resume_note(given, out, restart):
    """Why a user's --resume PATH gives way to the newest checkpoint in OUT ('' if it does not).

    Slurm hands the same flags to every requeued attempt: going back to PATH each time would
    undo the progress. So on a restart, and in a new job whose OUT is already past PATH, resume
    from OUT instead ('' = start fresh counts the same on a restart)."""
    if given in (UNSET, "auto"):
        return ""
    given_step = done_step(given) if given else None
    found = ck.complete(os.path.join(out, ck.SUBDIR))
    if not found:
        return ""
    step, path = found[-1]
    if restart > 0 and (given_step is None or step >= given_step):
        return (f"restart {restart}: resuming from the newest checkpoint in the output "
                f"directory ({path}, step {step}), not --resume {given!r} again")
    if given_step is not None and step > given_step:
        return (f"{path} (step {step}) is newer than --resume {given} (step {given_step}): "
                f"resuming from it (--resume auto)")
    return ""


def mpi(ntasks):
    """(flavour, mpiexec prefix) of the MPI mpi4py uses; ('unknown', []) without an mpiexec,
    since srun may still do."""
    try:
        return flavour(find_mpiexec()), mpiexec_cmd(ntasks)
    except SystemExit as e:
        os.write(2, f"{e}\n".encode())
        return "unknown", []


# -- stale MPICH shared memory ---------------------------------------------------------------
def fnv1a(text):
    """32-bit FNV-1a, the hash MPICH puts in its shared-memory names."""
    h = 2166136261
    for byte in text.encode():
        h = ((h ^ byte) * 16777619) & 0xFFFFFFFF
    return h


def remove_stale_shm(job, shm_dir=None):
    """Remove /dev/shm/mpich_{shm,vci}_<FNV-1a of "JOB.STEP">_* of this job id; the names
    removed. A requeued job keeps its id and numbers its steps from 0 again: after an unclean
    end, the new step's MPI_Init attaches to the old segment and hangs (measured)."""
    prefixes = tuple(f"mpich_{kind}_{fnv1a(f'{job}.{step}'):x}_"
                     for step in range(SHM_STEPS) for kind in MPICH_SHM_KINDS)
    shm_dir = shm_dir or SHM_DIR
    try:
        names = sorted(os.listdir(shm_dir))
    except OSError:
        return []
    removed = []
    for name in names:
        if name.startswith(prefixes):
            try:
                os.unlink(os.path.join(shm_dir, name))
                removed.append(name)
            except OSError:  # a directory, or gone already
                pass
    return removed


def clean_shm(s):
    """On this node always; on every node (one srun step) on a restart of a multi-node job.
    Before the probe: its own steps would hang on such a segment too."""
    remove_stale_shm(s.job)
    if s.restart > 0 and s.nodes > 1:
        code = f"from mpigpt2.slurmjob import remove_stale_shm; remove_stale_shm({s.job!r})"
        rc, _ = bounded(["srun", "--overlap", f"--nodes={s.nodes}", "--ntasks-per-node=1",
                         f"--ntasks={s.nodes}", "--cpus-per-task=1", "--mpi=none",
                         sys.executable, "-c", code], 60, s.env, capture=False)
        if rc != 0:
            log("warning: could not clean /dev/shm on every node")


# -- launcher: srun with a PMI plugin that works, else mpiexec in the allocation ---------------
def status(returncode):
    """A Popen returncode as a shell reports it (killed by signal N: 128 + N)."""
    return 128 - returncode if returncode < 0 else returncode


def bounded(cmd, timeout, env, capture=True):
    """Run cmd in a process group of its own, stopped (SIGTERM, then SIGKILL) after timeout
    seconds, as `timeout -k` would: (status, output); status 124 when it was stopped."""
    with tempfile.TemporaryFile() as out:  # a file, not a pipe: leftover children cannot block us
        where = {"stdout": out, "stderr": subprocess.STDOUT} if capture else {}
        try:
            p = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, start_new_session=True,
                                 **where)
        except OSError as e:
            return 127, str(e)
        try:
            rc = status(p.wait(timeout))
        except subprocess.TimeoutExpired:
            rc = 124
            for sig, wait in ((signal.SIGTERM, STOP_GRACE), (signal.SIGKILL, None)):
                try:
                    os.killpg(p.pid, sig)
                    p.wait(wait)
                    break
                except (OSError, subprocess.TimeoutExpired):
                    pass
        out.seek(0)
        return rc, out.read().decode(errors="replace")


def probe(plugin, s):
    """(works, outcome): whether `srun --mpi=PLUGIN` starts ranks that see each other. Listed
    plugins may still fail with this MPI (Debian's pmix cannot be loaded; --mpi=none starts 1-rank
    jobs). --overlap: the probe shares the CPUs with every other step, so it never waits for, or
    holds up, the real launch."""
    n, where = 1, ["--nodes=1"]
    if s.ntasks >= 2:
        n = 2
        if s.nodes >= 2:
            where = ["--nodes=2", "--ntasks-per-node=1"]
    t0 = time.monotonic()
    rc, out = bounded(["srun", "--overlap", f"--mpi={plugin}", *where, f"--ntasks={n}",
                       "--cpus-per-task=1", "--kill-on-bad-exit=1", sys.executable, "-c", PROBE,
                       str(n)], s.probe_timeout, s.env)
    if rc == 0:
        took = int(time.monotonic() - t0)
        return True, f"--mpi={plugin}: ok ({n} rank(s) started and met, {took} s)"
    if rc == 7:
        return False, (f"--mpi={plugin}: the ranks did not see each other (each was a 1-rank "
                       f"MPI job)")
    if rc in (124, 137):
        return False, f"--mpi={plugin}: no answer within {s.probe_timeout:g} s"
    tail = [line for line in out.splitlines() if line.strip()][-2:]
    return False, f"--mpi={plugin}: status {rc}: {' '.join(tail)}"


def candidates(s, kind):
    """(plugins to try in order, why none of them would be tried)."""
    if s.srun_mpi != "auto":
        return s.srun_mpi.replace(",", " ").split(), f"MPIGPT2_SRUN_MPI={s.srun_mpi}"
    # Open MPI 5 speaks PMIx only; MPICH (the pip wheel), Intel MPI, MVAPICH: PMI-2 (and PMIx
    # when built with it)
    wanted = ["pmix", "pmi2"] if kind == "openmpi" else ["pmi2", "pmix"]
    _, out = bounded(["srun", "--mpi=list"], s.probe_timeout, s.env)
    listed = re.findall(r"^[ \t]+([a-z0-9_]+)$", out, re.M)
    # all of them if the list could not be read
    return ([p for p in wanted if p in (listed or wanted)],
            f"srun --mpi=list offers none of: {' '.join(wanted)} (it lists: {' '.join(listed)})")


def choose_launcher(s, kind):
    """('srun', plugin) or ('mpiexec', ''), logging the probes and the reason for mpiexec;
    MPIGPT2_LAUNCHER=srun without a working plugin ends the job with status 2."""
    plugin, why, outcomes = "", "", []
    if s.launcher == "mpiexec":
        why = "MPIGPT2_LAUNCHER=mpiexec"
    elif s.job == NOJOB:
        why = "not inside a Slurm job"  # srun here would ask for an allocation of its own
    elif not shutil.which("srun", path=s.env.get("PATH")):
        why = "no srun on PATH"
    else:
        plugins, why = candidates(s, kind)
        if s.launcher == "srun" and s.srun_mpi != "auto":  # both set explicitly: trusted
            plugin = plugins[0] if plugins else ""
            outcomes = [f"--mpi={plugin}: as set (MPIGPT2_LAUNCHER=srun, MPIGPT2_SRUN_MPI), "
                        f"not probed"]
        else:
            for p in plugins:
                works, outcome = probe(p, s)
                outcomes.append(outcome)
                if works:
                    plugin = p
                    break
        if outcomes:
            log(f"srun plugin probe: {'; '.join(outcomes)}")
            why = "no srun --mpi plugin worked"
    if plugin:
        return "srun", plugin
    if s.launcher == "srun":
        die(f"MPIGPT2_LAUNCHER=srun, but srun is not usable: {why}; set MPIGPT2_SRUN_MPI, or "
            f"MPIGPT2_LAUNCHER=mpiexec")
    if s.launcher != "mpiexec":
        log(f"launcher mpiexec: {why}")
    return "mpiexec", ""


def launch_command(s, launcher, plugin, mpiexec, flags):
    """The command that starts the ranks."""
    train = [sys.executable, "-m", "mpigpt2.train", *flags]
    if launcher == "srun":
        # explicit -n/-c: not every Slurm version's srun takes --cpus-per-task from the batch job
        return ["srun", f"--mpi={plugin}", f"--ntasks={s.ntasks}", f"--cpus-per-task={s.threads}",
                "--kill-on-bad-exit=1", *train]
    if not mpiexec:
        die("no mpiexec found (set MPIEXEC) and srun is not usable")
    return [*mpiexec, *train]  # Hydra and Open MPI's mpirun read the allocation from Slurm


# -- run, forwarding the warning signal; requeue ---------------------------------------------
class Signals:
    """The signals this batch process gets. USR1 (Slurm's warning, `--signal=B:USR1@60`) is
    passed on to the launcher, which passes it to every rank: they checkpoint on the first one
    and exit at once on a second. SIGTERM (scancel, the time limit, our own requeue) reaches
    every step's tasks directly: it is only noted, neither forwarded (a second signal would make
    the ranks skip their checkpoint) nor followed by a requeue (that would undo a scancel)."""

    def __init__(self):
        self.warned = ""  # "USR1" once warned
        self.terminated = False
        self.child = None  # the launcher, once started
        self.launcher = "launcher"

    def install(self):
        signal.signal(signal.SIGUSR1, self._usr1)
        signal.signal(signal.SIGTERM, self._term)

    def _usr1(self, signum, frame):
        self.warned = "USR1"
        pid = self.child.pid if self.child else "not started yet"
        log(f"got SIGUSR1: forwarding it to the {self.launcher} (pid {pid})")
        self.forward()

    def _term(self, signum, frame):
        self.terminated = True
        log("got SIGTERM: Slurm is ending the job; the ranks get it directly")

    def forward(self):
        if self.child is not None:
            try:
                self.child.send_signal(signal.SIGUSR1)  # (a no-op once it has been reaped)
            except OSError:
                pass


def record(out, line):
    """One line in OUT/attempts.log: each start, end, skip and requeue of an attempt."""
    try:
        with open(os.path.join(out, "attempts.log"), "a") as f:
            f.write(f"{line} time={int(time.time())}\n")
    except OSError as e:  # a bookkeeping line: not worth failing the job for
        log(f"warning: cannot write {out}/attempts.log: {e.strerror}", err=True)


def run(cmd, s, sig, out):
    """Start the ranks and wait for them; their exit status."""
    if sig.warned:
        # warned during the set-up: the ranks would not be ready for it; go straight to the
        # requeue (the newest checkpoint is where the next attempt starts anyway)
        log("warned before the launch: not starting the ranks")
        record(out, f"skip restart={s.restart} signal={sig.warned}")
        return PREEMPTED
    record(out, f"start restart={s.restart} launcher={sig.launcher} ranks={s.ntasks}")
    try:
        sig.child = subprocess.Popen(cmd, env=s.env)
        if sig.warned:  # came while it was starting
            sig.forward()
        rc = status(sig.child.wait())  # (a signal handler runs inside; the wait goes on)
    except OSError as e:
        log(f"error: cannot start {cmd[0]}: {e}", err=True)
        rc = 127
    record(out, f"end restart={s.restart} rc={rc} signal={sig.warned or 'none'}"
                f"{',TERM' if sig.terminated else ''}")
    log(f"{sig.launcher} exited with status {rc}")
    return rc


def finish(rc, s, sig, out):
    """The job's exit status after the ranks' rc, requeueing the job when they checkpointed (3)
    or, after a warning, failed otherwise (not 2 = bad input): e.g. a warning that came before
    the ranks installed their handlers, or a second one that made them exit at once; --resume
    auto then continues from the newest complete checkpoint. Never after SIGTERM."""
    if sig.terminated:
        if rc == PREEMPTED:
            log(f"checkpointed after SIGTERM; not requeueing (Slurm is ending the job). To "
                f"continue: MPIGPT2_OUT={out} sbatch ... (same flags)")
        return rc
    if rc != PREEMPTED and not (sig.warned and rc not in (0, EXIT_USAGE)):
        return rc
    if s.job == NOJOB:
        log("not under Slurm: not requeueing")
        return PREEMPTED
    if s.restart >= s.max_restarts:
        log(f"restarted {s.restart} times (MPIGPT2_MAX_RESTARTS={s.max_restarts}): not requeueing")
        return PREEMPTED
    return requeue(s, out)


def requeue(s, out):
    """`scontrol requeue` this job; 0 once Slurm ends this attempt, PREEMPTED if it failed."""
    log(f"requeueing job {s.job} (restart {s.restart + 1} will resume from {out}/checkpoints)")
    record(out, f"requeue restart={s.restart}")
    try:
        requeued = subprocess.run(["scontrol", "requeue", s.job], env=s.env).returncode == 0
    except OSError:
        requeued = False
    if requeued:
        time.sleep(REQUEUE_WAIT)  # Slurm ends this attempt now ("CANCELLED ... DUE TO REQUEUE")
        return 0
    log(f"error: scontrol requeue {s.job} failed (job not requeueable? see slurm/README.md); "
        f"resubmit with MPIGPT2_OUT={out} to continue")
    return PREEMPTED


# -- a lost node: name it, wait until Slurm marks it down, requeue on the nodes left ------------
NODE_PROBE_TIMEOUT = 10  # seconds a node may take to run `true` before it counts as lost
DOWN_STATES = ("DOWN", "NOT_RESPONDING", "FAIL", "DRAIN")


def allocation_nodes(s):
    """The job's node names (`scontrol show hostnames` of SLURM_JOB_NODELIST), or []."""
    nodelist = s.env.get("SLURM_JOB_NODELIST", "")
    if not nodelist:
        return []
    rc, text = bounded(["scontrol", "show", "hostnames", nodelist], 30, s.env)
    return text.split() if rc == 0 else []


def lost_nodes(s, nodes):
    """The nodes among `nodes` that do not run a one-task step (`srun --overlap -w NODE true`)
    within NODE_PROBE_TIMEOUT: probed all at once, each bounded."""
    timeout = _number(s.env, "MPIGPT2_NODE_PROBE_TIMEOUT", NODE_PROBE_TIMEOUT, float)
    procs = {}
    for node in nodes:
        procs[node] = subprocess.Popen(
            ["srun", "--overlap", "-N1", "-n1", "--cpus-per-task=1", "--mpi=none", "-w", node,
             "true"], env=s.env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline, lost = time.time() + timeout, []
    for node, p in procs.items():
        try:
            ok = p.wait(max(0.1, deadline - time.time())) == 0
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            ok = False
        if not ok:
            lost.append(node)
    return lost


def ranks_on(out, nodes):
    """{node: [ranks]} from the attempt's config.json rank table (empty if unreadable)."""
    import json
    try:
        with open(os.path.join(out, "config.json"), encoding="utf-8") as f:
            table = json.load(f).get("ranks", [])
        return {n: [r["rank"] for r in table if r.get("host") == n] for n in nodes}
    except (OSError, ValueError, AttributeError, TypeError, KeyError):
        return {}


def wait_down(s, nodes):
    """Poll `scontrol show node` until Slurm has marked every lost node down (so the requeued
    job is not placed there), at most MPIGPT2_NODE_DOWN_WAIT seconds; True if it did."""
    bound = _number(s.env, "MPIGPT2_NODE_DOWN_WAIT", 600, float)
    deadline = time.time() + bound
    while True:
        states = {}
        for node in nodes:
            rc, text = bounded(["scontrol", "show", "node", "-o", node], 30, s.env)
            m = re.search(r"\bState=(\S+)", text) if rc == 0 else None
            states[node] = m.group(1) if m else "?"
        if all(any(d in st for d in DOWN_STATES) for st in states.values()):
            log(f"Slurm marks them {', '.join(f'{n} {st}' for n, st in states.items())}")
            return True
        if time.time() > deadline:
            log(f"warning: after {bound:.0f} s Slurm still shows {states}; requeueing anyway")
            return False
        time.sleep(1.0)


def shrink(s, alive):
    """Give the lost nodes back: `scontrol update JobId=J NodeList=ALIVE` shrinks a running job
    to the nodes that answer. Returns the Settings of the smaller allocation (its SLURM_*
    variables as Slurm's resize script would set them, and as many tasks per node as
    before), or None when Slurm refuses."""
    rc, text = bounded(["scontrol", "update", f"JobId={s.job}", f"NodeList={','.join(alive)}"],
                       30, s.env)
    if rc != 0:
        log(f"warning: Slurm would not shrink the job to {','.join(alive)}: {text.strip()}")
        return None
    rc, text = bounded(["scontrol", "show", "job", "-o", s.job], 30, s.env)
    m = re.search(r"\bNodeList=(\S+)", text) if rc == 0 else None
    nodelist = m.group(1) if m else ",".join(alive)
    n, per_node = len(alive), max(1, s.ntasks // max(1, s.nodes))
    env = dict(s.env)
    env.update(SLURM_JOB_NODELIST=nodelist, SLURM_NODELIST=nodelist, SLURM_JOB_NUM_NODES=str(n),
               SLURM_NNODES=str(n), SLURM_NTASKS=str(n * per_node), SLURM_NPROCS=str(n * per_node),
               SLURM_TASKS_PER_NODE=f"{per_node}(x{n})",
               SLURM_JOB_CPUS_PER_NODE=f"{per_node * s.threads}(x{n})")
    return replace(s, nodes=n, ntasks=n * per_node, env=env)


def after_node_loss(rc, s, sig, out, ran):
    """A failed multi-node attempt (not bad input, not after a warning or SIGTERM): when nodes
    of the allocation no longer answer, name them and the ranks they held and go on without
    them: shrink the job to the nodes left and launch again in it (--resume auto continues
    from the newest checkpoint under the smaller layout; docs in slurm/README.md), or, if
    Slurm will not shrink it, wait until Slurm marks them down and requeue. Returns None (no
    node lost), the Settings to launch again with, or the job's status."""
    if rc in (0, EXIT_USAGE, PREEMPTED) or sig.warned or sig.terminated or s.nodes < 2 \
            or s.job == NOJOB:
        return None
    nodes = allocation_nodes(s)
    lost = lost_nodes(s, nodes)
    if not lost:
        return None
    held = ranks_on(out, lost)
    what = "; ".join(f"{n} (ranks {', '.join(map(str, held[n]))})" if held.get(n) else n
                     for n in lost)
    alive = [n for n in nodes if n not in lost]
    log(f"lost node(s) {what}; {len(alive)} of the {len(nodes)} nodes still answer (the "
        f"attempt ran {ran:.0f} s)")
    record(out, f"lost restart={s.restart} nodes={','.join(lost)}")
    if s.restart >= s.max_restarts:
        log(f"restarted {s.restart} times (MPIGPT2_MAX_RESTARTS={s.max_restarts}): not going on")
        return rc
    smaller = shrink(s, alive) if alive else None
    if smaller is not None:
        log(f"shrank the job to {smaller.env['SLURM_JOB_NODELIST']}: launching {smaller.ntasks} "
            f"ranks there; they resume from {out}/checkpoints")
        record(out, f"shrink restart={s.restart} nodes={','.join(alive)} ranks={smaller.ntasks}")
        return replace(smaller, restart=s.restart + 1)
    wait_down(s, lost)
    return requeue(s, out)


def parse(argv):
    """(options, training flags): the options before the first `--`, the flags after it."""
    p = argparse.ArgumentParser(prog="python -m mpigpt2.launch slurm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true",
                   help="print the launch command and exit (as MPIGPT2_DRY_RUN=1)")
    argv = list(argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    return p.parse_args(argv[:cut]), argv[cut + 1:]


def main(argv=None):
    sig = Signals()
    sig.install()  # first: an unhandled USR1 would end the job as FAILED
    opts, argv = parse(sys.argv[1:] if argv is None else argv)
    s = settings(os.environ, opts.dry_run)
    kind, mpiexec = mpi(s.ntasks)
    out, flags, note = train_flags(s, argv)
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        die(f"cannot create {out}: {e.strerror}")
    if note:
        log(f"resume: {note}")
    while True:  # one attempt, and another on the nodes left after a node was lost
        if s.job != NOJOB and not s.dry_run:
            clean_shm(s)
        launcher, plugin = choose_launcher(s, kind)
        sig.launcher = launcher
        cmd = launch_command(s, launcher, plugin, mpiexec, flags)
        where = s.env.get("SLURM_JOB_NODELIST") or socket.gethostname()
        log(f"job {s.job} restart {s.restart} on {where}: {s.ntasks} ranks x {s.threads} "
            f"thread(s), launcher {launcher}{f' --mpi={plugin}' if plugin else ''}, MPI {kind}, "
            f"out {out}")
        log(f"command: {shlex.join(cmd)}")
        if s.dry_run:
            return 0
        if sig.terminated:  # Slurm ended the job during the set-up
            return 143
        t0 = time.time()
        rc = run(cmd, s, sig, out)
        after = after_node_loss(rc, s, sig, out, time.time() - t0)
        if after is None:
            return finish(rc, s, sig, out)
        if not isinstance(after, Settings):
            return after
        s = after


if __name__ == "__main__":
    sys.exit(main())
