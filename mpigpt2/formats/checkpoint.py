"""Checkpoints: the full model as llm.c's .bin plus training state independent of the layout.

OUT/checkpoints/step_00000010/ holds model.bin (fp32, loadable by llm.c and by --model),
adam_m.bin and adam_v.bin (the Adam moments in the same tensor layout as the model, so they are
keyed by parameter name and offset, not by rank), params64.bin for float64 runs, state.json
(step, data position, seed, resolved config, lineage, sizes and sha256 of every file) and DONE,
the completion marker, which holds the step and the sha256 of state.json (so state.json is
covered too). Files are written into a hidden temp directory, fsynced, then DONE, then the
directory is renamed into place: a checkpoint without DONE never counts.
(docs/design.md#checkpoints)
"""

import hashlib
import json
import os
import shutil

from mpigpt2.base.errors import UserError
from mpigpt2.base.files import open_regular
from mpigpt2.formats import lineage as lin
from mpigpt2.formats.atomic import atomic_write_text, publish_dir
from mpigpt2.formats.llmc import write_model, read_header, load_params

FORMAT = "mpigpt2-checkpoint"
VERSION = 1
DONE = "DONE"
SUBDIR = "checkpoints"
MAX_STATE_BYTES = 1 << 20


def step_dir(root, step):
    return os.path.join(root, f"step_{step:08d}")


