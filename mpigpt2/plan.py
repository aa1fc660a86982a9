"""CLI: rank the layouts of a cluster we cannot rent by predicted step time.

    python -m mpigpt2.plan --nodes 64 --cores-per-node 48 --mem-per-node 256GiB \\
        --net-gbps 100 --net-latency-us 2 --model gpt2-1558m --batch-size 512 --seq-len 1024

Compute is measured on this CPU once per model shape (parallel/calibrate.py, cached), the
network is α-β from the flags, the pipeline is the schedule simulator; memory is the trainer's
own estimate (docs/design.md#the-planner).
"""

import argparse
import json
import re
import sys

import numpy as np

from mpigpt2.base.argtypes import check_number
from mpigpt2.base.errors import UserError, run_cli
from mpigpt2.parallel import calibrate, memory, planner, stepcost

SPELLED = ("B", "KB", "MB", "GB", "TB", "KiB", "MiB", "GiB", "TiB")
UNITS = {"": 1, "b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12,
         "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_bytes(flag, text):
    """'256GiB', '1.5 TB', '64e9' -> bytes; UserError naming the flag otherwise."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    if not m:
        raise UserError(f"{flag} {text!r}: expected a size such as 256GiB or 512GB")
    unit = m.group(2)
    # B, GiB, GB, or one case throughout (gib, GB); mixed case otherwise (Gb: gigabits?) is
    # not a size we guess at
    if unit.lower() not in UNITS or not (unit in SPELLED or unit in (unit.lower(),
                                                                      unit.upper())):
        raise UserError(f"{flag} {text!r}: unknown unit {unit!r}; use one of "
                        f"{', '.join(SPELLED)}")
    value = float(m.group(1)) * UNITS[unit.lower()]
    if value <= 0:
        raise UserError(f"{flag} must be > 0, got {text!r}")
    return int(value)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m mpigpt2.plan", description=__doc__.split("\n")[0])
    a = p.add_argument
    a("--nodes", type=int, required=True, help="nodes in the cluster")
    a("--cores-per-node", type=int, required=True, help="physical cores per node")
    a("--mem-per-node", default="256GiB", help="memory per node (e.g. 256GiB, 512GB)")
    a("--shm-per-node", default=None,
      help="room in each node's /dev/shm for node-shared dp's windows (default: half of "
           "--mem-per-node, Linux's default size; containers often have 64MiB)")
    a("--net-gbps", type=float, default=10.0, help="bandwidth between nodes, Gbit/s")
    a("--net-latency-us", type=float, default=20.0, help="latency between nodes, µs")
    a("--node-gbps", type=float, default=stepcost.LOOPBACK_BPS * 8 / 1e9,
      help="bandwidth between ranks of one node (shared memory), Gbit/s")
    a("--node-latency-us", type=float, default=stepcost.LOOPBACK_LATENCY * 1e6,
      help="latency between ranks of one node, µs")
    a("--model", default="gpt2-124m", help="model preset (gpt2-124m … gpt2-1558m, gpt2-tiny)")
    a("--batch-size", type=int, required=True, help="B: sequences per optimizer step")
    a("--seq-len", type=int, required=True, help="T: tokens per sequence")
    a("--dtype", choices=("float32", "float64"), default="float32")
    a("--top", type=int, default=12, help="layouts to print")
    a("--json", default=None, metavar="FILE", help="also write every ranked layout as JSON")
    a("--debug", action="store_true", help="show tracebacks for input errors")
    args = p.parse_args(argv)
    for flag, x in (("--nodes", args.nodes), ("--cores-per-node", args.cores_per_node),
                    ("--batch-size", args.batch_size), ("--seq-len", args.seq_len),
                    ("--top", args.top)):
        if x < 1:
            raise UserError(f"{flag} must be ≥ 1, got {x}")
    for flag, x in (("--net-gbps", args.net_gbps), ("--node-gbps", args.node_gbps)):
        check_number(flag, x, lo=0, lo_open=True)
    for flag, x in (("--net-latency-us", args.net_latency_us),
                    ("--node-latency-us", args.node_latency_us)):
        check_number(flag, x, lo=0)
    args.mem = parse_bytes("--mem-per-node", args.mem_per_node)
    args.shm = (args.mem // 2 if args.shm_per_node is None
                else parse_bytes("--shm-per-node", args.shm_per_node))
    if args.shm > args.mem:
        raise UserError(f"--shm-per-node {args.shm_per_node} exceeds --mem-per-node "
                        f"{args.mem_per_node}: /dev/shm lives in the node's memory")
    return args


def model_config(name, T):
    from mpigpt2.model.config import preset
    cfg = preset(name)
    if T > cfg.max_seq_len:
        raise UserError(f"--seq-len {T} exceeds {name}'s context of {cfg.max_seq_len} tokens")
    return cfg


def table(plans, B, T, top):
    head = (f"{'#':>3} {'step s':>8} {'tok/s':>9} {'bubble':>6} {'GiB/rank':>8} "
            f"{'GiB/node':>8} {'ranks×thr':>9}  flags")
    lines = [head]
    for i, p in enumerate(plans[:top]):
        lines.append(f"{i + 1:>3} {p.cost['step']:8.3f} {p.tokens_per_second(B, T):9.0f} "
                     f"{p.cost['bubble']:6.3f} {p.rank_bytes / 2 ** 30:8.2f} "
                     f"{p.node_bytes / 2 ** 30:8.2f} {p.ranks_per_node:>4}×{p.threads:<4}  "
                     f"{p.flags(T)}")
    return "\n".join(lines)


def as_json(plans, B, T):
    return [{"flags": p.flags(T), "ranks_per_node": p.ranks_per_node, "threads": p.threads,
             "layout": p.layout.as_dict(), "zero": p.zero, "node_shared": p.shared,
             "tokens_per_second": p.tokens_per_second(B, T), "rank_bytes": p.rank_bytes,
             "node_bytes": p.node_bytes, **{f"{k}_s" if k != "bubble" else k: v
                                           for k, v in p.cost.items()}} for p in plans]


def main(argv=None):
    args = parse_args(argv)
    cfg = model_config(args.model, args.seq_len)
    B, T = args.batch_size, args.seq_len
    net = stepcost.Net(args.node_latency_us * 1e-6, args.node_gbps * 1e9 / 8,
                       args.net_latency_us * 1e-6, args.net_gbps * 1e9 / 8)
    cluster = planner.Cluster(args.nodes, args.cores_per_node, args.mem, net, args.shm)
    fits, refused = planner.candidates(cfg, B, T, cluster)
    if not fits:
        why = "no layout of the planner's grid accepts this batch" if refused is None else (
            f"the leanest layout ({refused.flags(T)}, {refused.ranks_per_node} ranks/node) needs "
            f"{memory.size(refused.node_bytes)} per node, more than "
            f"{planner.MEMORY_HEADROOM:.0%} of {memory.size(args.mem)}")
        raise UserError(f"{args.model} with B {B} × T {T} fits nowhere on {args.nodes} "
                        f"node(s) × {args.cores_per_node} cores: {why}")
    print(f"calibrating {args.model} on this CPU (cached after the first run)…",
          file=sys.stderr, flush=True)
    cal, source = calibrate.load(cfg, np.dtype(args.dtype))
    fits = planner.rank(cfg, B, T, cluster, fits,
                        lambda t: stepcost.MeasuredModel(cfg, cal, t), cal["adamw"])
    print(f"{args.model}, B {B} × T {T} on {args.nodes} node(s) × {args.cores_per_node} cores, "
          f"{args.mem / 2 ** 30:.0f} GiB/node ({memory.size(args.shm)} /dev/shm), "
          f"net {args.net_gbps:g} Gbit/s "
          f"{args.net_latency_us:g} µs; compute measured on this CPU [{source}]")
    print(table(fits, B, T, args.top))
    if refused is not None:
        print(f"refused (memory): layouts needing more than {planner.MEMORY_HEADROOM:.0%} of "
              f"a node's memory, e.g. {refused.flags(T)} at "
              f"{memory.size(refused.node_bytes)}/node")
    if args.json:
        from mpigpt2.formats.atomic import atomic_write_text
        atomic_write_text(args.json, json.dumps(as_json(fits, B, T), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
