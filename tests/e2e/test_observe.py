"""Seeing what the pipeline does: the Chrome trace, the step metrics, report's pictures and the
stall report, on small runs under mpiexec."""

import json
import re
import sys
import time

import pytest

from helpers import run, mpiexec
from helpers import train_cmd
from mpigpt2.parallel import schedule

PY = sys.executable
PNG = b"\x89PNG\r\n\x1a\n"
PP, DP, M, N, STEPS = 2, 2, 2, 2, 2   # layout of the traced run: k = T/N = 16
RANKS = PP * DP
TRACED = ["--pp", str(PP), "--dp", str(DP), "--microbatches", str(M), "--slice-tokens", "16",
          "--batch-size", "8", "--schedule",
          "1f1b", "--steps", str(STEPS), "--trace", "--sample-tokens", "0", "--val-steps", "1",
          "--no-final-checkpoint", "--peak-gflops", "100"]


@pytest.fixture(scope="module")
def traced(tmp_path_factory, shards):
    """A pp=2 dp=2 run with M=2 micro-batches of n=2 slices, 2 steps, traced."""
    out = tmp_path_factory.mktemp("traced")
    r = run(mpiexec(RANKS) + train_cmd(shards, out, *TRACED), timeout=180)
    assert r.returncode == 0, r.stderr
    return out


