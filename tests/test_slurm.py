"""slurm/train.sbatch on a real (single-node, throw-away) Slurm: train, preempt, requeue, resume.

The module fixture brings up slurmctld + slurmd + munged on localhost (tests/slurm_cluster.py;
apt-installs Debian's packages when missing, as CI does on a fresh machine) and stops them at
the end. Then one uninterrupted job, and jobs warned with SIGUSR1 mid-run that must checkpoint,
requeue themselves, resume and end with per-step losses equal to the uninterrupted job's.
"""

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import REPO
from slurm_cluster import SlurmCluster, Unavailable

SCRIPT = REPO / "slurm" / "train.sbatch"
VENV = Path(sys.executable).parent.parent
STEPS = 12
# Rank 0 sleeps 8 s inside step 5 (0-based; this only delays, numbers are unchanged): the test
# sends the warning once step 4 is logged, so the ranks stop after step 5 (checkpoint at 6).
DELAY = ["--inject-delay", "0:5:8"]


def train_flags(shards):
    train, _ = shards
    return ["--model", "gpt2-tiny", "--batch-size", "4", "--seq-len", "32", "--steps",
            str(STEPS), "--checkpoint-every", "2", "--val-data", "", "--sample-tokens", "0",
            "--train-data", str(train), "--pp", "2", "--dp", "2", "--peak-gflops", "100"]


@pytest.fixture(scope="module")
def slurm(request):
    # a short path of its own (munged's unix socket lives there); removed unless a test failed
    root = Path(tempfile.mkdtemp(prefix="mpigpt2-slurm-"))
    failed = request.session.testsfailed
    cluster = SlurmCluster(root, cpus=8, log=lambda m: print(f"[slurm] {m}", flush=True))
    try:
        cluster.start()
    except Unavailable as e:
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


class Job:
    """A submitted train.sbatch job: its id, output file and run directory."""

    def __init__(self, slurm, workdir, flags, env=None, sbatch=()):
        self.slurm, self.workdir = slurm, workdir
        workdir.mkdir(parents=True, exist_ok=True)
        env = dict({"MPIGPT2_VENV": str(VENV), "MPIGPT2_RUNS": str(workdir / "runs")},
                   **(env or {}))
        self.id = slurm.submit("--chdir", workdir, "--output", workdir / "job-%j.out",
                               "--time", "10", *sbatch, SCRIPT, "--", *flags, env=env)
        self.out_dir = workdir / "runs" / str(self.id)

    def output(self):
        f = self.workdir / f"job-{self.id}.out"
        return f.read_text(errors="replace") if f.exists() else ""

    def attempts(self):
        f = self.out_dir / "attempts.log"
        return f.read_text().splitlines() if f.exists() else []

    def records(self):
        f = self.out_dir / "metrics.jsonl"
        if not f.exists():
            return []
        return [json.loads(x) for x in f.read_text().splitlines() if x.strip()]

    def losses(self):
        return [(r["step"], r["loss"]) for r in self.records() if "loss" in r]

    def wait_for_step(self, step, timeout):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if any(s == step for s, _ in self.losses()):
                return
            if self.slurm.job(self.id).get("JobState") not in ("PENDING", "RUNNING"):
                break
            time.sleep(0.1)
        raise AssertionError(f"job {self.id} did not log step {step}:\n{self.report()}")

    def finish(self, timeout):
        try:
            return self.slurm.wait_finished(self.id, timeout)
        except TimeoutError as e:
            raise AssertionError(f"{e}\n{self.report()}")

    def report(self):
        return (f"--- job output\n{self.output()}\n--- attempts\n" + "\n".join(self.attempts())
                + f"\n--- cluster logs\n{self.slurm.logs()}")


@pytest.fixture(scope="module")
def uninterrupted(slurm, shards, tmp_path_factory):
    job = Job(slurm, tmp_path_factory.mktemp("plain"), train_flags(shards))
    info = job.finish(timeout=120)
    return job, info


