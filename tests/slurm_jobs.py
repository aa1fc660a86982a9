"""A submitted slurm/train.sbatch job as the Slurm tests see it (tests/test_slurm.py on one
node, tests/test_slurm_multinode.py on several): its id, output, attempts and metrics."""

import json
import sys
from pathlib import Path

from helpers import REPO

SCRIPT = REPO / "slurm" / "train.sbatch"
VENV = Path(sys.executable).parent.parent


class Job:
    """A submitted train.sbatch job: its id, output file and run directory."""

    def __init__(self, slurm, workdir, flags, env=None, sbatch=(), out_dir=None):
        self.slurm, self.workdir = slurm, workdir
        workdir.mkdir(parents=True, exist_ok=True)
        env = dict({"MPIGPT2_VENV": str(VENV), "MPIGPT2_RUNS": str(workdir / "runs")},
                   **(env or {}))
        self.id = slurm.submit("--chdir", workdir, "--output", workdir / "job-%j.out",
                               "--time", "10", *sbatch, SCRIPT, "--", *flags, env=env)
        self.out_dir = Path(out_dir) if out_dir else workdir / "runs" / str(self.id)

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

    def val_losses(self):
        return [(r["step"], r["val_loss"]) for r in self.records() if "val_loss" in r]

    def logged(self, step):
        return any(s == step for s, _ in self.losses())

    def alive(self):
        return self.slurm.job(self.id).get("JobState") in ("PENDING", "RUNNING")

    def warn(self):
        """What `--signal=B:USR1@60` does before the time limit: USR1 to the batch shell."""
        self.slurm.run("scancel", "--signal=USR1", "--batch", self.id)

    def finish(self, timeout):
        try:
            return self.slurm.wait_finished(self.id, timeout)
        except TimeoutError as e:
            raise AssertionError(f"{e}\n{self.report()}")

    def report(self):
        return (f"--- job output\n{self.output()}\n--- attempts\n" + "\n".join(self.attempts())
                + f"\n--- cluster logs\n{self.slurm.logs()}")
