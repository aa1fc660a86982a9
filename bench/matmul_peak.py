"""Row 2's denominator: this machine's float32 matmul peak on one BLAS thread, GPT-2 shapes.

    python bench/matmul_peak.py [--reps 5] [--tokens 2048]

Times numpy float32 matmuls of the shapes a GPT-2 124M step runs at --tokens tokens (forward
x @ W.T and the two backward products) and reports the best GFLOP/s of any shape as the peak,
and all shapes' FLOPs over their summed best times. The kernels are the trainer's (mpigpt2 is
imported before numpy); OPENBLAS_CORETYPE="" in the environment gives OpenBLAS's own pick.
"""

import argparse
import os
import sys
import time

import mpigpt2  # noqa: F401 - first: numpy's BLAS kernels as the trainer picks them
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit  # noqa: E402



def shapes(n):
    """(M, K, N) of (M×K) @ (K×N) at n tokens, C=768."""
    return [
        (n, 768, 3072),   # fc forward
        (n, 768, 2304),   # qkv forward
        (n, 3072, 768),   # fcproj forward / fc dx
        (768, n, 3072),   # dW of fc (dout.T @ x)
        (n, 768, 768),    # attproj forward
    ]


def probe(M, K, N, reps, rng):
    a = rng.standard_normal((M, K), dtype=np.float32)
    b = rng.standard_normal((K, N), dtype=np.float32)
    out = np.empty((M, N), dtype=np.float32)
    np.matmul(a, b, out=out)  # warm-up (page faults, kernel selection)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        np.matmul(a, b, out=out)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * M * K * N, best


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions per shape (best kept)")
    ap.add_argument("--threads", type=int, default=1, help="BLAS threads")
    ap.add_argument("--tokens", type=int, default=2048, help="rows of the activations")
    args = ap.parse_args()
    from threadpoolctl import threadpool_limits
    from mpigpt2.base import blas
    threadpool_limits(args.threads, user_api="blas")
    rng = np.random.default_rng(0)
    timed = {f"{M}x{K}@{K}x{N}": probe(M, K, N, args.reps, rng) for M, K, N in shapes(args.tokens)}
    per_shape = {k: f / t / 1e9 for k, (f, t) in timed.items()}
    total = sum(f for f, _ in timed.values()) / sum(t for _, t in timed.values()) / 1e9
    emit({"kind": "peak", "threads": args.threads, "reps": args.reps, "tokens": args.tokens,
          "blas": blas.info(), "gflops_per_shape": per_shape, "peak_gflops": max(per_shape.values()),
          "gflops_all_shapes": total, "loadavg_end": os.getloadavg()})


if __name__ == "__main__":
    main()