def records(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def steps_of(events, rank, step):
    """A rank's events of one step, in time order, up to its optimizer update."""
    evs = sorted((e for e in events if e["tid"] == rank and e["args"]["step"] == step),
                 key=lambda e: e["ts"])
    end = next(i for i, e in enumerate(evs) if e["cat"] == "update")
    return evs[:end + 1]


def check_predicted(doc, measured):
    """pid 1 holds, for every step, each rank's compute actions with their measured
    durations, in the same order, none overlapping, none before its rank's measured start."""
    pred = [e for e in doc["traceEvents"] if e["ph"] == "X" and e.get("pid") == 1]
    compute = [e for e in measured if e["cat"] in ("forward", "backward")
               and e["args"]["step"] >= 0]
    assert sorted((e["tid"], e["args"]["step"], e["name"]) for e in pred) == \
        sorted((e["tid"], e["args"]["step"], e["name"]) for e in compute)
    dur = {(e["tid"], e["args"]["step"], e["name"]): e["dur"] for e in compute}
    for key, got in ((k, e["dur"]) for e in pred
                     for k in [(e["tid"], e["args"]["step"], e["name"])]):
        assert got == pytest.approx(dur[key], abs=2e-3)
    for rank in range(RANKS):
        for step in {e["args"]["step"] for e in pred}:
            mine = sorted((e for e in pred if e["tid"] == rank and e["args"]["step"] == step),
                          key=lambda e: e["ts"])
            order = [e["name"] for e in sorted((e for e in compute if e["tid"] == rank and
                                                e["args"]["step"] == step),
                                               key=lambda e: e["ts"])]
            assert [e["name"] for e in mine] == order
            for a, b in zip(mine, mine[1:]):
                assert a["ts"] + a["dur"] <= b["ts"] + 1e-2


@pytest.mark.timeout(240)
def test_trace_has_a_track_per_rank_and_the_schedule_s_events(traced):
    doc = json.loads((traced / "trace.json").read_text())
    meta = [e for e in doc["traceEvents"] if e["ph"] == "M" and e["name"] == "thread_name"]
    for pid in (0, 1):  # measured, predicted
        assert sorted(e["tid"] for e in meta if e["pid"] == pid) == list(range(RANKS))
    events = [e for e in doc["traceEvents"] if e["ph"] in ("X", "i") and e["pid"] == 0]
    assert {e["tid"] for e in events} == set(range(RANKS))
    check_predicted(doc, events)
    progs = schedule.build("1f1b", PP, M, N)
    for rank in range(RANKS):
        stage = rank % PP
        mine = [e for e in events if e["tid"] == rank]
        assert all(e["ts"] >= 0 for e in mine)
        spans = sorted((e for e in mine if e["ph"] == "X"), key=lambda e: e["ts"])
        for a, b in zip(spans, spans[1:]):  # one thread of work per rank: no overlaps
            assert a["ts"] + a["dur"] <= b["ts"] + 1.0, (a, b)  # µs rounding
        compute = [str(a) for a in progs[stage] if a.kind in ("F", "B")]
        assert len(compute) == 2 * M * N
        sends = [str(a) for a in progs[stage] if a.kind.startswith("SEND")]
        recvs = [str(a) for a in progs[stage] if a.kind.startswith("RECV")]
        for step in range(STEPS):
            evs = steps_of(events, rank, step)
            # every F and B of the schedule, in the schedule's order
            assert [e["name"] for e in evs if e["cat"] in ("forward", "backward")] == compute
            assert all(e["name"].lstrip("0123456789")[0] == ("F" if e["cat"] == "forward" else "B")
                       for e in evs if e["cat"] in ("forward", "backward"))
            assert [e["name"] for e in evs if e["cat"] == "send"] == sends
            # every receive posted (in schedule order) and completed; every send completed
            assert [e["name"] for e in evs if e["cat"] == "recv_post"] == \
                [f"post {a}" for a in recvs]
            assert sorted(e["name"] for e in evs if e["cat"] == "recv_done") == \
                sorted(f"done {a}" for a in recvs)
            assert sorted(e["name"] for e in evs if e["cat"] == "send_done") == \
                sorted(f"done {a}" for a in sends)
            assert [e["cat"] for e in evs].count("update") == 1
            assert [e["cat"] for e in evs].count("allreduce") == 1  # dp = 2: always waits
            assert all(e["args"]["step"] == step for e in evs)
        assert [e["ts"] for e in steps_of(events, rank, 0)][-1] < \
            [e["ts"] for e in steps_of(events, rank, 1)][0]


@pytest.mark.timeout(240)
def test_metrics_fields_are_consistent(traced):
    recs = records(traced)
    steps = [r for r in recs if "loss" in r]
    assert [r["step"] for r in steps] == list(range(STEPS))
    for r in steps:
        for key in ("step", "loss", "lr", "step_ms", "tokens_per_s", "tokens_per_s_per_core",
                    "mfu", "phases_ms", "bubble", "bubble_predicted", "bubble_unit",
                    "pipeline_ms", "pipeline_predicted_ms"):
            assert key in r, key
        assert sorted(p["rank"] for p in r["phases_ms"]) == list(range(RANKS))
        for p in r["phases_ms"]:
            assert p["stage"] == p["rank"] % PP
            phases = [p[k] for k in ("forward", "backward", "p2p_wait", "allreduce", "update")]
            assert min(phases) >= 0
            # another rank's clock starts its step a little before rank 0's (it leaves the
            # previous step's gather first): allow a small slack
            assert sum(phases) <= r["step_ms"] * 1.1 + 20, (p, r["step_ms"])
        assert 0.0 <= r["bubble"] <= 1.0
        assert r["bubble_unit"] == pytest.approx((PP - 1) / (M * N + PP - 1))
        # the simulation with this step's measured action costs has no message latency and
        # no start skew between ranks: never much longer than what was measured
        assert 0.0 <= r["bubble_predicted"] <= r["bubble"] + 0.1
        assert r["pipeline_predicted_ms"] <= r["pipeline_ms"] * 1.25 + 5
        assert r["pipeline_ms"] <= r["step_ms"] * 1.1 + 20
        assert 0 < r["mfu"] < 1 and r["tokens_per_s"] > 0
    assert any("val_loss" in r for r in recs)
    assert recs[-1].get("summary") is True and len(recs[-1]["ranks"]) == RANKS


def check_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG, path
    assert len(data) > 5000, (path, len(data))


@pytest.mark.timeout(240)
def test_report_draws_one_run(traced, tmp_path):
    r = run([PY, "-m", "mpigpt2.report", str(traced), "--out", str(tmp_path)])
    assert r.returncode == 0, r.stderr
    for name in ("loss.png", "throughput.png", "timeline.png"):
        check_png(tmp_path / name)
    assert f"timeline of step {STEPS - 1}" in r.stdout  # the last fully traced step
    r = run([PY, "-m", "mpigpt2.report", str(traced), "--out", str(tmp_path / "s0"),
             "--step", "0"])
    assert r.returncode == 0, r.stderr
    check_png(tmp_path / "s0" / "timeline.png")


@pytest.mark.timeout(240)
def test_report_overlays_two_runs(traced, tmp_path, shards):
    other = tmp_path / "one_process"
    r = run(train_cmd(shards, other, "--steps", "2", "--sample-tokens", "0", "--val-steps",
                      "1", "--no-final-checkpoint", "--peak-gflops", "100"))
    assert r.returncode == 0, r.stderr
    out = tmp_path / "pics"
    r = run([PY, "-m", "mpigpt2.report", str(traced), str(other), "--out", str(out)])
    assert r.returncode == 0, r.stderr
    for name in ("loss.png", "throughput.png", "timeline.png"):
        check_png(out / name)
    # the second run has no trace: only the first run's timeline is drawn
    r = run([PY, "-m", "mpigpt2.report", str(other)])
    assert r.returncode == 0, r.stderr
    check_png(other / "loss.png")
    assert not (other / "timeline.png").exists() and "--trace" in r.stdout


def one_error_line(r, message):
    assert r.returncode == 2, (r.stdout, r.stderr)
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0], r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.timeout(240)
def test_report_fails_cleanly(traced, tmp_path):
    one_error_line(run([PY, "-m", "mpigpt2.report", str(tmp_path)]), "no metrics.jsonl")
    one_error_line(run([PY, "-m", "mpigpt2.report", str(tmp_path / "missing")]),
                   "no metrics.jsonl")
    one_error_line(run([PY, "-m", "mpigpt2.report", str(traced), "--out", str(tmp_path),
                        "--step", "99"]), "--step 99")
    assert not (tmp_path / "loss.png").exists()
    blocked = ("import sys; sys.modules['matplotlib'] = None; "  # as if not installed
               "from mpigpt2.base.errors import run_cli; from mpigpt2.report import main; "
               f"sys.exit(run_cli(main, [{str(traced)!r}, '--out', {str(tmp_path)!r}]))")
    one_error_line(run([PY, "-c", blocked]), "pip install 'mpigpt2[plot]'")


