"""The network a job runs on, for the default layout's cost model
(docs/design.md#the-network-model).

`--net-gbps` / `--net-latency-us` give the links between nodes; otherwise, when the job spans
nodes, rank 0 times a short ping-pong (8 B for latency, 4 MiB for bandwidth) with a rank of
its own node and one of another node, while every other rank waits. The result is cached in
~/.cache/mpigpt2/net.json, keyed by the two host names and the MPI library, like the matmul
peak. A job on one node uses stepcost's shared-memory defaults and probes nothing.
"""

import json
import os

from mpi4py import MPI

from mpigpt2.parallel import p2p, stepcost
from mpigpt2.parallel.waiting import Waiter

LAT_BYTES, LAT_REPS = 8, 20
BW_BYTES, BW_REPS = 4 << 20, 3


def cache_path():
    root = os.path.expanduser(os.environ.get("XDG_CACHE_HOME", "~/.cache"))
    return os.path.join(root, "mpigpt2", "net.json")


def from_flags(gbps, latency_us):
    """The Net of the flags (either may be None: the default of stepcost.Net)."""
    d = stepcost.Net()
    return stepcost.Net(d.intra_latency, d.intra_bps,
                        d.inter_latency if latency_us is None else latency_us * 1e-6,
                        d.inter_bps if gbps is None else gbps * 1e9 / 8)


def _link(comm, rank, peer, waiter):
    """(latency s, bytes/s) between rank 0 and peer, measured on both (others return None)."""
    me = comm.Get_rank()
    if me not in (0, peer):
        return None
    try:
        lat = p2p.pingpong(comm, peer if me == 0 else 0, me == 0, LAT_BYTES, LAT_REPS)
        big = p2p.pingpong(comm, peer if me == 0 else 0, me == 0, BW_BYTES, BW_REPS)
    except TimeoutError as e:
        from mpigpt2.base.errors import abort
        print(f"[rank {me}] gave up on {e}", flush=True)
        abort(MPI.COMM_WORLD, 4)
    return lat, BW_BYTES / max(big - lat, 1e-9)


def _read(path, key):
    from mpigpt2.parallel.autotune import _read_cache
    hit = _read_cache(path).get(key)
    try:
        net = stepcost.Net(*[float(x) for x in hit])
        return net if all(x > 0 for x in (net.intra_bps, net.inter_bps)) else None
    except (TypeError, ValueError):
        return None


def _write(path, key, net):
    from dataclasses import astuple
    from mpigpt2.formats.atomic import atomic_write_text
    from mpigpt2.parallel.autotune import _read_cache
    try:
        data = _read_cache(path)
        data[key] = list(astuple(net))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write_text(path, json.dumps(data, indent=1))
    except OSError:
        pass  # a read-only home: probe again next time


def measure(comm, node_of, waiter=None, cache=True):
    """(Net, source) agreed on every rank: 'one node', 'cache' or 'probe'."""
    waiter = waiter or Waiter()
    if len(set(node_of)) < 2:
        return stepcost.Net(), "one node"
    me = comm.Get_rank()
    inter = next(r for r, n in enumerate(node_of) if n != node_of[0])
    intra = next((r for r, n in enumerate(node_of) if n == node_of[0] and r), None)
    with waiter.bounded("the host names (allgather, set-up)"):
        names = comm.allgather(MPI.Get_processor_name())
    key = f"{names[0]} <-> {names[inter]} | {MPI.Get_library_version().splitlines()[0]}"
    hit = _read(cache_path(), key) if (cache and me == 0) else None
    with waiter.bounded("the cached network (bcast, set-up)"):
        hit = comm.bcast(hit, root=0)
    if hit is not None:
        return hit, "cache"
    links = {}
    for name, peer in (("intra", intra), ("inter", inter)):
        if peer is not None:
            links[name] = _link(comm, me, peer, waiter)
        # everyone else waits, polled, while the two ranks spin
        Waiter(stall_seconds=float("inf"), timeout=waiter.timeout).wait(
            [comm.Ibarrier()], "setup", lambda: "the network probe")
    net = None
    if me == 0:
        d = stepcost.Net()
        lat_i, bps_i = links.get("intra") or (d.intra_latency, d.intra_bps)
        lat_x, bps_x = links["inter"]
        net = stepcost.Net(lat_i, bps_i, lat_x, bps_x)
        if cache:
            _write(cache_path(), key, net)
    with waiter.bounded("the network probe's result (bcast, set-up)"):
        net = comm.bcast(net, root=0)
    return net, "probe"


def describe(net, source):
    return (f"network ({source}): inside a node {net.intra_latency * 1e6:.1f} µs "
            f"{net.intra_bps * 8 / 1e9:.1f} Gbit/s; between nodes {net.inter_latency * 1e6:.1f} µs "
            f"{net.inter_bps * 8 / 1e9:.1f} Gbit/s")
