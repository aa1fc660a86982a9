"""The run's output directory: checked before any compute, and whatever an earlier run left
there that this run would replace is kept (moved or copied aside, never deleted).

    OUT/checkpoints/step_N/   this run's lineage only (formats/lineage.py)
    OUT/prev-N/               a fresh run's predecessor: its checkpoints/, metrics.jsonl, ...
    OUT/abandoned-N/          checkpoints outside the resumed lineage, with a copy of the
                              metrics.jsonl and config.json that describe them
(docs/design.md#checkpoints)
"""

import os
import stat

from mpigpt2.base.errors import UserError
from mpigpt2.base.files import check_writable
from mpigpt2.formats import checkpoint as ck
from mpigpt2.formats import lineage as lin


def check_out_dir(out_dir):
    """--out-dir can hold this run's files: refuse "" and every path that would fail only
    after training (a file at OUT or OUT/checkpoints, a directory at OUT/metrics.jsonl ...)."""
    if not out_dir or not out_dir.strip():
        raise UserError("--out-dir is empty; give a directory for checkpoints and metrics")
    check_writable(out_dir, "--out-dir")
    root = os.path.join(out_dir, ck.SUBDIR)
    if os.path.lexists(root) and not os.path.isdir(root):
        raise UserError(f"--out-dir {out_dir}: {root} exists and is not a directory (a file or "
                        f"a broken symlink); move it away — checkpoints are written there")
    if os.path.isdir(root):
        check_writable(root, "--out-dir")
    for name in lin.RUN_FILES:
        path = os.path.join(out_dir, name)
        if os.path.lexists(path) and not _regular(path):
            raise UserError(f"--out-dir {out_dir}: {path} exists and is not a regular file; "
                            f"move it away — the run writes its {name} there")


def _regular(path):
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def keep_earlier(out_dir, resume_state, lineage):
    """Before this run writes anything (rank 0): set aside what it would replace or mix up.
    Returns the notes to print."""
    root = os.path.join(out_dir, ck.SUBDIR)
    if resume_state is None:  # a fresh run: the earlier run's files go to OUT/prev-N
        move = ([root] if ck.complete(root) else []) + lin.run_files(out_dir)
        dest = lin.set_aside(out_dir, "prev", move=move)
        if dest is None:
            return []
        names = ", ".join(os.path.basename(p) for p in move)
        return [f"note: {out_dir} held an earlier run's {names} (not resumed): moved them to "
                f"{dest}"]
    stray = [(step, path) for step, path in ck.complete(root)
             if not lin.belongs(lineage, lin.read_state_quietly(path))]
    dest = lin.set_aside(out_dir, "abandoned", move=[p for _, p in stray],
                         copy=lin.run_files(out_dir) if stray else [])
    if dest is None:
        return []
    steps = ", ".join(str(s) for s, _ in stray)
    return [f"note: checkpoints at step {steps} in {root} are not in the resumed lineage (an "
            f"abandoned branch or another run): moved them, with a copy of this directory's "
            f"run files, to {dest}; --resume auto will not pick them"]
