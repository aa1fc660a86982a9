"""The planner's predictions against measured steps (bench row 12): every layout of PLAN_LAYOUTS
priced by mpigpt2.parallel.planner.evaluate (compute calibrated on this CPU, the network of
this node) and run by `python -m mpigpt2.train` on this node."""

import os

import mpigpt2  # noqa: F401 - first: numpy's BLAS kernels as the trainer picks them
import numpy as np

MODEL, B, T = "gpt2-124m", 4, 128
STEPS = 7          # the first two are left out of the median (bench/train_run.py)
# (label, ranks, train flags): every layout that runs on a 2-core node without
# oversubscription, over the planner's dimensions (threads, dp, ZeRO, pp, M, k, schedule, v)
PLAN_LAYOUTS = (
    ("1 rank × 1 thread", 1, "--pp 1 --dp 1 --threads 1"),
    ("1 rank × 2 threads", 1, "--pp 1 --dp 1 --threads 2"),
    ("dp 2", 2, "--pp 1 --dp 2"),
    ("dp 2, ZeRO-1", 2, "--pp 1 --dp 2 --zero 1"),
    ("pp 2, M 2, k T", 2, "--pp 2 --microbatches 2 --slice-tokens 128"),
    ("pp 2, M 1, k T/4", 2, "--pp 2 --microbatches 1 --slice-tokens 32"),
    ("pp 2 zb-h1, M 2, k T/2", 2, "--pp 2 --microbatches 2 --slice-tokens 64 --schedule zb-h1"),
    ("pp 2 interleaved v 2, M 2, k T/2", 2, "--pp 2 --microbatches 2 --slice-tokens 64 "
     "--schedule interleaved-1f1b --virtual-stages 2"),
    ("pp 2 zb-v, M 1, k T/4", 2, "--pp 2 --microbatches 1 --slice-tokens 32 --schedule zb-v"),
)


# (label, train flags) on the emulated cluster (bench/plan_cluster.py): two nodes, one rank
# and one BLAS thread each, the links between them veth pairs
CLUSTER = (
    ("dp 2 over 2 nodes", "--pp 1 --dp 2"),
    ("pp 2 over 2 nodes, M 2, k T/2", "--pp 2 --microbatches 2 --slice-tokens 64"),
    ("pp 2 zb-h1 over 2 nodes, M 2, k T/4", "--pp 2 --microbatches 2 --slice-tokens 32 "
     "--schedule zb-h1"),
)


def _flag(flags, name, default=None, cast=int):
    words = flags.split()
    return cast(words[words.index(name) + 1]) if name in words else default


def calibrate_now():
    """The compute of MODEL measured afresh (and cached) for this run's predictions."""
    from mpigpt2.model.config import preset
    from mpigpt2.parallel import calibrate
    return calibrate.load(preset(MODEL), np.float32, refresh=True)[0]


def predict(ranks, flags, cores=None, nodes=1, net=None, cal=None):
    """{"step", "pipeline", "reduce", "optimizer", "bubble"} predicted for one row, seconds:
    `ranks` ranks on each of `nodes` nodes of `cores` cores, linked by net, from the
    calibration `cal` (default: the cached one)."""
    from mpigpt2.model.config import preset
    from mpigpt2.base.machine import shm_room
    from mpigpt2.parallel import calibrate, planner, stepcost
    from mpigpt2.parallel.layout import resolve
    cfg = preset(MODEL)
    cores = cores or os.cpu_count() or 1
    world = ranks * nodes
    lay = resolve(world, cfg, B, T, pp=_flag(flags, "--pp"), dp=_flag(flags, "--dp"),
                  microbatches=_flag(flags, "--microbatches"),
                  slice_tokens=_flag(flags, "--slice-tokens"),
                  schedule=_flag(flags, "--schedule", cast=str),
                  virtual_stages=_flag(flags, "--virtual-stages"))
    threads = _flag(flags, "--threads", 1)
    cal = cal or calibrate.load(cfg, np.float32)[0]
    share = max(1.0, ranks * threads / cores)
    # /dev/shm as the measured runs see it (they keep private copies where it is too small)
    cluster = planner.Cluster(nodes, cores, 24 << 30, net or stepcost.Net(), shm_room())
    p = planner.evaluate(cfg, lay, B, T, cluster, stepcost.MeasuredModel(cfg, cal, threads,
                                                                         share),
                         ranks, threads, _flag(flags, "--zero", 0), cal["adamw"])
    return p.cost


def probed_net():
    """The emulated cluster's links as the trainer's start-up probe cached them."""
    from mpigpt2.parallel import netprobe, stepcost
    from mpigpt2.parallel.autotune import _read_cache
    for key, v in _read_cache(netprobe.cache_path()).items():
        if key.startswith("node1 <-> node2"):
            return stepcost.Net(*v)
    return None


def train_flags(flags):
    return (f"--model {MODEL} --batch-size {B} --seq-len {T} --steps {STEPS} "
            f"--lr 1e-4 {flags}").split()
