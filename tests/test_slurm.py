"""slurm/train.sbatch on a real (single-node, throw-away) Slurm: train, preempt, requeue, resume.

The module fixture brings up slurmctld + slurmd + munged on localhost (tests/slurm_cluster.py;
apt-installs Debian's packages when missing, as CI does on a fresh machine) and stops them at
the end. Then two uninterrupted jobs (the default layout, and another layout, rank count and
--cpus-per-task), and four jobs warned with SIGUSR1 mid-run that must checkpoint, requeue
themselves, resume and end with per-step losses equal to their uninterrupted job's: with srun;
with the fallback to mpiexec after a failed plugin probe (and a user --resume PATH that must
apply to the first attempt only); after a second warning; and with the other layout and a user
--out-dir. The jobs of each group run at the same time (the node declares 16 CPUs, each job
takes 4) to keep the wall time down. The dry-run tests at the end need no Slurm: they check
how the script turns its arguments and environment into the launch command, and how it finds
the Python (tests/test_slurmjob.py tests the module behind it piece by piece).
"""

import json
import os
import shlex
import subprocess
import time

import pytest

from slurm_cluster import SlurmCluster, serve
from slurm_jobs import SCRIPT, VENV, Job

STEPS = 12
# Rank 0 sleeps 8 s inside step 5 (0-based; this only delays, numbers are unchanged): the test
# sends the warning once step 4 is logged, so the ranks stop after step 5 (checkpoint at 6).
DELAY = ["--inject-delay", "0:5:8"]


def train_flags(shards):
    train, _ = shards
    return ["--model", "gpt2-tiny", "--batch-size", "4", "--seq-len", "32", "--steps",
            str(STEPS), "--checkpoint-every", "2", "--keep-checkpoints", "0", "--val-data", "",
            "--sample-tokens", "0", "--train-data", str(train), "--pp", "2", "--dp", "2",
            "--peak-gflops", "100"]


# Another layout and shape of the job: 2 ranks with 2 CPUs (BLAS threads) each, uneven stages,
# GPipe, 4 micro-batches of 16-token slices, validation every 4 steps.
LAYOUT_SBATCH = ("--ntasks-per-node", "2", "--cpus-per-task", "2")
LAYOUT = ["--pp", "2", "--dp", "1", "--stage-layers", "1,3", "--microbatches", "4",
          "--slice-tokens", "16", "--schedule", "gpipe"]


def layout_flags(shards):
    _, val = shards
    return ["--model", "gpt2-tiny", "--batch-size", "4", "--seq-len", "32", "--steps",
            str(STEPS), "--checkpoint-every", "2", "--val-data", str(val), "--val-every", "4",
            "--val-steps", "2", "--sample-tokens", "0", "--peak-gflops", "100", *LAYOUT]


@pytest.fixture(scope="module")
def slurm(request):
    yield from serve(request, lambda root: SlurmCluster(
        root, cpus=16, log=lambda m: print(f"[slurm] {m}", flush=True)), "mpigpt2-slurm-")


def warn_at_step_4(plan, timeout=180):
    """plan: {job: number of warnings}. Warn each job once it has logged step 4 (rank 0 then
    sleeps 8 s in step 5, so the ranks stop after step 5); a second warning comes 1.5 s after
    the first, past the 1 s window in which a repeated signal counts once."""
    sent = {job: [] for job in plan}  # when each warning went out
    deadline, next_check = time.time() + timeout, 0.0
    while any(len(sent[job]) < n for job, n in plan.items()):
        now = time.time()
        check = now >= next_check  # whether the jobs still run: every 2 s (an scontrol call)
        for job, n in plan.items():
            times = sent[job]
            if len(times) == n:
                continue
            if times and now - times[-1] >= 1.5 or not times and job.logged(4):
                job.warn()
                times.append(time.time())
            elif not times and (now > deadline or check and not job.alive()):
                raise AssertionError(f"job {job.id} did not log step 4:\n{job.report()}")
        if check:
            next_check = now + 2
        time.sleep(0.1)


@pytest.fixture(scope="module")
def spaced_data(shards, tmp_path_factory):
    """The training shard under a directory whose name has a space (a symlink: resume matches
    the data by file name and size)."""
    train, _ = shards
    d = tmp_path_factory.mktemp("data") / "to kens"
    d.mkdir()
    (d / train.name).symlink_to(train)
    return ["--train-data", str(d / train.name)]


