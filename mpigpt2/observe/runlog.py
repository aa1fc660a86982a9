"""The run's files on rank 0: config.json and metrics.jsonl (one JSON object per line)."""

import json
import os

from mpigpt2.formats.atomic import atomic_write_text


class RunLog:
    """metrics.jsonl and config.json in out_dir. A resumed run keeps the rows before its step
    (rows_before); a fresh run starts the file empty. Only rank 0 makes one (the others pass
    None around: log() on None is avoided by the caller)."""

    def __init__(self, out_dir, config, start_step=0):
        os.makedirs(out_dir, exist_ok=True)
        atomic_write_text(os.path.join(out_dir, "config.json"), json.dumps(config, indent=2))
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.kept = rows_before(self.path, start_step) if start_step else []
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.kept))
        self.file = open(self.path, "a", encoding="utf-8")

    def log(self, row):
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()

    def validated_at(self, step):
        """Whether the kept rows hold the validation at `step` (done before an interruption)."""
        return any("val_loss" in r and r["step"] == step for r in self.kept)

    def close(self):
        self.file.close()


def rows_before(path, step):
    """The metrics rows a run resumed at `step` keeps: every step row before it and the
    validation at `step` itself (it was logged after that step's checkpoint). Lines that do
    not parse (a run killed while writing one) and the old summary are dropped."""
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except OSError:
        return rows
    for line in lines:
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if not isinstance(r, dict) or r.get("summary") or not isinstance(r.get("step"), int):
            continue
        if r["step"] < step or (r["step"] == step and "val_loss" in r and "loss" not in r):
            rows.append(r)
    return rows
