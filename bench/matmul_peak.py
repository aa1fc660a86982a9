"""Row 2's denominator: this machine's float32 matmul peak on one BLAS thread, GPT-2 shapes.

    python bench/matmul_peak.py [--reps 5]

Times numpy float32 matmuls of the shapes a GPT-2 124M step runs at 2048 tokens (forward
x @ W.T and the two backward products) and reports the best GFLOP/s of any shape as the peak.
"""

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit  # noqa: E402

# (M, K, N): (M×K) @ (K×N); N=2048 tokens, C=768
SHAPES = [
    (2048, 768, 3072),   # fc forward
    (2048, 768, 2304),   # qkv forward
    (2048, 3072, 768),   # fcproj forward / fc dx
    (768, 2048, 3072),   # dW of fc (dout.T @ x)
    (2048, 768, 768),    # attproj forward
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
    return 2.0 * M * K * N / best / 1e9


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions per shape (best kept)")
    ap.add_argument("--threads", type=int, default=1, help="BLAS threads")
    args = ap.parse_args()
    from threadpoolctl import threadpool_limits
    threadpool_limits(args.threads, user_api="blas")
    rng = np.random.default_rng(0)
    per_shape = {f"{M}x{K}@{K}x{N}": probe(M, K, N, args.reps, rng) for M, K, N in SHAPES}
    emit({"kind": "peak", "threads": args.threads, "reps": args.reps,
          "gflops_per_shape": per_shape, "peak_gflops": max(per_shape.values()),
          "loadavg_end": os.getloadavg()})


if __name__ == "__main__":
    main()