def complete(root):
    """(step, path) of every complete checkpoint under root, oldest first."""
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if name.startswith("step_") and name[5:].isdigit() and \
                os.path.exists(os.path.join(path, DONE)):
            out.append((int(name[5:]), path))
    return sorted(out)


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def write(root, step, cfg, params, m, v, state, keep, fp64):
    """Write one checkpoint from global tensors (rank 0 only); prune the run's own lineage
    (state["lineage"]) to its newest keep; other checkpoints are never touched.

    Raises UserError (after removing the partial temp directory) if the disk refuses.
    """
    final = step_dir(root, step)
    tmp = os.path.join(root, f".tmp-step_{step:08d}")
    try:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        files = {"model.bin": (params, False), "adam_m.bin": (m, fp64), "adam_v.bin": (v, fp64)}
        if fp64:
            files["params64.bin"] = (params, True)
        for name, (tensors, as64) in files.items():
            write_model(os.path.join(tmp, name), cfg, tensors, fp64=as64)
        state = dict(state, format=FORMAT, version=VERSION, step=step, files={
            name: {"bytes": os.path.getsize(os.path.join(tmp, name)),
                   "sha256": sha256(os.path.join(tmp, name))} for name in files})
        atomic_write_text(os.path.join(tmp, "state.json"), json.dumps(state, indent=1))
        atomic_write_text(os.path.join(tmp, DONE),
                          f"{step} {sha256(os.path.join(tmp, 'state.json'))}\n")
        publish_dir(tmp, final)  # a repeated step: the old one stays until the new is in place
    except (OSError, UserError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        what = getattr(e, "strerror", None) or str(e)
        raise UserError(f"checkpoint {final} could not be written ({what}); earlier checkpoints "
                        f"are untouched — free space or fix --out-dir and resume")
    prune(root, state["lineage"], keep)
    return final


def prune(root, lineage, keep):
    """Delete all but the newest `keep` complete checkpoints of this lineage (0: keep all)."""
    if keep <= 0:
        return
    mine = [path for _, path in complete(root)
            if lin.belongs(lineage, lin.read_state_quietly(path))]
    for old in mine[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def find(out_dir, resume):
    """The checkpoint directory to resume from: resume is 'auto' (newest complete under
    OUT/checkpoints, or None if there is none) or a path to a checkpoint directory."""
    if resume == "auto":
        found = complete(os.path.join(out_dir, SUBDIR))
        return found[-1][1] if found else None
    if not os.path.isdir(resume):
        raise UserError(f"--resume {resume}: no such checkpoint directory")
    if not os.path.exists(os.path.join(resume, DONE)):
        raise UserError(f"--resume {resume}: checkpoint is incomplete (no {DONE} marker); "
                        f"pick a complete one or use --resume auto")
    return resume


def read_state(path):
    """Validate a checkpoint directory (state.json, every file's size and header) cheaply."""
    sp = os.path.join(path, "state.json")
    try:
        if os.path.getsize(sp) > MAX_STATE_BYTES:
            raise UserError(f"{sp} is implausibly large; not a mpigpt2 checkpoint")
        with open_regular(sp, "checkpoint state", "rb") as f:
            state = json.loads(f.read(MAX_STATE_BYTES + 1).decode("utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise UserError(f"checkpoint state {sp} is unreadable ({e}); pick another checkpoint")
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{sp} is not a mpigpt2 checkpoint state file")
    if state.get("version") != VERSION:
        raise UserError(f"{sp} has checkpoint version {state.get('version')}; this mpigpt2 "
                        f"reads version {VERSION}")
    _check_schema(state, sp)
    _check_done(path, state)
    for name, info in state["files"].items():
        fp = os.path.join(path, name)
        if not os.path.exists(fp) or os.path.getsize(fp) != info["bytes"]:
            raise UserError(f"checkpoint file {fp} is missing or has the wrong size "
                            f"(expected {info['bytes']} bytes); the checkpoint is damaged")
        cfg, _ = read_header(fp, allow_fp64=True)
        if cfg.as_dict() != state["model"]:
            raise UserError(f"checkpoint file {fp} holds a different model shape than its "
                            f"state.json; the checkpoint is damaged")
    return state


def _check_done(path, state):
    """DONE holds the step and the sha256 of state.json (older checkpoints: the step alone);
    both, and a step_N directory name, must agree with state.json."""
    sp, dp = os.path.join(path, "state.json"), os.path.join(path, DONE)
    try:
        with open_regular(dp, "checkpoint marker", "rb") as f:
            words = f.read(200).decode("ascii").split()
    except (OSError, ValueError, RecursionError):
        words = []
    step = state["step"]
    if not words or words[0] != str(step) or len(words) > 2 or \
            (len(words) == 2 and words[1] != sha256(sp)):
        raise UserError(f"{sp} does not match its {DONE} marker (edited or damaged: step or "
                        f"sha256 differ); the checkpoint is damaged — resume from another one")
    name = os.path.basename(os.path.normpath(path))
    if name.startswith("step_") and name[5:].isdigit() and int(name[5:]) != step:
        raise UserError(f"checkpoint {path} holds step {step}, not the step its name says; "
                        f"it was renamed or edited — resume from another one")


FILE_NAMES = ("model.bin", "adam_m.bin", "adam_v.bin", "params64.bin")


def _check_schema(state, sp):
    """Every field resume relies on is present and of the right type (a hand-edited or
    damaged state.json is refused here, not with a traceback later)."""
    def bad(what):
        raise UserError(f"{sp}: {what}; the checkpoint is damaged — resume from another one")

    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    for key in ("step", "model", "dtype", "batch_size", "seq_len", "data", "files"):
        if key not in state:
            bad(f"lacks {key!r}")
    if not is_int(state["step"]) or not is_int(state["batch_size"]) or \
            not is_int(state["seq_len"]):
        bad("step, batch_size and seq_len must be non-negative integers")
    if not isinstance(state["model"], dict) or state["dtype"] not in ("float32", "float64"):
        bad("model must be an object and dtype float32 or float64")
    files = state["files"]
    if not isinstance(files, dict) or not {"model.bin", "adam_m.bin", "adam_v.bin"} <= set(files) \
            or not set(files) <= set(FILE_NAMES):
        bad(f"files must list model.bin, adam_m.bin, adam_v.bin (and only {FILE_NAMES})")
    for name, info in files.items():
        if not isinstance(info, dict) or not is_int(info.get("bytes")) or \
                not isinstance(info.get("sha256"), str):
            bad(f"files[{name!r}] needs an integer 'bytes' and a 'sha256' string")
    data = state["data"]
    loader = data.get("loader") if isinstance(data, dict) else None
    if not isinstance(loader, dict) or not isinstance(data.get("train"), list) or \
            not all(is_int(loader.get(k)) for k in ("epoch", "shard", "position")):
        bad("data must hold the train file list and the loader's epoch, shard and position")
    if "args" in state and not isinstance(state["args"], dict):
        bad("args must be an object")
    if "seed" in state and not (isinstance(state["seed"], int) and
                                not isinstance(state["seed"], bool)):
        bad("seed must be an integer")
    if "layout" in state and not isinstance(state["layout"], dict):
        bad("layout must be an object")
    if "lineage" in state and not lin.valid(state["lineage"]):
        bad("lineage must be a list of [session id, start step] pairs")


def verify_hashes(path, state):
    for name, info in state["files"].items():
        if sha256(os.path.join(path, name)) != info["sha256"]:
            raise UserError(f"checkpoint file {os.path.join(path, name)} fails its sha256 "
                            f"check; the checkpoint is corrupt — resume from another one")


def data_identity(paths):
    """How a data set is recognised on resume: file names, sizes and token counts."""
    return [[os.path.basename(p), os.path.getsize(p)] for p in paths]


def load_into(path, state, spec, params, m, v, fp64):
    """Fill one stage's parameter, Adam m and v views from a checkpoint."""
    load_params(os.path.join(path, "params64.bin" if fp64 else "model.bin"), spec, params,
                allow_fp64=True)
    load_params(os.path.join(path, "adam_m.bin"), spec, m, allow_fp64=True)
    load_params(os.path.join(path, "adam_v.bin"), spec, v, allow_fp64=True)