@pytest.fixture(scope="module")
def uninterrupted(slurm, shards, spaced_data, module_tmp):
    """{name: (job, final scontrol info)}: the default job ("plain", 1 node x 4 tasks as the
    script asks) and the other layout ("layout": 2 tasks x 2 CPUs), submitted together."""
    jobs = {"plain": Job(slurm, module_tmp("plain"), train_flags(shards)),
            "layout": Job(slurm, module_tmp("layout"),
                          layout_flags(shards) + spaced_data, sbatch=LAYOUT_SBATCH)}
    return {name: (job, job.finish(timeout=180)) for name, job in jobs.items()}


@pytest.fixture(scope="module")
def preempted(slurm, shards, spaced_data, module_tmp, uninterrupted):
    """{name: (job, final scontrol info)}: the jobs warned mid-run, submitted together."""
    d = module_tmp("preempted")
    start = uninterrupted["plain"][0].out_dir / "checkpoints" / "step_00000002"
    out_dir = d / "layout" / "my out"
    jobs = {
        # the batch shell forwards the warning to srun, which passes it to every rank
        "srun": Job(slurm, d / "srun", train_flags(shards) + DELAY),
        # srun lists --mpi=none, but it starts every rank as its own 1-rank MPI job: the probe
        # must reject it and the script use mpiexec in the allocation (as for Debian's listed
        # but broken pmix). It starts from the uninterrupted job's step-2 checkpoint.
        "mpiexec": Job(slurm, d / "mpiexec", train_flags(shards) + DELAY
                       + ["--resume", str(start)], env={"MPIGPT2_SRUN_MPI": "none"}),
        "twice": Job(slurm, d / "twice", train_flags(shards) + DELAY),
        # layout, ranks and CPUs through sbatch's and the script's arguments, the data (a path
        # with a space) through MPIGPT2_ARGS, the output directory through --out-dir=...
        "layout": Job(slurm, d / "layout", layout_flags(shards) + DELAY
                      + [f"--out-dir={out_dir}"], env={"MPIGPT2_ARGS": shlex.join(spaced_data)},
                      sbatch=LAYOUT_SBATCH, out_dir=out_dir),
    }
    warn_at_step_4({job: 2 if name == "twice" else 1 for name, job in jobs.items()})
    return {name: (job, job.finish(timeout=240)) for name, job in jobs.items()}


@pytest.mark.timeout(900)  # includes bringing the cluster up (an apt install on a fresh machine)
def test_job_trains_on_4_ranks(uninterrupted):
    job, info = uninterrupted["plain"]
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", job.report()
    assert info["Restarts"] == "0", job.report()
    out = job.output()
    # the script's defaults: 1 node x 4 tasks, 1 CPU (= 1 BLAS thread) each; srun with PMI-2
    assert "4 ranks x 1 thread(s), launcher srun --mpi=pmi2" in out, out
    assert "srun plugin probe: --mpi=pmi2: ok (2 rank(s) started and met" in out, out
    assert "ranks 4 = pp 2 × dp 2" in out and "1 BLAS thread(s)/rank" in out, out
    config = json.loads((job.out_dir / "config.json").read_text())
    assert config["world"] == 4 and config["layout"]["pp"] == 2 and config["layout"]["dp"] == 2
    assert config["args"]["resume"] == "auto" and config["args"]["threads"] == 1
    assert [s for s, _ in job.losses()] == list(range(STEPS)), job.report()
    assert (job.out_dir / "checkpoints" / f"step_{STEPS:08d}" / "DONE").exists()
    assert job.attempts()[0].startswith("start restart=0 launcher=srun ranks=4")
    assert job.attempts()[-1].startswith("end restart=0 rc=0 signal=none")


def test_other_layout_trains_on_2_ranks_with_2_threads(uninterrupted):
    job, info = uninterrupted["layout"]
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", job.report()
    out = job.output()
    assert "2 ranks x 2 thread(s), launcher srun --mpi=pmi2" in out, out
    assert "ranks 2 = pp 2 × dp 1 | stages [1, 3] | M=4 k=16 gpipe" in out, out
    assert "2 BLAS thread(s)/rank" in out, out
    assert [s for s, _ in job.losses()] == list(range(STEPS)), job.report()
    assert [s for s, _ in job.val_losses()] == [4, 8, 12], job.report()


def requeued_once(job, info, launcher, start=0, reference=None):
    """The job checkpointed on the warning, was requeued once, resumed and finished; its losses
    (and validation losses) from step `start` on equal the reference's bit for bit."""
    report = job.report()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", report
    assert info["Restarts"] == "1", report
    attempts = job.attempts()
    assert [a.split(" ")[0] for a in attempts] == ["start", "end", "requeue", "start", "end"], \
        report
    assert attempts[0].startswith(f"start restart=0 launcher={launcher}"), report
    assert attempts[3].startswith(f"start restart=1 launcher={launcher}"), report
    assert attempts[4].startswith("end restart=1 rc=0"), report
    losses, val = reference.losses(), reference.val_losses()
    assert [s for s, _ in losses] == list(range(STEPS)), reference.report()
    assert job.losses() == losses[start:], report  # bit-identical floats, every step once
    assert job.val_losses() == [(s, v) for s, v in val if s >= start], report
    return attempts, report


