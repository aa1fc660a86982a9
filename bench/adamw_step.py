"""Row 13: one AdamW step over GPT-2 124M's parameters, one thread, by each candidate means.

    python bench/adamw_step.py --impl mpigpt2|numpy-blocked|numexpr|torch [--steps 5]
    python bench/adamw_step.py --impl numpy-blocked --block 65536

mpigpt2 is the library's fused step (model.optim.AdamW); numpy-blocked and numexpr are the
alternatives it was chosen against (docs/design.md#the-fused-adamw-step), kept here only so that
the comparison can be re-run; both compute the same float32 arithmetic as mpigpt2 (checked on a
slice before timing). torch is torch.optim.AdamW(fused=True) over the 148 tensors of the
baseline model (bench/torch_gpt2.py). Prints one BENCH_JSON line: seconds per timed step, the
import and first-call (compile or cache load) cost, and the CPU time per wall second.
"""

import argparse
import os
import sys
import time

import mpigpt2  # noqa: F401 - first: numpy's BLAS kernels as the trainer picks them
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit, summary  # noqa: E402

HYPER = dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)  # llm.c's, as in row 1
LR = 1e-4


def constants(dt, t, lr, scale, beta1, beta2, eps, weight_decay):
    """The per-step scalars of the update, each rounded to the array dtype once."""
    bc1, bc2 = 1.0 - beta1 ** t, 1.0 - beta2 ** t
    return dict(s=dt(scale), b1=dt(beta1), c1=dt(1.0 - beta1), b2=dt(beta2), c2=dt(1.0 - beta2),
                r2=dt(1.0 / bc2), eps=dt(eps), k=dt(bc1 / lr if lr else np.inf),
                dw=dt(lr * weight_decay))


class BlockedNumpy:
    """The update as numpy ufuncs with out= buffers over blocks small enough for L2."""

    def __init__(self, n, dt, block, **hyper):
        self.m, self.v, self.hyper = np.zeros(n, dt), np.zeros(n, dt), hyper
        self.block = block
        self.a, self.b = np.empty(block, dt), np.empty(block, dt)

    def step(self, p, g, t, lr, scale=1.0):
        c = constants(p.dtype.type, t, lr, scale, **self.hyper)
        decay = self.hyper["weight_decay"] != 0.0
        for lo in range(0, p.size, self.block):
            hi = min(lo + self.block, p.size)
            pp, gg, m, v = p[lo:hi], g[lo:hi], self.m[lo:hi], self.v[lo:hi]
            a, b = self.a[:hi - lo], self.b[:hi - lo]
            np.multiply(gg, c["s"], out=b)         # g · scale
            m *= c["b1"]
            np.multiply(b, c["c1"], out=a)
            m += a
            v *= c["b2"]
            np.multiply(b, b, out=a)
            a *= c["c2"]
            v += a
            np.multiply(v, c["r2"], out=a)
            np.sqrt(a, out=a)
            a += c["eps"]
            a *= c["k"]
            np.divide(m, a, out=a)
            if decay:
                np.multiply(pp, c["dw"], out=b)
                a += b
            pp -= a


class Numexpr:
    """The update as three numexpr expressions (m, v in place, then p), one thread."""

    def __init__(self, n, dt, **hyper):
        import numexpr
        numexpr.set_num_threads(1)
        self.ne, self.m, self.v, self.hyper = numexpr, np.zeros(n, dt), np.zeros(n, dt), hyper

    def step(self, p, g, t, lr, scale=1.0):
        c = constants(p.dtype.type, t, lr, scale, **self.hyper)
        ev, m, v = self.ne.evaluate, self.m, self.v
        ev("m * b1 + (g * s) * c1", local_dict=dict(c, m=m, g=g), out=m, casting="no")
        ev("v * b2 + ((g * s) * (g * s)) * c2", local_dict=dict(c, v=v, g=g), out=v,
           casting="no")
        upd = "m / ((sqrt(v * r2) + eps) * k)"
        if self.hyper["weight_decay"] != 0.0:
            upd = f"({upd} + p * dw)"
        ev(f"p - {upd}", local_dict=dict(c, m=m, v=v, p=p), out=p, casting="no")


