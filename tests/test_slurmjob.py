"""mpigpt2/slurmjob.py (what slurm/train.sbatch runs) without Slurm: fake srun, scontrol and
mpiexec scripts on PATH, fake checkpoint and /dev/shm directories, Slurm's variables set by hand.
tests/test_slurm.py runs the same code on a real Slurm."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from mpigpt2 import launch, slurmjob

JOB = "999999999"  # no real job has it: the one run that touches /dev/shm removes nothing real
VENV_BIN = os.path.dirname(sys.executable)

# srun's stand-in: logs its arguments to $FAKE_LOG; `--mpi=list` lists $FAKE_LIST; a probe
# step behaves as $FAKE_<plugin> says (default: a plugin that cannot be loaded)
FAKE_SRUN = r"""#!/bin/bash
a="$*"
echo "${a//$'\n'/ }" >> "$FAKE_LOG"  # one line per call (the probe's code has several)
if [ "$1" = --mpi=list ]; then
    echo "MPI plugin types are..."
    for p in $FAKE_LIST; do printf '\t%s\n' "$p"; done
    echo "specific pmix plugin versions available: pmix_v4"
    exit 0
fi
for a in "$@"; do
    case $a in --mpi=*) plugin=${a#--mpi=} ;; --ntasks=*) n=${a#--ntasks=} ;; esac
done
how=FAKE_$plugin
case ${!how:-broken} in
    ok) exit 0 ;;
    mpi) exec "$FAKE_MPIEXEC" -launcher fork -n "$n" "${@: -4}" ;;  # the probe's n ranks, really
    alone) exec "${@: -4}" ;;  # one 1-rank MPI job, as --mpi=none gives
    hang) trap '' TERM; sleep 60 & echo $! > "$FAKE_LOG.pid"; wait ;;
    fail) exit 1 ;;
    *) echo "srun: error: MPI: Unable to load any plugin" >&2
       echo "srun: error: cannot create step" >&2; exit 1 ;;
esac
"""

# mpiexec's stand-in for whole runs: answers --version as Hydra; otherwise logs its arguments
# and thread variables, says it is ready, and exits 3 on USR1 or TERM (as the ranks would after
# a checkpoint), logging each signal it gets
FAKE_MPIEXEC = r"""#!/bin/bash
if [ "$1" = --version ]; then echo "HYDRA build details:"; exit 0; fi
echo "args $*" >> "$FAKE_LOG"
echo "threads $OMP_NUM_THREADS $OPENBLAS_NUM_THREADS $MKL_NUM_THREADS" >> "$FAKE_LOG"
trap 'echo "got USR1" >> "$FAKE_LOG"; exit 3' USR1
trap 'echo "got TERM" >> "$FAKE_LOG"; exit 3' TERM
touch "$FAKE_LOG.ready"
while :; do sleep 0.05; done
"""

# scontrol's stand-in: logs its arguments; exits $FAKE_SCONTROL_RC; with FAKE_SCONTROL_KILL=1
# it ends its caller with SIGKILL, as Slurm ends the attempt that requeued itself
FAKE_SCONTROL = r"""#!/bin/bash
echo "$*" >> "$FAKE_LOG.scontrol"
if [ "${FAKE_SCONTROL_KILL:-}" = 1 ]; then kill -KILL $PPID; fi
exit "${FAKE_SCONTROL_RC:-0}"
"""


def script(path, text):
    path.write_text(text)
    path.chmod(0o755)
    return path


@pytest.fixture
def fake(tmp_path):
    """A bin directory with srun, scontrol and mpiexec stand-ins, and their log."""
    d = tmp_path / "bin"
    d.mkdir()
    script(d / "srun", FAKE_SRUN)
    script(d / "scontrol", FAKE_SCONTROL)
    script(d / "mpiexec", FAKE_MPIEXEC)
    return d


def environ(fake, **extra):
    """A batch job's environment: job JOB, 1 node x 4 tasks, the fakes first on PATH."""
    env = {"PATH": f"{fake}:/usr/bin:/bin", "FAKE_LOG": str(fake / "log"),
           "FAKE_LIST": "none pmi2 cray_shasta pmix", "SLURM_JOB_ID": JOB,
           "SLURM_JOB_NUM_NODES": "1", "SLURM_NTASKS": "4", "SLURM_CPUS_PER_TASK": "1",
           "SLURM_SUBMIT_DIR": str(fake.parent),
           # kept: the subprocesses then import the same mpigpt2 as this test (e.g. a mutant)
           "PYTHONPATH": os.environ.get("PYTHONPATH")}
    env.update(extra)
    return {k: v for k, v in env.items() if v is not None}