@pytest.mark.timeout(900)  # includes bringing the cluster up (an apt install on a fresh machine)
def test_job_trains_on_4_ranks(uninterrupted):
    job, info = uninterrupted
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", job.report()
    assert info["Restarts"] == "0", job.report()
    out = job.output()
    # the script's defaults: 1 node x 4 tasks, 1 CPU (= 1 BLAS thread) each; srun with PMI-2
    assert "4 ranks x 1 thread(s), launcher srun --mpi=pmi2" in out, out
    assert "ranks 4 = pp 2 × dp 2" in out and "1 BLAS thread(s)/rank" in out, out
    config = json.loads((job.out_dir / "config.json").read_text())
    assert config["world"] == 4 and config["layout"]["pp"] == 2 and config["layout"]["dp"] == 2
    assert config["args"]["resume"] == "auto" and config["args"]["threads"] == 1
    assert [s for s, _ in job.losses()] == list(range(STEPS)), job.report()
    assert (job.out_dir / "checkpoints" / f"step_{STEPS:08d}" / "DONE").exists()
    assert job.attempts()[0].startswith("start restart=0 launcher=srun ranks=4")
    assert job.attempts()[-1].startswith("end restart=0 rc=0 signal=none")


def preempt(slurm, shards, tmp_path, uninterrupted, launcher, warnings=1):
    """Warn a job with USR1 (`scancel --signal=USR1 --batch`, what `--signal=B:USR1@60` does)
    after step 4; it must requeue itself once, resume and reproduce the uninterrupted losses
    exactly."""
    job = Job(slurm, tmp_path, train_flags(shards) + DELAY,
              env={"MPIGPT2_LAUNCHER": launcher})
    job.wait_for_step(4, timeout=120)
    for i in range(warnings):
        if i:
            time.sleep(1.5)  # past the 1 s window in which a repeated signal counts once
        slurm.run("scancel", "--signal=USR1", "--batch", job.id)
    info = job.finish(timeout=150)
    report = job.report()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", report
    assert info["Restarts"] == "1", report
    attempts = job.attempts()
    assert [a.split(" ")[0] for a in attempts] == ["start", "end", "requeue", "start", "end"], \
        report
    assert attempts[0].startswith(f"start restart=0 launcher={launcher}"), report
    assert attempts[3].startswith(f"start restart=1 launcher={launcher}"), report
    assert attempts[4].startswith("end restart=1 rc=0"), report
    reference = uninterrupted[0].losses()
    assert len(reference) == STEPS
    assert job.losses() == reference, report  # bit-identical floats, every step once
    return job, attempts, report


@pytest.mark.timeout(600)
@pytest.mark.parametrize("launcher", ["srun", "mpiexec"])
def test_usr1_checkpoints_requeues_and_resumes_exactly(slurm, shards, tmp_path, uninterrupted,
                                                       launcher):
    # the batch shell forwards the warning to the launcher, which passes it to every rank
    job, attempts, report = preempt(slurm, shards, tmp_path, uninterrupted, launcher)
    assert attempts[1].startswith("end restart=0 rc=3 signal=USR1"), report
    assert "checkpointing at step 6" in report, report
    assert "checkpoints/step_00000006 at step 6" in report, report


@pytest.mark.timeout(600)
def test_second_warning_exits_at_once_and_still_resumes(slurm, shards, tmp_path, uninterrupted):
    # a second, separate USR1 (1.5 s after the first) makes the ranks exit at once, without a
    # checkpoint (a repeat within 1 s, as srun delivers `scancel --full`, counts once). The job
    # still requeues, removes
    # the shared memory MPICH left (a requeued job reuses its job and step ids: MPI_Init would
    # hang on it) and resumes from the last periodic checkpoint, at step 4.
    job, attempts, report = preempt(slurm, shards, tmp_path, uninterrupted, "srun", warnings=2)
    assert attempts[1].startswith("end restart=0 rc=138 signal=USR1"), report
    assert "second signal SIGUSR1" in report, report
    assert "checkpoints/step_00000004 at step 4" in report, report
