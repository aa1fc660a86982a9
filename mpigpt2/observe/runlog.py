"""The run's files on rank 0: config.json and metrics.jsonl (one JSON object per line)."""

import json
import math
import os

from mpigpt2.formats.atomic import atomic_write_text
from mpigpt2.formats.lineage import set_aside


class RunLog:
    """metrics.jsonl and config.json in out_dir. A resumed run keeps the rows before its step
    (rows_before); a fresh run starts the file empty. Only rank 0 makes one (the others pass
    None around: log() on None is avoided by the caller)."""

    def __init__(self, out_dir, config, start_step=0):
        os.makedirs(out_dir, exist_ok=True)
        atomic_write_text(os.path.join(out_dir, "config.json"), json.dumps(config, indent=2))
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.kept = rows_before(self.path, start_step) if start_step else []
        self.damaged = None
        if start_step and read_rows(self.path)[1]:  # keep what this rewrite would drop
            self.damaged = set_aside(out_dir, "damaged", copy=[self.path])
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.kept))
        self.file = open(self.path, "a", encoding="utf-8")

    def log(self, row):
        """Append one row; a non-finite number is written as null (NaN is not JSON)."""
        self.file.write(json.dumps(_json_safe(row), allow_nan=False) + "\n")
        self.file.flush()

    def validated_at(self, step):
        """Whether the kept rows hold the validation at `step` (done before an interruption)."""
        return any("val_loss" in r and r["step"] == step for r in self.kept)

    def close(self):
        self.file.close()


def rows_before(path, step):
    """The metrics rows a run resumed at `step` keeps: every step row before it and the
    validation at `step` itself (it was logged after that step's checkpoint). Lines that do
    not parse (a run killed while writing one, or damage) and the old summary are dropped."""
    return [r for r in read_rows(path)[0]
            if r["step"] < step or (r["step"] == step and "val_loss" in r and "loss" not in r)]


def read_rows(path):
    """(rows, damaged): the step rows of a metrics.jsonl that parse (objects with an integer
    step, summaries left out) and the count of lines other than a torn last one that do not."""
    try:
        with open(path, "rb") as f:
            lines = f.read().split(b"\n")
    except OSError:
        return [], 0
    rows, damaged = [], 0
    for i, line in enumerate(lines):
        try:
            r = json.loads(line.decode("utf-8"))
        except (ValueError, RecursionError):  # (UnicodeDecodeError is a ValueError)
            damaged += bool(line.strip()) and i < len(lines) - 1
            continue
        if isinstance(r, dict) and r.get("summary"):
            continue
        if not isinstance(r, dict) or not isinstance(r.get("step"), int) or \
                isinstance(r["step"], bool):
            damaged += 1
            continue
        rows.append(r)
    return rows, damaged


def _json_safe(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    return v
