"""Bench row 12 on the emulated cluster: bring up two Slurm nodes on this machine (network
namespaces, tests/multinode_cluster.py; needs root), train each layout of plan_check.CLUSTER
with `srun -N 2`, one rank and one BLAS thread per node, and print one BENCH_JSON line per
layout (its step times, like bench/train_run.py) plus the network the trainer's start-up probe
measured between the nodes. Tears the cluster down, whatever happens."""

import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from common import ROOT, emit

sys.path.insert(0, os.path.join(ROOT, "tests"))
import plan_check as pc  # noqa: E402
from multinode_cluster import MultiNodeCluster  # noqa: E402


def steps_of(out):
    rows = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [r["step_ms"] / 1e3 for r in rows if "loss" in r][2:]


def main():
    root = Path(tempfile.mkdtemp(prefix="mpigpt2-bench-mn-"))
    cluster = MultiNodeCluster(root, nodes=2, log=lambda m: print(f"[cluster] {m}",
                                                                  file=sys.stderr))
    try:
        cluster.start()
        cal = pc.calibrate_now()
        for label, flags in pc.CLUSTER:
            out = root / label.replace(" ", "_").replace(",", "")
            data = os.path.join(ROOT, "data/tinyshakespeare/tiny_shakespeare_train.bin")
            r = cluster.run("srun", "-N", "2", "-n", "2", "--ntasks-per-node", "1",
                            "--mpi=pmi2", "--chdir", root, sys.executable, "-m",
                            "mpigpt2.train", *pc.train_flags(flags), "--train-data", data,
                            "--threads", "1", "--out-dir", out, "--sample-tokens", "0",
                            "--val-data", "", "--no-final-checkpoint", timeout=900,
                            check=False)
            if r.returncode != 0:
                sys.stderr.write(r.stdout[-2000:] + r.stderr[-2000:] + cluster.logs())
                sys.exit(1)
            net = next((x for x in r.stdout.splitlines() if x.startswith("network (")), "")
            steps = steps_of(out)
            emit({"label": label, "flags": flags, "best_step_ms": 1e3 * min(steps),
                  "median_step_ms": 1e3 * statistics.median(steps), "network": net,
                  "calibration": cal})
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
