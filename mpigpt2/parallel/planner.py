"""Rank the layouts of a cluster by predicted step time (docs/design.md#the-planner).

Every candidate (ranks per node × BLAS threads, pp, dp, virtual stages, schedule, M, slices,
ZeRO, rank order) is resolved by the trainer's own layout rules, priced by the one step model
(stepcost.step_seconds) and checked against the node's memory by the trainer's own estimate
(memory.rank_estimate). Nothing here runs MPI: the planner plans clusters we cannot rent.
"""

from collections import Counter
from dataclasses import dataclass, replace

from mpigpt2.base.errors import UserError
from mpigpt2.parallel import memory, stepcost
from mpigpt2.parallel.layout import resolve

SCHEDULE_VARIANTS = (("1f1b", 1), ("zb-h1", 1), ("interleaved-1f1b", 2), ("zb-v", 2))
SLICES = (1, 2, 4, 8)
MAX_UNITS = 256         # (micro-batch, slice) units per stage: M·n beyond this is not planned
MEMORY_HEADROOM = 0.9   # a node's processes may use this fraction of its memory


@dataclass(frozen=True)
class Cluster:
    nodes: int
    cores: int          # per node
    mem: int            # bytes per node
    net: stepcost.Net
    shm: int = None     # /dev/shm's room per node (None: unknown, assumed to hold the windows)


@dataclass
class Plan:
    layout: object
    ranks_per_node: int
    threads: int
    zero: int
    cost: dict           # stepcost.step_seconds
    rank_bytes: int      # the largest rank's estimate
    node_bytes: int      # the fullest node's
    shared: bool = False  # node-shared dp runs (the map allows it, /dev/shm holds it)
    shareable: bool = False  # the node map alone would let it (--shared-dp auto might share)

    def tokens_per_second(self, B, T):
        return B * T / self.cost["step"]

    def flags(self, T):
        lay = self.layout
        f = [f"--pp {lay.pp}", f"--dp {lay.dp}", f"--microbatches {lay.microbatches}",
             f"--slice-tokens {lay.slices_text(T)}", f"--schedule {lay.schedule}"]
        if lay.virtual_stages > 1:
            f.append(f"--virtual-stages {lay.virtual_stages}")
        if self.zero:
            f.append("--zero 1")
        elif self.shareable and not self.shared:
            f.append("--shared-dp off")  # (only /dev/shm made it private: keep it so)
        f += [f"--rank-order {lay.rank_order}", f"--threads {self.threads}"]
        return " ".join(f)


def ranks_per_node_options(cores):
    """Ranks per node dividing the cores (each rank cores/ranks BLAS threads)."""
    return [r for r in range(1, cores + 1) if cores % r == 0]


def _layouts(cfg, world, B, T):
    """Every layout the trainer accepts on `world` ranks, from the planner's grid."""
    L = cfg.num_layers
    for pp in (p for p in range(1, min(world, L) + 1) if world % p == 0):
        dp = world // pp
        if B % dp:
            continue
        rows = B // dp
        Ms = sorted({m for m in (1, pp, 2 * pp, 4 * pp) if rows % m == 0 and m <= rows})
        variants = SCHEDULE_VARIANTS if pp > 1 else (("1f1b", 1),)
        for M in Ms:
            for n in (SLICES if pp > 1 else (1,)):
                if T % n:
                    continue
                for sched, v in variants:
                    if L % (pp * v) or (sched != "1f1b" and M * n < pp) or M * n > MAX_UNITS:
                        continue
                    try:
                        yield resolve(world, cfg, B, T, pp=pp, dp=dp, microbatches=M,
                                      slice_tokens=T // n, schedule=sched, virtual_stages=v,
                                      rank_order="pipe")
                    except UserError:
                        continue


