"""Per-rank event traces merged into one Chrome-trace JSON (Perfetto, chrome://tracing).

Timestamps are microseconds since a barrier that all ranks pass at start (a common clock to
within the barrier's skew). A disabled tracer is None at every call site, so tracing off costs
one `is not None` test per event.
"""

import json
import os
import time

from mpigpt2.formats.atomic import atomic_write_text


class Tracer:
    """Collects complete ('X') and instant ('i') events of one rank."""

    def __init__(self, rank, stage, replica):
        self.rank, self.stage, self.replica = rank, stage, replica
        self.t0 = time.perf_counter()
        self.events = []
        self.step = -1

    def align(self):
        """Call right after a barrier: that instant is time zero on every rank."""
        self.t0 = time.perf_counter()

    def span(self, name, cat, t_start, t_end, **args):
        self.events.append((name, cat, "X", t_start, t_end, self.step, args))

    def instant(self, name, cat, **args):
        t = time.perf_counter()
        self.events.append((name, cat, "i", t, t, self.step, args))

    def chrome_events(self):
        out = []
        for name, cat, ph, a, b, step, args in self.events:
            e = {"name": name, "cat": cat, "ph": ph, "pid": 0, "tid": self.rank,
                 "ts": round((a - self.t0) * 1e6, 3), "args": dict(args, step=step)}
            if ph == "X":
                e["dur"] = round((b - a) * 1e6, 3)
            else:
                e["s"] = "t"
            out.append(e)
        return out


def merge(per_rank, path, meta=None):
    """Write the events of all ranks (lists from chrome_events, with (rank, pipe rank,
    replica)) as one trace with a named row per rank (pid 0, "measured"), and beside it the
    schedule simulated with the measured compute durations (pid 1, "predicted":
    observe/predict.py)."""
    from mpigpt2.observe.predict import chrome_events as predicted
    events = [{"name": "process_name", "ph": "M", "pid": pid, "args": {"name": name}}
              for pid, name in ((0, "measured"), (1, "predicted (measured action costs)"))]
    for (rank, stage, replica), evs in per_rank:
        for pid in (0, 1):
            events.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": rank,
                           "args": {"name": f"rank {rank} (stage {stage}, replica {replica})"}})
            events.append({"name": "thread_sort_index", "ph": "M", "pid": pid, "tid": rank,
                           "args": {"sort_index": rank}})
        events.extend(evs)
    events.extend(predicted(per_rank))
    doc = {"traceEvents": events, "displayTimeUnit": "ms", "metadata": meta or {}}
    atomic_write_text(path, json.dumps(doc))
    return path


def load(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)["traceEvents"]


def trace_path(out_dir):
    return os.path.join(out_dir, "trace.json")