def make(impl, n, dt, block):
    if impl == "mpigpt2":
        from mpigpt2.model.optim import AdamW
        return AdamW(n, dt, **HYPER)
    if impl == "numpy-blocked":
        return BlockedNumpy(n, dt, block, **HYPER)
    return Numexpr(n, dt, **HYPER)


def agrees_with_mpigpt2(impl, block):
    """The candidate's float32 bits equal the library's over a few steps of odd-sized data."""
    from mpigpt2.model.optim import AdamW
    rng = np.random.default_rng(0)
    n = 200_003
    p0 = rng.normal(size=n).astype(np.float32)
    ours, ref = make(impl, n, np.float32, block), AdamW(n, np.float32, **HYPER)
    p1, p2 = p0.copy(), p0.copy()
    for t in range(1, 4):
        g = rng.normal(size=n).astype(np.float32)
        ours.step(p1, g, t, LR, 0.5)
        ref.step(p2, g, t, LR, 0.5)
    return bool(np.array_equal(p1.view(np.uint32), p2.view(np.uint32)))


def timed(step, steps):
    """Seconds of the first call (state allocation, compilation or cache load) and of each of
    `steps` timed calls after it; CPU seconds per wall second of the timed calls is appended."""
    times = []
    for t in range(1, steps + 2):
        if t == 2:
            c0 = time.process_time()
        t0 = time.perf_counter()
        step(t)
        times.append(time.perf_counter() - t0)
    times.append((time.process_time() - c0) / sum(times[1:]))
    return times


def run_numpy_side(impl, n, steps, block):
    from threadpoolctl import threadpool_limits
    threadpool_limits(1)
    t0 = time.perf_counter()
    opt = make(impl, n, np.float32, block)
    construct_s = time.perf_counter() - t0  # imports and allocation
    same = agrees_with_mpigpt2(impl, block) if impl != "mpigpt2" else True
    rng = np.random.default_rng(1)
    p = rng.normal(0.0, 0.02, n).astype(np.float32)
    g = rng.normal(0.0, 1e-3, n).astype(np.float32)
    times = timed(lambda t: opt.step(p, g, t, LR), steps)
    return times, {"construct_s": construct_s, "bits_equal_mpigpt2": same}


def run_torch(steps):
    import torch
    from mpigpt2.model.config import PRESETS
    from torch_gpt2 import TorchGPT2, make_optimizer
    torch.set_num_threads(1)
    model = TorchGPT2(PRESETS["gpt2-124m"], head="sliced", seed=0)
    opt, kind = make_optimizer(model, lr=LR)
    gen = torch.Generator().manual_seed(1)
    for prm in model.parameters():
        prm.grad = torch.randn(prm.shape, generator=gen) * 1e-3
    times = timed(lambda t: opt.step(), steps)
    n = sum(prm.numel() for prm in model.parameters())
    return times, {"optimizer": kind, "torch_params": n,
                   "torch_tensors": len(opt.param_groups[0]["params"])}


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--impl", required=True,
                    choices=("mpigpt2", "numpy-blocked", "numexpr", "torch"),
                    help="which AdamW step to time")
    ap.add_argument("--steps", type=int, default=5, help="timed steps (after one first call)")
    ap.add_argument("--block", type=int, default=1 << 16, help="numpy-blocked's block (elements)")
    args = ap.parse_args()
    from mpigpt2.model.config import PRESETS
    from mpigpt2.model.params import ParamLayout, full_spec
    cfg = PRESETS["gpt2-124m"]
    n = ParamLayout(cfg, full_spec(cfg)).size
    if args.impl == "torch":
        times, extra = run_torch(args.steps)
    else:
        times, extra = run_numpy_side(args.impl, n, args.steps, args.block)
    first, steps_s, cpu_per_wall = times[0], times[1:-1], times[-1]
    emit({"kind": "adamw", "impl": args.impl, "params": n, "dtype": "float32",
          "block": args.block if args.impl == "numpy-blocked" else None,
          "first_call_s": first, **summary(steps_s), "cpu_per_wall": cpu_per_wall, **extra})


if __name__ == "__main__":
    main()