def calls(fake, suffix=""):
    f = fake / f"log{suffix}"
    return f.read_text().splitlines() if f.exists() else []


def stdout_lines(capfd):
    out, err = capfd.readouterr()
    return out.splitlines(), err.splitlines()


def one_error_line(capfd, *words):
    out, err = stdout_lines(capfd)
    assert len(err) == 1 and "] error: " in err[0], err
    assert err[0].startswith("[train.sbatch "), err
    for w in words:
        assert w in err[0], err


# -- the environment -------------------------------------------------------------------------
def test_settings_read_slurm_and_mpigpt2_variables(fake):
    s = slurmjob.settings(environ(fake, SLURM_NTASKS=None, SLURM_JOB_NUM_NODES="2",
                                  SLURM_NTASKS_PER_NODE="3", SLURM_CPUS_PER_TASK="2",
                                  SLURM_RESTART_COUNT="4", MPIGPT2_LAUNCHER=""))
    assert (s.job, s.nodes, s.ntasks, s.threads, s.restart) == (JOB, 2, 6, 2, 4)
    assert (s.launcher, s.srun_mpi, s.max_restarts, s.probe_timeout) == ("auto", "auto", 20, 20)
    assert s.default_out == str(fake.parent / "runs" / JOB) and not s.dry_run
    assert s.env["PATH"].split(os.pathsep)[:2] == [VENV_BIN, str(fake)]
    assert [s.env[v] for v in slurmjob.THREAD_VARIABLES] == ["2", "2", "2"]
    s = slurmjob.settings(environ(fake, MPIGPT2_RUNS="/r", MPIGPT2_VENV="none",
                                  MPIGPT2_DRY_RUN="1"))
    assert s.default_out == f"/r/{JOB}" and s.ntasks == 4 and s.dry_run
    assert s.env["PATH"] == f"{fake}:/usr/bin:/bin"  # 'none': PATH as it is
    s = slurmjob.settings(environ(fake, MPIGPT2_RUNS="/r", MPIGPT2_OUT="/o", SLURM_JOB_ID=None))
    assert s.default_out == "/o" and s.job == "nojob"


@pytest.mark.parametrize("name,value", [
    ("MPIGPT2_LAUNCHER", "slurm"), ("MPIGPT2_MAX_RESTARTS", "many"),
    ("MPIGPT2_PROBE_TIMEOUT", "-1"), ("SLURM_NTASKS", "2(x3)"),
    ("SLURM_CPUS_PER_TASK", "1.5")])
def test_bad_environment_is_one_line_and_status_2(fake, capfd, name, value):
    with pytest.raises(SystemExit) as e:
        slurmjob.settings(environ(fake, **{name: value}))
    assert e.value.code == 2
    one_error_line(capfd, name, repr(value))


@pytest.mark.parametrize("extra,argv,last", [
    ({"MPIGPT2_ARGS": "--steps '5"}, [], "error: MPIGPT2_ARGS cannot be split (No closing "
                                         "quotation; unbalanced quotes?): \"--steps '5\""),
    ({}, ["--pp", "2", "--no-such-flag"], "the training flags were rejected (see above)"),
    ({"MPIGPT2_MAX_RESTARTS": "x"}, [], "error: MPIGPT2_MAX_RESTARTS must be a number ≥ 0, "
                                        "not 'x'")])