@pytest.mark.timeout(600)
def test_usr1_checkpoints_requeues_and_resumes_exactly(preempted, uninterrupted):
    job, info = preempted["srun"]
    attempts, report = requeued_once(job, info, "srun", reference=uninterrupted["plain"][0])
    assert attempts[1].startswith("end restart=0 rc=3 signal=USR1"), report
    assert "checkpointing at step 6" in report, report
    assert "checkpoints/step_00000006 at step 6" in report, report


def test_mpiexec_fallback_and_user_resume_path_only_once(preempted, uninterrupted):
    job, info = preempted["mpiexec"]
    reference = uninterrupted["plain"][0]
    attempts, report = requeued_once(job, info, "mpiexec", start=2, reference=reference)
    assert attempts[1].startswith("end restart=0 rc=3 signal=USR1"), report
    assert "--mpi=none: the ranks did not see each other" in report, report
    assert "launcher mpiexec: no srun --mpi plugin worked" in report, report
    # the user's --resume PATH for the first attempt; the requeued one resumes from this job's
    # own step-6 checkpoint instead of going back to step 2
    start = reference.out_dir / "checkpoints" / "step_00000002"
    assert f"resumed from {start} at step 2" in report, report
    assert "resume: restart 1: resuming from the newest checkpoint" in report, report
    assert f"resumed from {job.out_dir}/checkpoints/step_00000006 at step 6" in report, report
    assert report.count("resumed from") == 2, report


def test_second_warning_exits_at_once_and_still_resumes(preempted, uninterrupted):
    # a second, separate USR1 (1.5 s after the first) makes the ranks exit at once, without a
    # checkpoint (a repeat within 1 s, as srun delivers `scancel --full`, counts once). The job
    # still requeues, removes the shared memory MPICH left (a requeued job reuses its job and
    # step ids: MPI_Init would hang on it) and resumes from the last periodic checkpoint, at
    # step 4.
    job, info = preempted["twice"]
    attempts, report = requeued_once(job, info, "srun", reference=uninterrupted["plain"][0])
    assert attempts[1].startswith("end restart=0 rc=138 signal=USR1"), report
    assert "second signal SIGUSR1" in report, report
    assert "checkpoints/step_00000004 at step 4" in report, report


def test_other_layout_and_out_dir_survive_a_requeue_exactly(preempted, uninterrupted,
                                                           spaced_data):
    job, info = preempted["layout"]
    reference = uninterrupted["layout"][0]
    attempts, report = requeued_once(job, info, "srun", reference=reference)
    assert attempts[1].startswith("end restart=0 rc=3 signal=USR1"), report
    assert f"resumed from {job.out_dir}/checkpoints/step_00000006 at step 6" in report, report
    assert not (job.workdir / "runs").exists(), report  # attempts.log etc. all in --out-dir
    assert "2 ranks x 2 thread(s), launcher srun --mpi=pmi2" in report, report
    assert "ranks 2 = pp 2 × dp 1 | stages [1, 3] | M=4 k=16 gpipe" in report, report
    config = json.loads((job.out_dir / "config.json").read_text())
    assert config["args"]["threads"] == 2 and config["args"]["out_dir"] == str(job.out_dir)
    assert config["args"]["train_data"] == spaced_data[1], config  # via MPIGPT2_ARGS


# -- without Slurm: how the script builds the launch command (MPIGPT2_DRY_RUN=1) ---------------
def dry_run(cwd, *args, env=None):
    """Run train.sbatch outside Slurm with MPIGPT2_DRY_RUN=1: (status, output, train argv)."""
    e = {k: v for k, v in os.environ.items()
         if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "MPIGPT2_"))}
    e.update(MPIGPT2_VENV=str(VENV), MPIGPT2_DRY_RUN="1")
    e.update(env or {})
    r = subprocess.run(["bash", str(SCRIPT), *args], cwd=cwd, env=e, capture_output=True,
                       text=True, timeout=60)
    out = r.stdout + r.stderr
    argv = None
    for line in out.splitlines():
        if "] command: " in line:
            cmd = shlex.split(line.split("] command: ", 1)[1])
            argv = cmd[cmd.index("mpigpt2.train") + 1:]
    return r.returncode, out, argv


