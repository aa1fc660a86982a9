"""One token stream cut into fixed-size llm.c shards, each published atomically and recorded in
the manifest with the point where the next shard starts (so a rerun can resume there).
(docs/design.md#preparing-corpora)"""

import glob
import os

from mpigpt2.formats import manifest as mf
from mpigpt2.formats.atomic import interrupts_held
from mpigpt2.formats.shards import ShardWriter

SHARD_GLOBS = [f"*_{split}_" + "[0-9]" * 6 + ".bin" for split in ("val", "train")]


def shard_name(prefix, split, i):
    """llm.c's naming (dev/data/fineweb.py): the shard index counts val and train together."""
    return f"{prefix}_{split}_{i:06d}.bin"


def foreign_shards(out_dir):
    """Token shards already in out_dir (for refusing a directory another run filled)."""
    return sorted(p for g in SHARD_GLOBS for p in glob.glob(os.path.join(glob.escape(out_dir), g)))


def remove_temps(out_dir):
    """Drop temp files an interrupted (killed) run left behind; they never had a final name."""
    for p in glob.glob(os.path.join(glob.escape(out_dir), ".*.tmp")):
        os.unlink(p)


def discard(out_dir, manifest):
    """Remove every shard the manifest lists, then the manifest: a run bad input stopped."""
    for s in manifest["shards"]:
        try:
            os.unlink(os.path.join(out_dir, s["name"]))
        except FileNotFoundError:
            pass
    try:
        os.unlink(mf.path_in(out_dir))
    except FileNotFoundError:
        pass


class ShardStream:
    """Tokens in, shards out. Shard 0 holds the first val_tokens tokens (if > 0), every other
    shard shard_tokens; shards 0..val_shards-1 (or shard 0 with val_tokens) are 'val'."""

    def __init__(self, out_dir, manifest):
        o = manifest["options"]
        self.out_dir, self.m = out_dir, manifest
        self.prefix, self.shard_tokens = o["prefix"], o["shard_tokens"]
        self.val_tokens, self.val_shards = o["val_tokens"], o["val_shards"]
        self.writer = None
        last = manifest["shards"][-1] if manifest["shards"] else None
        self.resume_block = last["next_block"] if last else 0
        self.resume_offset = last["next_offset"] if last else 0
        self.counts = dict(last["before"]) if last else {"docs": 0, "bad": 0, "first_bad": ""}
        self.blocks_seen = self.resume_block

    def _capacity(self, i):
        return self.val_tokens if i == 0 and self.val_tokens > 0 else self.shard_tokens

    def _split(self, i):
        val = (i == 0 and self.val_tokens > 0) or i < self.val_shards
        return "val" if val else "train"

    def put(self, k, encoded):
        """Append block k's tokens (the first resume_offset of them already sit in shards
        when k is the block the run resumes at)."""
        toks = encoded.tokens
        used = self.resume_offset if k == self.resume_block else 0
        before = dict(self.counts)
        while used < len(toks):
            if self.writer is None:
                i = len(self.m["shards"])
                name = shard_name(self.prefix, self._split(i), i)
                with interrupts_held():  # created and recorded as one: abort() finds it
                    self.writer = ShardWriter(os.path.join(self.out_dir, name))
            room = self._capacity(len(self.m["shards"])) - self.writer.count
            n = min(room, len(toks) - used)
            self.writer.write(toks[used:used + n])
            used += n
            if n == room:
                self._close(k, used, before)
        self.counts["docs"] += encoded.docs
        self.counts["bad"] += encoded.bad
        self.counts["first_bad"] = self.counts["first_bad"] or encoded.first_bad
        self.blocks_seen = k + 1

    def _close(self, next_block, next_offset, before):
        w = self.writer
        w.commit()  # an interrupt in here still finds it in self.writer, and abort() cleans up
        self.writer = None
        self.m["shards"].append({
            "name": os.path.basename(w.path), "split": self._split(len(self.m["shards"])),
            "tokens": w.count, "sha256": mf.file_sha256(w.path),
            "next_block": next_block, "next_offset": next_offset, "before": before})
        mf.write(self.out_dir, self.m)

    def tokens(self):
        done = sum(s["tokens"] for s in self.m["shards"])
        return done + (self.writer.count if self.writer else 0)

    def finish(self):
        """Publish the last, partial shard and mark the run complete in the manifest."""
        if self.writer is not None and self.writer.count:
            self._close(self.blocks_seen, 0, dict(self.counts))
        self.m["complete"] = True
        self.m["totals"] = {"tokens": self.tokens(), "shards": len(self.m["shards"]),
                            "documents": self.counts["docs"], "skipped": self.counts["bad"]}
        mf.write(self.out_dir, self.m)

    def abort(self):
        """Drop the open (temp) shard; published shards stay for a resume."""
        if self.writer is not None:
            self.writer.abort()
            self.writer = None