def test_bad_input_through_the_launcher_writes_nothing(fake, tmp_path, extra, argv, last):
    env = environ(fake, MPIGPT2_LAUNCHER="mpiexec", MPIEXEC=str(fake / "mpiexec"), **extra)
    r = subprocess.run([sys.executable, "-m", "mpigpt2.launch", "slurm", "--", *argv], env=env,
                       cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stdout == "", r
    assert r.stderr.splitlines()[-1].endswith(f"] {last}"), r.stderr
    if argv:  # the trainer's parser said why, just before
        assert r.stderr.splitlines()[-2].endswith("unrecognized arguments: --no-such-flag")
    assert not (tmp_path / "runs").exists() and calls(fake) == [], r.stderr


# -- flags, output directory, resume ---------------------------------------------------------
def test_flags_order_and_the_output_directory(fake, monkeypatch):
    env = environ(fake, MPIGPT2_ARGS="-- --steps 5 --val-data '' --train-data '/d/my tok/*.bin'")
    out, flags, note = slurmjob.train_flags(slurmjob.settings(env), ["--", "--pp", "2"])
    default = str(fake.parent / "runs" / JOB)
    assert out == default and note == ""
    assert flags == ["--out-dir", default, "--resume", "auto", "--threads", "1", "--steps", "5",
                     "--val-data", "", "--train-data", "/d/my tok/*.bin", "--pp", "2"]
    # the user's --out-dir (any spelling the trainer takes) wins over MPIGPT2_OUT and the default
    for argv in (["--out-dir=mine"], ["--out-dir", "mine"], ["--out", "mine"]):
        s = slurmjob.settings(environ(fake, MPIGPT2_OUT="/o"))
        out, flags, _ = slurmjob.train_flags(s, argv)
        assert out == "mine" and flags[:2] == ["--out-dir", "mine"] and flags[6:] == argv
    out, _, _ = slurmjob.train_flags(slurmjob.settings(environ(fake, MPIGPT2_OUT="/o")), [])
    assert out == "/o"


def checkpoint(root, step, done=True):
    d = root / f"step_{step:08d}"
    d.mkdir(parents=True)
    if done:
        (d / "DONE").write_text(f"{step}\n")
    return d


def test_resume_names_the_newest_complete_checkpoint(tmp_path, fake):
    out = tmp_path / "out"
    ck = out / "checkpoints"
    for step in (4, 9, 10):
        checkpoint(ck, step)
    checkpoint(ck, 12, done=False)  # being written when the job was stopped: never counts
    (ck / "step_junk").mkdir()
    (ck / ".step_00000014.tmp").mkdir()
    given = checkpoint(tmp_path / "other", 2)
    s = slurmjob.settings(environ(fake, SLURM_RESTART_COUNT="1"))
    _, flags, note = slurmjob.train_flags(s, ["--out-dir", str(out), "--resume", str(given)])
    assert f"({ck / 'step_00000010'}, step 10)" in note and note.startswith("restart 1: "), note
    assert flags[-4:] == ["--resume", str(given), "--resume", "auto"]  # the last one wins


@pytest.mark.parametrize("restart,given,newest,expect", [
    (0, 2, None, ""), (1, 2, None, ""),                    # nothing in OUT yet: the user's
    (1, 2, 6, "restart 1: resuming from the newest checkpoint"),
    (1, 8, 2, ""),                                         # OUT not yet at PATH's step
    (1, 8, 8, "restart 1: resuming from the newest checkpoint"),
    (0, 2, 6, "(step 6) is newer than --resume"),          # a resubmission of the same flags
    (0, 8, 6, ""), (0, 6, 6, ""),
    (1, "", 4, "restart 1: resuming"), (0, "", 4, ""),     # '' = start fresh
    (1, "incomplete", 4, "restart 1: resuming"), (0, "incomplete", 4, ""),
    (3, "auto", 4, "")])
def test_when_a_users_resume_path_gives_way(tmp_path, restart, given, newest, expect):
    out = tmp_path / "out"
    if newest is not None:
        checkpoint(out / "checkpoints", newest)
    if isinstance(given, int):
        given = str(checkpoint(tmp_path / "theirs", given))
    elif given == "incomplete":
        given = str(checkpoint(tmp_path / "theirs", 9, done=False))
    note = slurmjob.resume_note(given, str(out), restart)
    assert expect in note and bool(note) == bool(expect), note


# -- stale MPICH shared memory ---------------------------------------------------------------
def test_fnv1a_is_the_standard_32_bit_hash():
    assert [slurmjob.fnv1a(t) for t in ("", "a", "foobar")] == \
        [0x811c9dc5, 0xe40c292c, 0xbf9cf968]


def test_shm_cleanup_removes_only_this_jobs_segments(tmp_path):
    shm = tmp_path / "shm"
    shm.mkdir()
    h = {step: f"{slurmjob.fnv1a(f'4242.{step}'):x}" for step in (0, 3, 31)}
    assert h[0] == "cf702ff3"  # FNV-1a of "4242.0"
    ours = ["mpich_shm_cf702ff3_node1", "mpich_vci_cf702ff3_node1",
            f"mpich_shm_{h[3]}_node2", f"mpich_vci_{h[31]}_x"]
    others = [f"mpich_shm_{slurmjob.fnv1a('4243.0'):x}_node1",  # another job
              f"mpich_shm_{slurmjob.fnv1a('14242.0'):x}_node1",
              "mpich_shm_cf702ff3", "mpich_shm_cf702ff30_node1",  # not that segment's name
              "mpich_other_cf702ff3_node1", "psm2_shm.cf702ff3", "my_data"]
    for name in ours + others:
        (shm / name).write_text("x")
    (shm / "mpich_shm_cf702ff3_dir").mkdir()  # rm -f left directories alone too
    assert slurmjob.remove_stale_shm("4242", str(shm)) == sorted(ours)
    assert sorted(os.listdir(shm)) == sorted(others + ["mpich_shm_cf702ff3_dir"])
    assert slurmjob.remove_stale_shm("4242", str(tmp_path / "none")) == []


@pytest.mark.parametrize("restart,nodes,srun_rc,on_every_node", [
    (0, 2, 0, False), (1, 1, 0, False), (1, 3, 0, True), (2, 2, 1, True)])
def test_shm_cleanup_on_every_node_on_multi_node_restarts(fake, tmp_path, monkeypatch, capfd,
                                                         restart, nodes, srun_rc, on_every_node):
    shm = tmp_path / "shm"
    shm.mkdir()
    (shm / f"mpich_shm_{slurmjob.fnv1a(f'{JOB}.0'):x}_n").write_text("x")
    monkeypatch.setattr(slurmjob, "SHM_DIR", str(shm))
    s = slurmjob.settings(environ(fake, SLURM_RESTART_COUNT=str(restart),
                                  SLURM_JOB_NUM_NODES=str(nodes),
                                  FAKE_none="ok" if srun_rc == 0 else "fail"))
    slurmjob.clean_shm(s)
    assert os.listdir(shm) == []  # this node: always
    srun = calls(fake)
    if not on_every_node:
        assert srun == []
        return
    assert len(srun) == 1 and srun[0].startswith(
        f"--overlap --nodes={nodes} --ntasks-per-node=1 --ntasks={nodes} --cpus-per-task=1 "
        f"--mpi=none {sys.executable} -c "), srun
    assert f"remove_stale_shm('{JOB}')" in srun[0], srun
    out, _ = stdout_lines(capfd)
    assert any("could not clean /dev/shm on every node" in x for x in out) == (srun_rc != 0)


# -- the launcher ----------------------------------------------------------------------------
def probes(fake):
    return [c.split()[1] for c in calls(fake) if c.startswith("--overlap --mpi=")]


def test_auto_takes_pmi2_first_for_mpich(fake, capfd):
    s = slurmjob.settings(environ(fake, FAKE_pmi2="ok", FAKE_pmix="ok"))
    assert slurmjob.choose_launcher(s, "mpich") == ("srun", "pmi2")
    assert calls(fake)[0] == "--mpi=list" and probes(fake) == ["--mpi=pmi2"]
    assert calls(fake)[1].startswith("--overlap --mpi=pmi2 --nodes=1 --ntasks=2 "
                                     "--cpus-per-task=1 --kill-on-bad-exit=1 "), calls(fake)
    out, _ = stdout_lines(capfd)
    assert len(out) == 1 and "] srun plugin probe: --mpi=pmi2: ok (2 rank(s) started and met, " \
        in out[0], out


def test_auto_takes_pmix_first_for_open_mpi(fake, capfd):
    s = slurmjob.settings(environ(fake, FAKE_pmi2="ok", FAKE_pmix="ok"))
    assert slurmjob.choose_launcher(s, "openmpi") == ("srun", "pmix")
    assert probes(fake) == ["--mpi=pmix"]


def test_a_plugin_that_starts_lone_ranks_or_fails_falls_back_to_mpiexec(fake, capfd):
    # --mpi=none-like: the real probe code, run as a 1-rank MPI job, must notice
    s = slurmjob.settings(environ(fake, FAKE_pmi2="alone"))  # pmix: cannot be loaded
    assert slurmjob.choose_launcher(s, "mpich") == ("mpiexec", "")
    assert probes(fake) == ["--mpi=pmi2", "--mpi=pmix"]
    out, _ = stdout_lines(capfd)
    assert out[0].endswith("srun plugin probe: --mpi=pmi2: the ranks did not see each other "
                           "(each was a 1-rank MPI job); --mpi=pmix: status 1: srun: error: "
                           "MPI: Unable to load any plugin srun: error: cannot create step"), out
    assert out[1].endswith("] launcher mpiexec: no srun --mpi plugin worked"), out


def test_the_probe_meets_with_two_real_ranks_across_nodes(fake, capfd):
    s = slurmjob.settings(environ(fake, FAKE_pmi2="mpi", SLURM_JOB_NUM_NODES="2",
                                  FAKE_MPIEXEC=os.path.join(VENV_BIN, "mpiexec")))
    assert slurmjob.choose_launcher(s, "mpich") == ("srun", "pmi2")
    assert "--mpi=pmi2 --nodes=2 --ntasks-per-node=1 --ntasks=2 " in calls(fake)[1], calls(fake)
    s = slurmjob.settings(environ(fake, FAKE_pmi2="mpi", SLURM_NTASKS="1",
                                  FAKE_MPIEXEC=os.path.join(VENV_BIN, "mpiexec")))
    assert slurmjob.choose_launcher(s, "mpich") == ("srun", "pmi2")  # a 1-rank job: 1 rank
    assert "--mpi=pmi2 --nodes=1 --ntasks=1 " in calls(fake)[-1], calls(fake)


def test_a_probe_that_hangs_is_stopped(fake, capfd, monkeypatch):
    monkeypatch.setattr(slurmjob, "STOP_GRACE", 0.5)
    s = slurmjob.settings(environ(fake, FAKE_pmi2="hang", FAKE_pmix="ok",
                                  MPIGPT2_PROBE_TIMEOUT="1"))
    t0 = time.monotonic()
    assert slurmjob.choose_launcher(s, "mpich") == ("srun", "pmix")
    assert time.monotonic() - t0 < 10
    out, _ = stdout_lines(capfd)
    assert "--mpi=pmi2: no answer within 1 s; --mpi=pmix: ok" in out[0], out
    # the probe's whole process group went, also what ignored SIGTERM
    pid = int((fake / "log.pid").read_text())
    deadline = time.monotonic() + 5
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        assert not alive(pid)
    finally:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def test_only_listed_plugins_are_probed(fake, capfd):
    s = slurmjob.settings(environ(fake, FAKE_LIST="none pmix", FAKE_pmi2="ok", FAKE_pmix="ok"))
    assert slurmjob.choose_launcher(s, "mpich") == ("srun", "pmix")
    assert probes(fake) == ["--mpi=pmix"]
    (fake / "log").unlink()
    s = slurmjob.settings(environ(fake, FAKE_LIST="none cray_shasta", FAKE_pmi2="ok"))
    assert slurmjob.choose_launcher(s, "mpich") == ("mpiexec", "")
    assert probes(fake) == []
    out, _ = stdout_lines(capfd)
    assert out[-1].endswith("] launcher mpiexec: srun --mpi=list offers none of: pmi2 pmix "
                            "(it lists: none cray_shasta)"), out


def test_plugins_from_the_environment_in_their_order(fake, capfd):
    s = slurmjob.settings(environ(fake, MPIGPT2_SRUN_MPI="pmix,none", FAKE_none="ok"))
    assert slurmjob.choose_launcher(s, "mpich") == ("srun", "none")
    assert calls(fake)[0].startswith("--overlap") and probes(fake) == ["--mpi=pmix", "--mpi=none"]


def test_srun_with_a_plugin_set_is_trusted_without_a_probe(fake, capfd):
    s = slurmjob.settings(environ(fake, MPIGPT2_LAUNCHER="srun", MPIGPT2_SRUN_MPI="pmix"))
    assert slurmjob.choose_launcher(s, "mpich") == ("srun", "pmix")
    assert calls(fake) == []
    out, _ = stdout_lines(capfd)
    assert out[0].endswith("srun plugin probe: --mpi=pmix: as set (MPIGPT2_LAUNCHER=srun, "
                           "MPIGPT2_SRUN_MPI), not probed"), out


def test_srun_asked_for_but_not_working_is_status_2(fake, capfd):
    s = slurmjob.settings(environ(fake, MPIGPT2_LAUNCHER="srun"))  # both plugins fail
    with pytest.raises(SystemExit) as e:
        slurmjob.choose_launcher(s, "mpich")
    assert e.value.code == 2
    one_error_line(capfd, "MPIGPT2_LAUNCHER=srun, but srun is not usable: no srun --mpi plugin "
                          "worked; set MPIGPT2_SRUN_MPI, or MPIGPT2_LAUNCHER=mpiexec")


@pytest.mark.parametrize("extra,why", [
    ({"SLURM_JOB_ID": None}, "not inside a Slurm job"),
    ({"PATH": "/nonexistent"}, "no srun on PATH"),
    ({"MPIGPT2_LAUNCHER": "mpiexec"}, None)])
def test_mpiexec_without_asking_srun(fake, capfd, extra, why):
    s = slurmjob.settings(environ(fake, FAKE_pmi2="ok", **extra))
    assert slurmjob.choose_launcher(s, "mpich") == ("mpiexec", "")
    assert calls(fake) == []
    out, _ = stdout_lines(capfd)
    if why is None:  # asked for: nothing to explain
        assert out == []
    else:
        assert len(out) == 1 and out[0].endswith(f"] launcher mpiexec: {why}"), out


def test_launch_commands(fake, capfd):
    s = slurmjob.settings(environ(fake, SLURM_CPUS_PER_TASK="3"))
    train = [sys.executable, "-m", "mpigpt2.train", "--x"]
    assert slurmjob.launch_command(s, "srun", "pmi2", ["mpiexec", "-n", "4"], ["--x"]) == \
        ["srun", "--mpi=pmi2", "--ntasks=4", "--cpus-per-task=3", "--kill-on-bad-exit=1", *train]
    assert slurmjob.launch_command(s, "mpiexec", "", ["mpiexec", "-n", "4"], ["--x"]) == \
        ["mpiexec", "-n", "4", *train]
    with pytest.raises(SystemExit) as e:
        slurmjob.launch_command(s, "mpiexec", "", [], ["--x"])
    assert e.value.code == 2
    one_error_line(capfd, "no mpiexec found (set MPIEXEC) and srun is not usable")


# -- requeue ---------------------------------------------------------------------------------
@pytest.mark.parametrize("rc,warned,terminated,extra,scontrol_rc,exit,requeue,says", [
    (3, "", False, {}, 0, 0, True, "requeueing job 999999999 (restart 1 will resume from "),
    (0, "", False, {}, 0, 0, False, None),
    (1, "", False, {}, 0, 1, False, None),            # a crash without a warning: no requeue
    (138, "USR1", False, {}, 0, 0, True, "requeueing"),  # a second warning: the ranks exited
    (2, "USR1", False, {}, 0, 2, False, None),        # bad input is never requeued
    (0, "USR1", False, {}, 0, 0, False, None),        # it finished anyway
    (3, "", True, {}, 0, 3, False, "checkpointed after SIGTERM; not requeueing"),
    (1, "USR1", True, {}, 0, 1, False, None),
    (3, "", False, {"SLURM_JOB_ID": None}, 0, 3, False, "not under Slurm: not requeueing"),
    (3, "", False, {"SLURM_RESTART_COUNT": "5", "MPIGPT2_MAX_RESTARTS": "5"}, 0, 3, False,
     "restarted 5 times (MPIGPT2_MAX_RESTARTS=5): not requeueing"),
    (3, "", False, {}, 1, 3, True, "error: scontrol requeue 999999999 failed")])
def test_requeue_rules(fake, tmp_path, capfd, monkeypatch, rc, warned, terminated, extra,
                       scontrol_rc, exit, requeue, says):
    monkeypatch.setattr(slurmjob, "REQUEUE_WAIT", 0)
    s = slurmjob.settings(environ(fake, FAKE_SCONTROL_RC=str(scontrol_rc), **extra))
    sig = slurmjob.Signals()
    sig.warned, sig.terminated = warned, terminated
    assert slurmjob.finish(rc, s, sig, str(tmp_path)) == exit
    assert calls(fake, ".scontrol") == ([f"requeue {JOB}"] if requeue else [])
    attempts = tmp_path / "attempts.log"
    assert attempts.exists() == requeue
    if requeue:
        assert attempts.read_text().startswith("requeue restart=0 time=")
    out, _ = stdout_lines(capfd)
    assert (says is None) == (out == []) and (says is None or says in out[-1]), out


def test_a_warning_before_the_launch_skips_the_ranks(fake, tmp_path, capfd):
    s = slurmjob.settings(environ(fake))
    sig = slurmjob.Signals()
    sig.warned = "USR1"
    assert slurmjob.run([str(fake / "mpiexec")], s, sig, str(tmp_path)) == 3
    assert calls(fake) == [] and sig.child is None
    assert (tmp_path / "attempts.log").read_text().startswith("skip restart=0 signal=USR1 time=")


# -- whole attempts, signals included: python -m mpigpt2.launch slurm ----------------------------
def start_attempt(fake, tmp_path, **extra):
    env = environ(fake, MPIGPT2_LAUNCHER="mpiexec", MPIEXEC=str(fake / "mpiexec"),
                  SLURM_CPUS_PER_TASK="2", **extra)
    return subprocess.Popen([sys.executable, "-m", "mpigpt2.launch", "slurm", "--", "--steps",
                             "3"], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


@pytest.fixture
def attempt(fake, tmp_path):
    """start(**env) -> the attempt's Popen; whatever is left of it is killed at the end."""
    started = []

    def start(**extra):
        started.append(start_attempt(fake, tmp_path, **extra))
        return started[-1]
    yield start
    for p in started:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except OSError:
            pass
        p.communicate()


def wait_ready(fake, p):
    deadline = time.monotonic() + 30
    while not (fake / "log.ready").exists():
        assert p.poll() is None and time.monotonic() < deadline, p.communicate()[0]
        time.sleep(0.02)


def test_usr1_is_forwarded_and_status_3_requeues(fake, tmp_path, attempt):
    p = attempt(FAKE_SCONTROL_KILL="1")
    wait_ready(fake, p)
    os.kill(p.pid, signal.SIGUSR1)
    out = p.communicate(timeout=30)[0]
    assert p.returncode == -signal.SIGKILL, out  # ended by "Slurm" (the fake scontrol)
    assert calls(fake, ".scontrol") == [f"requeue {JOB}"], out
    o = tmp_path / "runs" / JOB
    assert calls(fake) == [f"args -n 4 {sys.executable} -m mpigpt2.train --out-dir {o} --resume "
                           f"auto --threads 2 --steps 3", "threads 2 2 2", "got USR1"], out
    attempts = [a.rsplit(" time=", 1)[0] for a in (o / "attempts.log").read_text().splitlines()]
    assert attempts == ["start restart=0 launcher=mpiexec ranks=4",
                        "end restart=0 rc=3 signal=USR1", "requeue restart=0"], out
    assert "got SIGUSR1: forwarding it to the mpiexec (pid " in out, out
    assert "mpiexec exited with status 3" in out and "requeueing job" in out, out


def test_sigterm_is_not_forwarded_and_never_requeues(fake, tmp_path, attempt):
    p = attempt()
    wait_ready(fake, p)
    os.kill(p.pid, signal.SIGTERM)  # what Slurm sends the batch shell when it ends the job...
    time.sleep(0.5)
    assert calls(fake)[-1] != "got TERM"
    pid = int(subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True,
                             text=True).stdout.split()[0])
    os.kill(pid, signal.SIGTERM)  # ...and every step's tasks, directly
    out = p.communicate(timeout=30)[0]
    assert p.returncode == 3, out
    assert calls(fake).count("got TERM") == 1 and "got USR1" not in calls(fake), out
    assert calls(fake, ".scontrol") == [], out
    assert "got SIGTERM: Slurm is ending the job; the ranks get it directly" in out, out
    assert "checkpointed after SIGTERM; not requeueing" in out, out
    end = (tmp_path / "runs" / JOB / "attempts.log").read_text().splitlines()[-1]
    assert end.startswith("end restart=0 rc=3 signal=none,TERM"), end


# -- the launcher's two modes ----------------------------------------------------------------
def test_local_launcher_is_unchanged(fake, monkeypatch, capfd):
    monkeypatch.setenv("MPIEXEC", str(fake / "mpiexec"))
    assert launch.main(["-n", "3", "--dry-run", "--", "--pp", "2"]) == 0
    assert launch.main(["-n", "2", "--dry-run", "--", "slurm"]) == 0  # 'slurm' as a train flag
    _, err = stdout_lines(capfd)
    assert err == [f"{fake / 'mpiexec'} -n 3 {sys.executable} -m mpigpt2.train --pp 2",
                   f"{fake / 'mpiexec'} -n 2 {sys.executable} -m mpigpt2.train slurm"]


def test_slurm_mode_dry_run_and_its_own_options(fake, tmp_path):
    env = environ(fake, SLURM_JOB_ID=None, MPIEXEC=str(fake / "mpiexec"))
    r = subprocess.run([sys.executable, "-m", "mpigpt2.launch", "slurm", "--dry-run", "--", "--",
                        "--steps", "2"], env=env, cwd=tmp_path, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r
    assert r.stdout.splitlines()[-1].endswith(
        f"] command: {fake / 'mpiexec'} -n 4 {sys.executable} -m mpigpt2.train --out-dir "
        f"{tmp_path / 'runs' / 'nojob'} --resume auto --threads 1 --steps 2"), r.stdout
    assert calls(fake) == [] and not (tmp_path / "runs" / "nojob" / "attempts.log").exists()
    r = subprocess.run([sys.executable, "-m", "mpigpt2.launch", "slurm", "--bogus"], env=env,
                       cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "unrecognized arguments: --bogus" in r.stderr, r


# -- a lost node (the real thing: tests/test_slurm_multinode.py) --------------------------------
LOST_SRUN = r"""#!/bin/bash
for a in "$@"; do case $a in -w) next=1 ;; *) [ -n "$next" ] && node=$a; next= ;; esac; done
echo "$node" >> "$FAKE_LOG"
case " $FAKE_DEAD " in *" $node "*) exit 1 ;; esac
case " $FAKE_SLOW " in *" $node "*) sleep 30 ;; esac
exit 0
"""
SHRINK_SCONTROL = r"""#!/bin/bash
echo "$*" >> "$FAKE_LOG.scontrol"
case "$1 $2" in
  "show hostnames") echo node1; echo node2; echo node3; echo node4 ;;
  "show job") echo "JobId=$3 JobState=RUNNING NodeList=node[1-2] NumNodes=2" ;;
  update*) exit "${FAKE_UPDATE_RC:-0}" ;;
esac
"""


def lost_settings(tmp_path, **env):
    d = tmp_path / "bin"
    d.mkdir(exist_ok=True)
    script(d / "srun", LOST_SRUN)
    script(d / "scontrol", SHRINK_SCONTROL)
    e = dict(os.environ, PATH=f"{d}:{os.environ['PATH']}", FAKE_LOG=str(tmp_path / "log"),
             SLURM_JOB_ID=JOB, SLURM_JOB_NUM_NODES="4", SLURM_NTASKS="8",
             SLURM_CPUS_PER_TASK="2", SLURM_JOB_NODELIST="node[1-4]",
             MPIGPT2_NODE_PROBE_TIMEOUT="2", **env)
    return slurmjob.settings(e)


def test_lost_nodes_are_the_ones_that_fail_or_do_not_answer(tmp_path):
    """Every node probed at once; a failing one and one that does not answer in time are
    lost, within the bound."""
    s = lost_settings(tmp_path, FAKE_DEAD="node3", FAKE_SLOW="node4")
    t0 = time.time()
    assert slurmjob.lost_nodes(s, slurmjob.allocation_nodes(s)) == ["node3", "node4"]
    assert time.time() - t0 < 10
    assert sorted((tmp_path / "log").read_text().split()) == ["node1", "node2", "node3", "node4"]


def test_shrink_sets_the_smaller_allocation(tmp_path):
    s = lost_settings(tmp_path)
    smaller = slurmjob.shrink(s, ["node1", "node2"])
    assert (smaller.nodes, smaller.ntasks, smaller.threads) == (2, 4, 2)
    e = smaller.env
    assert (e["SLURM_JOB_NODELIST"], e["SLURM_NNODES"], e["SLURM_NTASKS"]) == ("node[1-2]", "2",
                                                                               "4")
    assert e["SLURM_TASKS_PER_NODE"] == "2(x2)" and e["SLURM_JOB_CPUS_PER_NODE"] == "4(x2)"
    assert f"update JobId={JOB} NodeList=node1,node2" in (tmp_path / "log.scontrol").read_text()
    assert slurmjob.shrink(lost_settings(tmp_path, FAKE_UPDATE_RC="1"), ["node1"]) is None


def test_ranks_on_reads_the_rank_table(tmp_path):
    table = [{"rank": r, "host": f"node{r // 2 + 1}", "pid": 100 + r} for r in range(6)]
    (tmp_path / "config.json").write_text(json.dumps({"ranks": table}))
    assert slurmjob.ranks_on(str(tmp_path), ["node3"]) == {"node3": [4, 5]}
    assert slurmjob.ranks_on(str(tmp_path / "missing"), ["node3"]) == {}
