"""Row 11's sub-benchmark: `python -m mpigpt2.prepare jsonl` on a generated corpus (zstd JSON
Lines, several files), timed, with the peak RSS of its whole process tree.

    python bench/prepare_corpus.py --mb 200 --workers 1 2 [--cache DIR]

Prints one BENCH_JSON line per worker count: tokens, seconds, tokens/s, input MB/s (decompressed),
peak RSS (sum over the writer and its workers, polled every 20 ms) and the largest single process.
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import mpigpt2  # noqa: F401 - first: numpy's BLAS kernels as the trainer picks them
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit  # noqa: E402

FILES = 4
POLL_S = 0.02


def words(rng, n=6000):
    """Pseudo-words with English-like lengths plus some non-ASCII ones."""
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    p = np.array([12.7, 9.1, 8.2, 7.5, 7.0, 6.7, 6.3, 6.1, 6.0, 4.3, 4.0, 2.8, 2.8, 2.4, 2.4,
                  2.2, 2.0, 2.0, 1.9, 1.5, 1.0, 0.8, 0.15, 0.15, 0.1, 0.07])
    out = ["".join(rng.choice(letters, size=int(rng.integers(1, 11)), p=p / p.sum()))
           for _ in range(n)]
    return out + ["café", "naïve", "東京", "Ελληνικά", "данные", "🚀", "3.14159", "2024"]


def generate(directory, mb, seed=0):
    """FILES zstd-compressed JSON Lines files holding about mb MB of documents."""
    import zstandard
    rng = np.random.default_rng(seed)
    vocab = np.array(words(rng))
    per_file = mb * 2**20 // FILES
    paths = []
    for i in range(FILES):
        p = os.path.join(directory, f"part{i:03d}.jsonl.zst")
        cctx = zstandard.ZstdCompressor(level=3)
        with open(p, "wb") as raw, cctx.stream_writer(raw) as w:
            done = 0
            while done < per_file:
                lines = []
                for _ in range(200):
                    n = int(rng.integers(50, 1500))
                    text = " ".join(vocab[rng.integers(0, len(vocab), n)])
                    text = text.replace(" e ", ".\n\n", 3)  # some paragraphs
                    lines.append(json.dumps({"text": text, "id": done}))
                blob = ("\n".join(lines) + "\n").encode()
                w.write(blob)
                done += len(blob)
        paths.append(p)
    return paths


def tree_rss(pid):
    """Sum of the resident set sizes (bytes) of pid and its descendants."""
    total, todo = 0, [pid]
    page = os.sysconf("SC_PAGE_SIZE")
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * page
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo += [int(x) for x in f.read().split()]
        except OSError:
            pass
    return total


def measure(paths, workers, out):
    """Run prepare once; its wall time, peak tree RSS and stdout."""
    cmd = [sys.executable, "-m", "mpigpt2.prepare", "jsonl", *paths, "--out-dir", out,
           "--workers", str(workers), "--quiet"]
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    while p.poll() is None:
        peak = max(peak, tree_rss(p.pid))
        time.sleep(POLL_S)
    wall = time.perf_counter() - t0
    out_s, err = p.communicate(timeout=60)
    if p.returncode != 0:
        raise SystemExit(f"prepare failed ({p.returncode}): {err.strip()[-2000:]}")
    return wall, peak, out_s


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=200, help="corpus size, MB of JSON Lines")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--cache", default=None, help="keep the generated corpus in this dir")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="prepare-bench-")
    try:
        cdir = args.cache or os.path.join(tmp, "corpus")
        os.makedirs(cdir, exist_ok=True)
        paths = sorted(os.path.join(cdir, f) for f in os.listdir(cdir) if f.endswith(".zst"))
        if len(paths) != FILES:
            paths = generate(cdir, args.mb)
        raw = sum(os.path.getsize(p) for p in paths)
        for w in args.workers:
            out = os.path.join(tmp, f"out{w}")
            wall, peak, stdout = measure(paths, w, out)
            with open(os.path.join(out, "manifest.json")) as f:
                totals = json.load(f)["totals"]
            emit({"workers": w, "mb": args.mb, "compressed_bytes": raw,
                  "tokens": totals["tokens"], "documents": totals["documents"],
                  "seconds": wall, "tokens_per_s": totals["tokens"] / wall,
                  "mb_per_s": args.mb / wall, "peak_rss_mb": peak / 2**20,
                  "max_single_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
                  / 1024})
            shutil.rmtree(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
