"""Checkpoint lineage: which checkpoints a run descends from, and setting the others aside.

Every training session (a fresh start, or one resume) has a random id. A checkpoint's
state.json records its lineage: the sessions it descends from with the step each one started
at, [[id_0, 0], [id_1, s_1], ..., [id_n, s_n]]. A checkpoint of session i at step t belongs to
a run's lineage when session i is in it and s_i < t <= s_(i+1) (the next session resumed at
s_(i+1), so session i's later checkpoints are an abandoned branch); the current session owns
every step after its start. Checkpoints written before lineages existed count as one session
"legacy" that started at step 0.

Nothing is deleted here: checkpoints outside the lineage, and the run files a new run would
replace, are moved (or copied) into OUT/<kind>-N/. (docs/design.md#checkpoints)
"""

import json
import os
import secrets
import shutil

from mpigpt2.formats.atomic import fsync_dir

LEGACY = "legacy"
RUN_FILES = ("metrics.jsonl", "config.json", "trace.json")


def of_state(state):
    """The lineage a checkpoint's state.json records (a legacy one for older checkpoints)."""
    lineage = state.get("lineage") if isinstance(state, dict) else None
    return lineage if valid(lineage) else [[LEGACY, 0]]


def valid(lineage):
    """A list of [id, start step] pairs with string ids and non-decreasing int steps from 0."""
    if not isinstance(lineage, list) or not lineage:
        return False
    steps = []
    for entry in lineage:
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)
                and isinstance(entry[1], int) and not isinstance(entry[1], bool)):
            return False
        steps.append(entry[1])
    return steps[0] == 0 and steps == sorted(steps)


def new_session(parent_state, start_step):
    """The lineage of a session starting at start_step from a checkpoint (None: fresh)."""
    base = of_state(parent_state) if parent_state is not None else []
    return base + [[secrets.token_hex(8), int(start_step)]]


def belongs(lineage, state):
    """Whether the checkpoint with this state.json is in the lineage (an ancestor of the
    current session's start, or written by the current session)."""
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        return False
    sid, step = of_state(state)[-1][0], state["step"]
    for i, (lid, start) in enumerate(lineage):
        end = lineage[i + 1][1] if i + 1 < len(lineage) else None
        if lid == sid and start <= step and (end is None or step <= end):
            return True
    return False


def read_state_quietly(path):
    """A checkpoint's state.json as a dict, or None if it cannot be read (never raises)."""
    try:
        with open(os.path.join(path, "state.json"), "rb") as f:
            state = json.loads(f.read(1 << 20).decode("utf-8"))
        return state if isinstance(state, dict) else None
    except (OSError, ValueError, RecursionError):
        return None


def free_slot(out_dir, kind):
    """OUT/<kind>-N for the smallest N not taken."""
    n = 1
    while os.path.lexists(os.path.join(out_dir, f"{kind}-{n}")):
        n += 1
    return os.path.join(out_dir, f"{kind}-{n}")


def set_aside(out_dir, kind, move=(), copy=()):
    """Move (os.replace) and copy the given paths inside out_dir into a new OUT/<kind>-N,
    keeping their paths relative to out_dir; returns that directory, or None if both lists
    are empty. Copies go first, so a crash leaves at worst an extra copy, never a loss."""
    if not move and not copy:
        return None
    dest = free_slot(out_dir, kind)
    os.makedirs(dest)
    for src in copy:
        target = os.path.join(dest, os.path.relpath(src, out_dir))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(src, target)
    for src in move:
        target = os.path.join(dest, os.path.relpath(src, out_dir))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.replace(src, target)
        fsync_dir(os.path.dirname(src))
    fsync_dir(dest)
    fsync_dir(out_dir)
    return dest


def run_files(out_dir):
    """The run files present in out_dir (metrics.jsonl, config.json, trace.json)."""
    return [p for p in (os.path.join(out_dir, n) for n in RUN_FILES) if os.path.isfile(p)]
