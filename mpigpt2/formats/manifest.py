"""The manifest prepare writes beside its shards, and the checks that use it (prepare's resume,
train's data loading). (docs/design.md#preparing-corpora)"""

import hashlib
import json
import os

from mpigpt2.base.errors import UserError
from mpigpt2.formats.atomic import atomic_write_text
from mpigpt2.formats.shards import HEADER_BYTES
from mpigpt2.formats.tokenizer import ENCODER_JSON_SHA256, EOT, VOCAB_BPE_SHA256

NAME = "manifest.json"
FORMAT = "mpigpt2-prepare"
VERSION = 1
TOKENIZER = {"name": "gpt2", "vocab_bpe_sha256": VOCAB_BPE_SHA256,
             "encoder_json_sha256": ENCODER_JSON_SHA256, "eot": EOT}
_HINT = "re-run `python -m mpigpt2.prepare` with the same inputs and options"


def path_in(out_dir):
    return os.path.join(out_dir, NAME)


def new(inputs, options):
    """A manifest for a run that has written nothing yet."""
    return {"format": FORMAT, "version": VERSION, "tokenizer": TOKENIZER, "options": options,
            "inputs": inputs, "shards": [], "complete": False, "totals": {}}


def write(out_dir, manifest):
    """Replace the manifest atomically (after every shard: it is the resume point)."""
    atomic_write_text(path_in(out_dir), json.dumps(manifest, indent=1) + "\n")


def read(out_dir):
    """The manifest in out_dir, or None; UserError if it is not one of ours."""
    p = path_in(out_dir)
    if not os.path.exists(p):
        return None
    try:
        with open(p, encoding="utf-8") as f:
            m = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{p}: unreadable manifest ({e}) — delete the directory and "
                        "re-run prepare") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT or m.get("version") != VERSION:
        raise UserError(f"{p} is not a version-{VERSION} mpigpt2 prepare manifest — delete it "
                        "(and the shards beside it) or use another --out-dir")
    return m


def difference(old, new_manifest):
    """None if old describes the same run (tokenizer, options, input contents), else why not."""
    for key in ("tokenizer", "options"):
        a, b = old.get(key, {}), new_manifest[key]
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return f"{key} {k}: {a.get(k)!r} there, {b.get(k)!r} now"
    a = [(i["size"], i["sha256"]) for i in old.get("inputs", [])]
    b = [(i["size"], i["sha256"]) for i in new_manifest["inputs"]]
    if a != b:
        return f"inputs: {len(a)} files there, {len(b)} now, or their contents differ"
    return None


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(1 << 20):
            h.update(b)
    return h.hexdigest()


def shard_ok(out_dir, entry):
    """True if the shard file exists with the recorded size and sha256."""
    p = os.path.join(out_dir, entry["name"])
    try:
        if os.path.getsize(p) != HEADER_BYTES + 2 * entry["tokens"]:
            return False
        return file_sha256(p) == entry["sha256"]
    except OSError:
        return False


def check_shard(path, cache):
    """For train: if path's directory holds a manifest, path must be a listed, intact shard of
    a finished run. cache: dict out_dir -> manifest, shared over calls."""
    out_dir = os.path.dirname(os.path.abspath(path))
    if out_dir not in cache:
        cache[out_dir] = read(out_dir)
    m = cache[out_dir]
    if m is None:
        return
    name = os.path.basename(path)
    if not m.get("complete"):
        raise UserError(f"{path}: prepare has not finished this directory (its {NAME} says "
                        f"incomplete) — {_HINT} to finish it")
    entry = next((s for s in m["shards"] if s["name"] == name), None)
    if entry is None:
        raise UserError(f"{path} is not listed in {path_in(out_dir)}: not made by that run — "
                        "move it elsewhere or re-run prepare")
    if not shard_ok(out_dir, entry):
        raise UserError(f"{path} differs from {path_in(out_dir)} (size or sha256): changed or "
                        f"damaged since prepare wrote it — {_HINT}")
