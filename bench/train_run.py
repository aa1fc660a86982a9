"""Run `python -m mpigpt2.train` under mpiexec in a temp dir and report its metrics as one
BENCH_JSON line: median step, exposed communication per rank, memory, autotune choice."""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from common import emit, ROOT


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("-n", type=int, required=True, help="MPI ranks")
    ap.add_argument("--warmup", type=int, default=2, help="steps left out of the medians")
    ap.add_argument("--label", default="", help="echoed into the result")
    ap.add_argument("rest", nargs=argparse.REMAINDER, help="-- then train flags")
    a = ap.parse_args()
    flags = a.rest[1:] if a.rest[:1] == ["--"] else a.rest
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    with tempfile.TemporaryDirectory() as out:
        cmd = [mpiexec, "-n", str(a.n), sys.executable, "-m", "mpigpt2.train", "--out-dir", out,
               "--sample-tokens", "0", "--val-data", "", "--no-final-checkpoint",
               "--threads", "1"] + flags
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if r.returncode != 0:
            sys.stderr.write(r.stdout[-2000:] + r.stderr[-4000:])
            sys.exit(r.returncode)
        rows = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
        config = json.load(open(os.path.join(out, "config.json")))
    steps = [x for x in rows if "loss" in x][a.warmup:]
    summary = rows[-1]
    # per step, the exposed allreduce + allgather time of the rank that waited longest, and
    # of the rank that waited least: the last to finish its backward, whose wait is the
    # reduction's own time on the step's critical path (the others' also holds their wait
    # for that rank)
    exposed = [max(p["allreduce"] + p["allgather"] for p in s["phases_ms"]) for s in steps]
    critical = [min(p["allreduce"] + p["allgather"] for p in s["phases_ms"]) for s in steps]
    emit({"label": a.label, "n": a.n, "flags": flags,
          "median_step_ms": statistics.median(s["step_ms"] for s in steps),
          "best_step_ms": min(s["step_ms"] for s in steps),
          "exposed_comm_ms_median": statistics.median(exposed),
          "critical_comm_ms_median": statistics.median(critical),
          "optim_bytes": [x["optim_bytes"] for x in summary["ranks"]],
          "param_bytes": [x["param_bytes"] for x in summary["ranks"]],
          "losses": [s["loss"] for s in steps],
          "autotune": config.get("autotune"), "layout": config["layout"]})


if __name__ == "__main__":
    main()
