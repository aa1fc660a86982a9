"""Row 1: one full training step (forward + backward + AdamW + zero grad) on one process, one
thread.

    python bench/single_step.py --impl mpigpt2|torch --model gpt2-124m --B 4 --T 64
    python bench/single_step.py --check     # the torch baseline computes mpigpt2's loss/grads

Prints one BENCH_JSON line with per-step times (warm-up excluded) and a per-phase breakdown.
"""

import argparse
import os
import statistics
import sys
import time

import mpigpt2  # noqa: F401 - first: numpy's BLAS kernels as the trainer picks them
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit, summary  # noqa: E402

# the timed parts of a step; "update" is the optimizer step alone (row 1 compares it with torch's)
PHASES = ("forward", "backward", "update", "zero_grad")


def batch(cfg, B, T, seed=1234):
    """The same random tokens for both implementations: x, y (B, T) int64."""
    toks = np.random.default_rng(seed).integers(0, cfg.vocab_size, (B, T + 1), dtype=np.int64)
    return np.ascontiguousarray(toks[:, :-1]), np.ascontiguousarray(toks[:, 1:])


def run_mpigpt2(cfg, B, T, warmup, steps):
    from threadpoolctl import threadpool_limits
    from mpigpt2.model.gpt import GPT
    from mpigpt2.model.optim import AdamW
    threadpool_limits(1)
    x, y = batch(cfg, B, T)
    x, y = x.astype(np.int32), y.astype(np.int32)
    model = GPT(cfg, seed=0)
    opt = AdamW(model.flat.size, np.float32)
    times, phases, losses = [], {k: [] for k in PHASES}, []
    for t in range(1, warmup + steps + 1):
        if t == warmup + 1:
            c0 = time.process_time()
        t0 = time.perf_counter()
        loss = model.forward(x, y)
        t1 = time.perf_counter()
        model.backward()
        t2 = time.perf_counter()
        opt.step(model.flat, model.grad_flat, t, 1e-4)
        t3 = time.perf_counter()
        model.zero_grad()
        t4 = time.perf_counter()
        losses.append(loss)
        if t > warmup:
            times.append(t4 - t0)
            for k, dt in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                phases[k].append(dt)
    return times, phases, losses, {"cpu_per_wall": (time.process_time() - c0) / sum(times)}


def run_torch(cfg, B, T, warmup, steps, head, interop=True):
    import torch
    from torch_gpt2 import TorchGPT2, make_optimizer
    torch.set_num_threads(1)
    if interop:
        torch.set_num_interop_threads(1)
    x, y = (torch.from_numpy(a) for a in batch(cfg, B, T))
    model = TorchGPT2(cfg, head=head, seed=0)
    opt, kind = make_optimizer(model)
    times, phases, losses = [], {k: [] for k in PHASES}, []
    for t in range(1, warmup + steps + 1):
        if t == warmup + 1:
            c0 = time.process_time()
        t0 = time.perf_counter()
        loss = model(x, y)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        t3 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        t4 = time.perf_counter()
        losses.append(loss.item())
        if t > warmup:
            times.append(t4 - t0)
            for k, dt in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                phases[k].append(dt)
    extra = {"optimizer": kind, "threads": torch.get_num_threads(), "head": head,
             "cpu_per_wall": (time.process_time() - c0) / sum(times)}
    return times, phases, losses, extra


def check_equivalence():
    """Same weights and tokens: torch's loss and gradients equal mpigpt2's (float32)."""
    import torch
    from threadpoolctl import threadpool_limits
    from mpigpt2.model.config import GPTConfig
    from mpigpt2.model.gpt import GPT
    from torch_gpt2 import TorchGPT2, load_from_mpigpt2
    threadpool_limits(1)
    torch.set_num_threads(1)
    cfg = GPTConfig(max_seq_len=32, vocab_size=500, padded_vocab_size=512, num_layers=2,
                    num_heads=4, channels=64)
    x, y = batch(cfg, 3, 32)
    ours = GPT(cfg, seed=0)
    loss_ours = ours.forward(x.astype(np.int32), y.astype(np.int32))
    ours.backward()
    out = {"config": "L2 NH4 C64 V500 Vp512, B3 T32"}
    for head in ("padded", "sliced"):
        ref = TorchGPT2(cfg, head=head)
        load_from_mpigpt2(ref, ours.params)
        loss = ref(torch.from_numpy(x), torch.from_numpy(y))
        loss.backward()
        pairs = [(ours.grads["wte"], ref.wte.weight.grad), (ours.grads["qkvw"][1],
                 ref.blocks[1].qkv.weight.grad), (ours.grads["fcw"][0], ref.blocks[0].fc.weight.grad)]
        rel = max(float(np.abs(a - b.numpy()).max() / (np.abs(a).max() + 1e-30)) for a, b in pairs)
        out[head] = {"loss_ours": loss_ours, "loss_torch": loss.item(),
                     "loss_rel_diff": abs(loss_ours - loss.item()) / abs(loss_ours),
                     "grad_max_rel_diff": rel}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--impl", choices=("mpigpt2", "torch"), help="which implementation to time")
    ap.add_argument("--model", default="gpt2-124m", help="mpigpt2 preset name")
    ap.add_argument("--B", type=int, default=4, help="sequences per step")
    ap.add_argument("--T", type=int, default=64, help="tokens per sequence")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--steps", type=int, default=3, help="timed steps")
    ap.add_argument("--torch-head", choices=("padded", "sliced"), default="sliced",
                    help="torch lm_head form (see torch_gpt2.TorchGPT2)")
    ap.add_argument("--check", action="store_true", help="only check torch == mpigpt2 numerically")
    args = ap.parse_args()
    from mpigpt2.base.malloc import tune
    tune()  # what mpigpt2.train does at start; applied to both implementations alike
    if args.check:
        emit({"kind": "check", **check_equivalence()})
        return
    from mpigpt2.model.config import PRESETS
    cfg = PRESETS[args.model]
    if args.impl == "mpigpt2":
        times, phases, losses, extra = run_mpigpt2(cfg, args.B, args.T, args.warmup, args.steps)
    else:
        times, phases, losses, extra = run_torch(cfg, args.B, args.T, args.warmup, args.steps,
                                                 args.torch_head)
    import resource
    res = {"kind": "single", "impl": args.impl, "model": args.model, "B": args.B, "T": args.T,
           "warmup": args.warmup, **summary(times),
           "tokens_per_s_best": args.B * args.T / min(times),
           "tokens_per_s_median": args.B * args.T / statistics.median(times),
           "phases_median_s": {k: statistics.median(v) for k, v in phases.items()},
           "losses": losses, "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "loadavg_end": os.getloadavg(), **extra}
    emit(res)


if __name__ == "__main__":
    main()