# ---------------------------------------------------------------------------------------------
# the stall report: rank 1 (stage 1) sleeps 3 s at step 1, so rank 0 waits for its gradients

STALL = ["--pp", "2", "--microbatches", "2", "--slice-tokens", "8", "--schedule", "1f1b",
         "--steps", "3", "--sample-tokens", "0", "--val-data", "", "--no-final-checkpoint",
         "--peak-gflops", "100", "--inject-delay", "1:1:3", "--stall-seconds", "1"]


@pytest.mark.timeout(240)
def test_stall_report_names_the_missing_message(tmp_path, shards):
    r = run(mpiexec(2) + train_cmd(shards, tmp_path / "o", *STALL), timeout=180)
    assert r.returncode == 0, r.stderr
    # 1F1B on stage 0 (T=32, k=8: n=4): forwards 0F0.0-0F0.3 and 0F1.0, then 0B0.3 needs the
    # gradient of micro-batch 0's last slice from stage 1
    want = (r"\[rank 0\] stalled after \d+s waiting for RECV_B stage=0 mb=0 slice=3 "
            r"\(gradients from stage 1, rank 1\) at step 1")
    assert re.search(want, r.stderr), r.stderr
    assert "step     3/3" in r.stdout  # and the run went on


@pytest.mark.timeout(240)
def test_stall_report_in_a_collective(tmp_path, shards):
    """dp = 2: rank 1 sleeps at step 1, so rank 0 waits in the gradient allreduce."""
    flags = ["--dp", "2", "--steps", "3", "--sample-tokens", "0", "--val-data", "",
             "--no-final-checkpoint", "--peak-gflops", "100", "--inject-delay", "1:1:3",
             "--stall-seconds", "1"]
    r = run(mpiexec(2) + train_cmd(shards, tmp_path / "o", *flags), timeout=180)
    assert r.returncode == 0, r.stderr
    assert re.search(r"\[rank 0\] stalled after \d+s waiting for (\d+ gradient allreduces|the "
                     r"in-node gradient reduction \(every local.s backward\)) at step 1",
                     r.stderr), r.stderr


@pytest.mark.timeout(240)
def test_stall_abort_ends_the_job(tmp_path, shards):
    t0 = time.time()
    r = run(mpiexec(2) + train_cmd(shards, tmp_path / "o", *STALL, "--stall-abort"),
            timeout=120)
    assert r.returncode != 0
    assert "[rank 0] stalled" in r.stderr, r.stderr
    assert "step     3/3" not in r.stdout
    assert time.time() - t0 < 90


def test_metrics_rows_kept_on_resume(tmp_path):
    """A run resumed at step 4 keeps the steps before it and the validation logged right after
    checkpoint 4; a torn last line (a kill mid-write) and the old summary are dropped."""
    from mpigpt2.observe.runlog import rows_before
    lines = [{"step": s, "loss": 1.0 + s} for s in range(6)]
    lines.insert(4, {"step": 4, "val_loss": 0.5})
    lines.insert(2, {"step": 2, "val_loss": 0.7})
    lines.append({"summary": True, "run": {}, "ranks": []})
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"step": 6, "lo')
    kept = rows_before(str(path), 4)
    assert kept == [{"step": 0, "loss": 1.0}, {"step": 1, "loss": 2.0},
                    {"step": 2, "val_loss": 0.7}, {"step": 2, "loss": 3.0},
                    {"step": 3, "loss": 4.0}, {"step": 4, "val_loss": 0.5}]
    assert rows_before(str(tmp_path / "missing.jsonl"), 4) == []
