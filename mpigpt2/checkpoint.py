"""Checkpoints: the full model as llm.c's .bin plus training state independent of the layout.

OUT/checkpoints/step_00000010/ holds model.bin (fp32, loadable by llm.c and by --model),
adam_m.bin and adam_v.bin (the Adam moments in the same tensor layout as the model, so they are
keyed by parameter name and offset, not by rank), params64.bin for float64 runs, state.json
(step, data position, seed, resolved config, sizes and sha256 of every file) and DONE, the
completion marker. Files are written into a hidden temp directory, fsynced, then DONE, then the
directory is renamed into place: a checkpoint without DONE never counts.
"""

import hashlib
import json
import os
import shutil

from mpigpt2.errors import UserError
from mpigpt2.fileio import atomic_write_text, fsync_dir
from mpigpt2.llmc import write_model, read_header, load_params

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
    """Write one checkpoint from global tensors (rank 0 only); prune to the newest keep.

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
            if os.environ.get("MPIGPT2_TEST_CRASH_IN_CHECKPOINT") == str(step):
                os._exit(9)  # tests: a crash half-way through a checkpoint write
        state = dict(state, format=FORMAT, version=VERSION, step=step, files={
            name: {"bytes": os.path.getsize(os.path.join(tmp, name)),
                   "sha256": sha256(os.path.join(tmp, name))} for name in files})
        atomic_write_text(os.path.join(tmp, "state.json"), json.dumps(state, indent=1))
        atomic_write_text(os.path.join(tmp, DONE), f"{step}\n")
        if os.path.exists(final):  # an older incomplete or repeated one
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(root)
    except (OSError, UserError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        what = getattr(e, "strerror", None) or str(e)
        raise UserError(f"checkpoint {final} could not be written ({what}); earlier checkpoints "
                        f"are untouched — free space or fix --out-dir and resume")
    for _, old in complete(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


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
        with open(sp, encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"checkpoint state {sp} is unreadable ({e}); pick another checkpoint")
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{sp} is not a mpigpt2 checkpoint state file")
    if state.get("version") != VERSION:
        raise UserError(f"{sp} has checkpoint version {state.get('version')}; this mpigpt2 "
                        f"reads version {VERSION}")
    for key in ("step", "model", "dtype", "batch_size", "seq_len", "data", "files"):
        if key not in state:
            raise UserError(f"{sp} lacks {key!r}; the checkpoint is damaged")
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


def verify_hashes(path, state):
    for name, info in state["files"].items():
        if sha256(os.path.join(path, name)) != info["sha256"]:
            raise UserError(f"checkpoint file {os.path.join(path, name)} fails its sha256 "
                            f"check; the checkpoint is corrupt — resume from another one")


def check_compatible(state, cfg, dtype, B, T, data_files, path):
    """Refuse a resume that would silently change the run: model shape, data, B, T, dtype."""
    if state["model"] != cfg.as_dict():
        raise UserError(f"--resume {path}: the checkpoint's model {state['model']} differs from "
                        f"--model ({cfg.as_dict()}); resume with the same model")
    if state["dtype"] != dtype:
        raise UserError(f"--resume {path}: the checkpoint is {state['dtype']}, --dtype is {dtype}")
    if (state["batch_size"], state["seq_len"]) != (B, T):
        raise UserError(f"--resume {path}: saved with --batch-size {state['batch_size']} "
                        f"--seq-len {state['seq_len']}; resume with the same values")
    if state["data"]["train"] != data_files:
        raise UserError(f"--resume {path}: the training data changed (saved "
                        f"{state['data']['train']}, now {data_files}); resume with the same "
                        f"--train-data")


def data_identity(paths):
    """How a data set is recognised on resume: file names, sizes and token counts."""
    return [[os.path.basename(p), os.path.getsize(p)] for p in paths]


def load_into(path, state, spec, params, m, v, fp64):
    """Fill one stage's parameter, Adam m and v views from a checkpoint."""
    load_params(os.path.join(path, "params64.bin" if fp64 else "model.bin"), spec, params,
                allow_fp64=True)
    load_params(os.path.join(path, "adam_m.bin"), spec, m, allow_fp64=True)
    load_params(os.path.join(path, "adam_v.bin"), spec, v, allow_fp64=True)