def node_map(layout_world, ranks_per_node):
    """Block placement: world rank w on node w // ranks_per_node."""
    return [w // ranks_per_node for w in range(layout_world)]


def memory_of(cfg, layout, B, T, zero, rpn, itemsize=4, memo=None, shm=None):
    """(largest rank's bytes, fullest node's bytes, node-shared, shareable) under block
    placement, with node-shared dp (the trainer's --shared-dp auto) where the node map allows
    it (shareable) and /dev/shm (shm bytes per node) holds its windows (memory.shared_copies);
    memo: a dict keeping rank estimates across the rank orders and ZeRO settings of one
    layout."""
    memo = {} if memo is None else memo
    if "progs" not in memo:
        memo["progs"] = layout.programs(T)
        memo["sizes"] = memory.stage_sizes(cfg, layout)

    def estimate(stage, n, first):  # one rank of `stage`, its copy shared by n (1: private)
        key = (zero, stage, n if not zero else 1, first)
        if key not in memo:
            memo[key] = memory.rank_estimate(cfg, layout, stage, B, T, itemsize, zero, first,
                                             memo["progs"], n).total
        return memo[key]

    world = layout.pp * layout.dp
    node_of = node_map(world, rpn)
    replicas = 1 if zero else layout.shared_replicas(node_of)
    shareable = replicas > 1  # (the map alone would share)
    n = memory.shared_copies(cfg, layout, node_of, itemsize, shm, memo["sizes"], replicas)
    groups = Counter((node_of[w], layout.coords(w)[0]) for w in range(world))
    nodes, largest = Counter(), 0
    for (node, stage), count in groups.items():
        nodes[node] += count * estimate(stage, n, False)
        largest = max(largest, estimate(stage, n, False))
    s0 = layout.coords(0)[0]  # world rank 0 also gathers the checkpoint
    first = estimate(s0, n, True)
    nodes[node_of[0]] += first - estimate(s0, n, False)
    return max(largest, first), max(nodes.values()), n > 1, shareable


def price(cfg, plan_, B, T, cluster, compute, adamw_seconds, hierarchical=False, memo=None):
    """plan_ with its cost: the layout priced on cluster by the step model. memo: a dict
    keeping pipelined parts across plans that differ only in ZeRO."""
    lay = plan_.layout
    node_of = node_map(lay.pp * lay.dp, plan_.ranks_per_node)
    key = (lay, plan_.ranks_per_node, plan_.threads)
    pipe = memo.get(key) if memo is not None else None
    if pipe is None:
        pipe = stepcost.pipeline_part(cfg, lay, B, T, compute, cluster.net, node_of)
        if memo is not None:
            memo[key] = pipe
    plan_.cost = stepcost.step_seconds(cfg, lay, B, T, compute, cluster.net, node_of,
                                       bool(plan_.zero), adamw_seconds, hierarchical, pipe,
                                       shared=plan_.shared)
    return plan_


def evaluate(cfg, layout, B, T, cluster, compute, rpn, threads, zero, adamw_seconds,
             hierarchical=False):
    """One Plan: the layout priced on cluster with rpn ranks per node."""
    plan_ = Plan(layout, rpn, threads, zero, {},
                 *memory_of(cfg, layout, B, T, zero, rpn, shm=cluster.shm))
    return price(cfg, plan_, B, T, cluster, compute, adamw_seconds, hierarchical)


def candidates(cfg, B, T, cluster):
    """(unpriced plans that fit the node's memory, the leanest refused one or None): no
    compute is measured before this says whether anything fits."""
    fits, refused = [], None
    for rpn in ranks_per_node_options(cluster.cores):
        threads = cluster.cores // rpn
        for lay in _layouts(cfg, cluster.nodes * rpn, B, T):
            orders = ("pipe", "data") if cluster.nodes > 1 and lay.pp > 1 and lay.dp > 1 \
                else ("pipe",)
            memo = {}
            for order in orders:
                lay_o = replace(lay, rank_order=order)
                for zero in ((0, 1) if lay.dp > 1 else (0,)):
                    p = Plan(lay_o, rpn, threads, zero, {},
                             *memory_of(cfg, lay_o, B, T, zero, rpn, memo=memo, shm=cluster.shm))
                    if p.node_bytes <= MEMORY_HEADROOM * cluster.mem:
                        fits.append(p)
                    elif refused is None or p.node_bytes < refused.node_bytes:
                        refused = p
    return fits, refused


def rank(cfg, B, T, cluster, fits, compute_for, adamw_seconds):
    """The plans priced and sorted by predicted step. compute_for(threads) -> a
    stepcost.ComputeModel for ranks of that many BLAS threads."""
    models, memo = {}, {}
    for p in fits:
        if p.threads not in models:
            models[p.threads] = compute_for(p.threads)
        price(cfg, p, B, T, cluster, models[p.threads], adamw_seconds, memo=memo)
    return sorted(fits, key=lambda p: p.cost["step"])