def test_dry_run_flags_quoting_and_user_out_dir(tmp_path):
    rc, out, argv = dry_run(tmp_path, "--", "--out-dir=my out", "--pp", "2",
                            env={"MPIGPT2_ARGS": "--steps 5 --val-data '' --train-data "
                                                 "'/data/my tokens/*_train_*.bin'"})
    assert rc == 0, out
    assert argv == ["--out-dir", "my out", "--resume", "auto", "--threads", "1", "--steps", "5",
                    "--val-data", "", "--train-data", "/data/my tokens/*_train_*.bin",
                    "--out-dir=my out", "--pp", "2"], out
    assert (tmp_path / "my out").is_dir() and not (tmp_path / "runs").exists(), out
    assert "launcher mpiexec: not inside a Slurm job" in out, out
    # the `--out-dir X` form (and an abbreviation, as argparse takes it), from MPIGPT2_ARGS
    rc, out, argv = dry_run(tmp_path, env={"MPIGPT2_ARGS": "--out other", "MPIGPT2_OUT": "x"})
    assert rc == 0 and argv[:2] == ["--out-dir", "other"], out
    # bad input ends the job before anything is launched, with status 2
    rc, out, argv = dry_run(tmp_path, "--", "--pp", "2", "--no-such-flag")
    assert rc == 2 and argv is None and "unrecognized arguments: --no-such-flag" in out, out
    rc, out, argv = dry_run(tmp_path, env={"MPIGPT2_ARGS": "--steps '5"})
    assert rc == 2 and argv is None and "MPIGPT2_ARGS" in out, out


def test_dry_run_user_resume_path_applies_to_the_first_attempt_only(tmp_path):
    old = tmp_path / "old" / "step_00000002"
    old.mkdir(parents=True)
    (old / "DONE").write_text("2\n")
    fresh = ["--", "--out-dir", "out", "--resume", str(old)]
    # first attempt, nothing in OUT: the user's checkpoint
    rc, out, argv = dry_run(tmp_path, *fresh)
    assert rc == 0 and argv[-2:] == ["--resume", str(old)] and "resume:" not in out, out
    # a restart before OUT has a checkpoint: still the user's
    rc, out, argv = dry_run(tmp_path, *fresh, env={"SLURM_RESTART_COUNT": "1"})
    assert rc == 0 and argv[-2:] == ["--resume", str(old)], out
    done = tmp_path / "out" / "checkpoints" / "step_00000006"
    done.mkdir(parents=True)
    (done / "DONE").write_text("6\n")
    # a restart with a checkpoint in OUT: the newest there (--resume auto, given last)
    rc, out, argv = dry_run(tmp_path, *fresh, env={"SLURM_RESTART_COUNT": "1"})
    assert rc == 0 and argv[-2:] == ["--resume", "auto"], out
    assert "resume: restart 1: resuming from the newest checkpoint" in out, out
    # a new job (same flags) whose OUT already went further than PATH: the newest there too
    rc, out, argv = dry_run(tmp_path, *fresh)
    assert rc == 0 and argv[-2:] == ["--resume", "auto"], out
    assert "(step 6) is newer than --resume" in out, out
    # a PATH later than anything in OUT, on a new job: the user's
    (old.parent / "step_00000008").mkdir()
    (old.parent / "step_00000008" / "DONE").write_text("8\n")
    later = str(old.parent / "step_00000008")
    rc, out, argv = dry_run(tmp_path, "--out-dir", "out", f"--resume={later}")
    assert rc == 0 and argv[-1] == f"--resume={later}", out


def test_dry_run_finds_the_python_or_says_how_to(tmp_path):
    # MPIGPT2_VENV=none: python3 from PATH (here the venv's, as after `module load`)
    path = f"{VENV / 'bin'}:{os.environ['PATH']}"
    rc, out, argv = dry_run(tmp_path, "--steps", "1", env={"MPIGPT2_VENV": "none", "PATH": path})
    assert rc == 0 and argv[-2:] == ["--steps", "1"], out
    # no virtualenv there, or a python3 without mpigpt2: status 2 and what to set
    for i, env in enumerate(({"MPIGPT2_VENV": str(tmp_path / "novenv")},
                             {"MPIGPT2_VENV": "none", "PATH": "/usr/bin:/bin"})):
        (tmp_path / str(i)).mkdir()
        rc, out, argv = dry_run(tmp_path / str(i), env=env)
        assert rc == 2 and argv is None, out
        assert "error: cannot import mpigpt2 with " in out and "set MPIGPT2_VENV" in out, out
        assert os.listdir(tmp_path / str(i)) == [], out
