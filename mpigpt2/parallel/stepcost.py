"""The step-time model (pure): compute per schedule action, an α-β network, the schedule
simulator, the gradient reduction and the optimizer (docs/design.md#the-step-model).

One model prices a step for the default layout (a FLOP-rate compute model, parallel/layout.py)
and for the planner (compute measured on this CPU, parallel/calibrate.py; mpigpt2/plan.py):

    step = pipelined part (every rank's action list simulated, each F/B/I/W costing its
           stage's compute plus the message it sends) + gradient reduction + optimizer

The pipelined part is simulated when the schedule has at most SIMULATE_UNITS (stage,
micro-batch, slice) units; above that TeraPipe's bound prices the bottleneck rank.
"""

import abc
import math
from collections import Counter
from dataclasses import dataclass

from mpigpt2.parallel import costs
from mpigpt2.parallel.calibrate import CAL_T

SIMULATE_UNITS = 1536
LOOPBACK_BPS = costs.ALLREDUCE_BPS  # bytes/s between ranks of one node, unless measured
LOOPBACK_LATENCY = 3e-6   # s
STEP_OVERHEAD = 2e-3      # s per step: data, loss and metrics gathers, Python bookkeeping
SHARED_SUM_BPS = 10e9     # bytes read + written per second by one rank summing gradient slots
                          # in shared memory: 9–24 GB/s measured for 8–2 slots on a 2-core
                          # node (docs/design.md#node-shared-data-parallelism)
ZERO_COMM = 4.0           # ZeRO-1's rooted reduces and broadcasts (a few per tensor and owner)
                          # ÷ a ring allreduce of the same bytes: measured on a 2-core node,
                          # gpt2-124m dp 2 (docs/design.md#the-step-model)


@dataclass(frozen=True)
class Net:
    """α-β links: latency (s) and bandwidth (bytes/s) inside a node and between nodes."""
    intra_latency: float = LOOPBACK_LATENCY
    intra_bps: float = LOOPBACK_BPS
    inter_latency: float = 20e-6
    inter_bps: float = 1.25e9  # 10 Gb/s

    def seconds(self, nbytes, same_node=True):
        if same_node:
            return self.intra_latency + nbytes / self.intra_bps
        return self.inter_latency + nbytes / self.inter_bps


def ring_allreduce(nbytes, nodes, net):
    """A ring allreduce of nbytes over ranks on `nodes` (in ring order): 2(d−1) steps of
    nbytes/d each, every step as slow as the ring's slowest edge."""
    d = len(nodes)
    if d < 2 or nbytes == 0:
        return 0.0
    cross = any(nodes[i] != nodes[(i + 1) % d] for i in range(d))
    return 2 * (d - 1) * net.seconds(nbytes / d, same_node=not cross)


def hierarchical_allreduce(nbytes, nodes, net):
    """Reduce inside each node, allreduce between one leader per node, broadcast inside the
    node (parallel/collectives.py): the largest node's in-node reduce and broadcast (as a
    ring's two halves) plus the leaders' ring."""
    per_node = Counter(nodes)
    r = max(per_node.values())
    inside = ring_allreduce(nbytes, [0] * r, net)
    return inside + ring_allreduce(nbytes, sorted(per_node), net)


def shared_reduce(nbytes, nodes, net, n=None):
    """Node-shared reduction (parallel/shared.py) of nbytes over ranks on `nodes`: each of a
    node's n ranks sums its 1/n of the n gradient slots in shared memory (n slices read, one
    written), then the slices are allreduced between nodes, n rings side by side over the
    node's links (priced as one ring of all the bytes)."""
    per_node = Counter(nodes)
    n = n or max(per_node.values())
    inside = nbytes * (n + 1) / n / SHARED_SUM_BPS if n > 1 else 0.0
    return inside + ring_allreduce(nbytes, sorted(per_node), net)


class ComputeModel(abc.ABC):
    """Seconds of a stage's forward and backward over one slice. piece(name, m) gives the
    (forward, backward) seconds of "layer", "head" or "embed" over m tokens in rows of CAL_T
    tokens; attention() the (forward, backward) seconds per attention FLOP
    beyond those rows' own."""
    CAL_T = CAL_T  # the rows the pieces were timed in (parallel/calibrate.py)

    def __init__(self, cfg):
        self.cfg = cfg

    @abc.abstractmethod
    def piece(self, name, m):
        """(forward, backward) seconds of piece `name` over m tokens."""

    @abc.abstractmethod
    def attention(self):
        """(forward, backward) seconds per attention FLOP."""

    def stage(self, spec, b, k, prefix):
        """(forward, backward) seconds of stage spec over a slice of b rows × k tokens that
        starts at token `prefix`: its queries attend to prefix + (k + 1)/2 keys on average,
        the pieces were timed with (CAL_T + 1)/2."""
        m, C, nl = b * k, self.cfg.channels, len(spec.layers)
        lf, lb = self.piece("layer", m)
        keys = prefix + (k + 1) / 2 - ((min(self.CAL_T, m) + 1) / 2 if self.CAL_T else 0)
        af, ab = self.attention()
        extra = 4 * b * k * keys * C
        f, bw = nl * (lf + extra * af), nl * (lb + extra * ab)
        for name, on in (("head", spec.last), ("embed", spec.first)):
            if on:
                pf, pb = self.piece(name, m)
                f, bw = f + pf, bw + pb
        return f, bw


class FlopModel(ComputeModel):
    """A FLOP rate (costs.RANK_FLOPS) per rank; a backward costs two forwards; the pieces
    have no attention (all of it is priced by attention())."""
    CAL_T = 0

    def __init__(self, cfg, flops=costs.RANK_FLOPS):
        super().__init__(cfg)
        self.flops = flops

    def piece(self, name, m):
        per_token = {"layer": costs.layer_cost(self.cfg, 0), "head": costs.head_cost(self.cfg),
                     "embed": costs.embed_cost(self.cfg)}[name]
        f = per_token * m / self.flops
        return f, 2 * f

    def attention(self):
        return 1 / self.flops, 2 / self.flops


class MeasuredModel(ComputeModel):
    """Seconds measured on this CPU (calibrate.load), interpolated in log m between the
    measured token counts and proportional to m beyond them; `threads` BLAS threads per rank
    (scaled by the measured 1 → 2 thread speed-up per doubling) and `share` ≥ 1 when ranks ×
    threads exceed the node's cores."""

    def __init__(self, cfg, calibration, threads=1, share=1.0):
        super().__init__(cfg)
        self.cal, self.threads, self.share = calibration, threads, share

    def _at(self, table, m):
        pts = sorted((int(k), v) for k, v in table.items())
        if m <= pts[0][0]:
            return [x * max(m / pts[0][0], 0.5) for x in pts[0][1]]
        if m >= pts[-1][0]:
            return [x * m / pts[-1][0] for x in pts[-1][1]]
        for (m0, v0), (m1, v1) in zip(pts, pts[1:]):
            if m0 <= m <= m1:
                w = math.log(m / m0) / math.log(m1 / m0)
                return [m * ((1 - w) * a / m0 + w * c / m1) for a, c in zip(v0, v1)]

    def piece(self, name, m):
        by_threads = self.cal[name]
        t1 = self._at(by_threads["1"], m)
        scale = 1.0
        if self.threads > 1 and "2" in by_threads:
            t2 = self._at(by_threads["2"], m)
            scale = (sum(t2) / sum(t1)) ** math.log2(self.threads)
        elif self.threads > 1:
            scale = 1.0 / self.threads
        return tuple(x * scale * self.share for x in t1)

    def attention(self):
        by_threads = self.cal["attention"]
        one = by_threads["1"]
        if self.threads > 1 and "2" in by_threads:
            scale = (sum(by_threads["2"]) / sum(one)) ** math.log2(self.threads)
        else:
            scale = 1.0 / self.threads
        return tuple(x * scale * self.share for x in one)


def _action_costs(cfg, layout, B, T, compute, net, node_of):
    """{action: seconds} for every compute action of replica 0's programs; a message to a
    neighbour stage on another rank adds its α-β time to the action that sends it."""
    progs = layout.programs(T)
    M, C = layout.microbatches, cfg.channels
    b = max(1, B // (layout.dp * M))
    lengths = layout.lengths(T)
    starts = [sum(lengths[:j]) for j in range(len(lengths))]
    where = layout.ranks_of_stages
    node = (lambda s: node_of[layout.world_rank(where[s], 0)]) if node_of else (lambda s: 0)
    memo, out = {}, {}
    for prog in progs:
        for a in prog:
            if a.kind not in ("F", "B", "I", "W"):
                continue
            if (a.s, a.j) not in memo:
                memo[(a.s, a.j)] = compute.stage(layout.spec(a.s), b, lengths[a.j], starts[a.j])
            f, bw = memo[(a.s, a.j)]
            t = {"F": f, "B": bw, "I": bw / 2, "W": bw / 2}[a.kind]
            to = a.s + 1 if a.kind == "F" else a.s - 1
            if a.kind != "W" and 0 <= to < layout.stages and where[to] != where[a.s]:
                t += net.seconds(b * lengths[a.j] * C * 4, node(to) == node(a.s))
            out[a] = t
    return progs, out


def pipelined_seconds(progs, seconds, pp, v, M, n, limit=SIMULATE_UNITS):
    """(seconds of the pipelined part, its idle fraction): simulated, or above `limit` units
    TeraPipe's bound on the bottleneck rank: its work plus pp − 1 of its dearest slice's
    forward and backward (over v when virtual stages shorten the fill)."""
    if pp * v * M * n <= limit:
        _, end, idle = costs.measured_pipeline(progs, seconds)
        return end, idle
    per_rank = [sum(seconds[a] for a in prog if a in seconds) for prog in progs]
    r = max(range(len(progs)), key=lambda i: per_rank[i])
    dearest = {kind: max((seconds[a] for a in progs[r] if a.kind in kinds), default=0.0)
               for kind, kinds in (("F", "F"), ("B", ("B", "I", "W")))}
    split = any(a.kind == "I" for a in progs[r])
    unit = dearest["F"] + dearest["B"] * (2 if split else 1)
    end = per_rank[r] + (pp - 1) * unit / v
    return end, 1.0 - sum(per_rank) / (len(progs) * end)


def pipeline_part(cfg, layout, B, T, compute, net=Net(), node_of=None):
    """(seconds, idle fraction) of the pipelined part of a step."""
    progs, seconds = _action_costs(cfg, layout, B, T, compute, net, node_of)
    return pipelined_seconds(progs, seconds, layout.pp, layout.virtual_stages,
                             layout.microbatches, layout.n_slices(T))


def step_seconds(cfg, layout, B, T, compute, net=Net(), node_of=None, zero=False,
                 adamw_seconds=2e-9, hierarchical=False, pipeline=None, shared=False):
    """{"step", "pipeline", "reduce", "optimizer", "bubble"} predicted for layout (seconds;
    bubble: the pipelined part's idle fraction). node_of[world rank] gives nodes (None: one
    node); adamw_seconds the optimizer's time per parameter; pipeline: pipeline_part's
    result when already known (it does not depend on zero or the reduction); shared:
    node-shared data parallelism where the node map allows it (Layout.shared_replicas): the
    caller says whether /dev/shm holds its windows (memory.shared_copies)."""
    from mpigpt2.model.params import ParamLayout
    pipe, idle = pipeline or pipeline_part(cfg, layout, B, T, compute, net, node_of)
    nodes = node_of or [0] * (layout.pp * layout.dp)
    allreduce = hierarchical_allreduce if hierarchical else ring_allreduce
    wte = cfg.padded_vocab_size * cfg.channels if layout.pp > 1 else 0
    first, last = layout.wte_ranks
    holders = [nodes[layout.world_rank(s, q)] for q in range(layout.dp) for s in (first, last)]
    reduce = opt = 0.0
    n = layout.shared_replicas(nodes) if shared and not zero else 1
    for r in range(layout.pp):
        P = ParamLayout(cfg, layout.rank_spec(r)).size
        ring = [nodes[layout.world_rank(r, q)] for q in range(layout.dp)]
        own = wte if r in (first, last) else 0  # the tied wte: summed over its holders
        if n > 1:  # one copy per node: the in-node sum, slices between nodes, 1/n updated
            t = shared_reduce(4 * P, ring, net)
            if own and first != last:  # wte's slices: with the other wte stage, every node
                t += ring_allreduce(4 * own / n, sorted(set(ring)) * 2, net)
            reduce, opt = max(reduce, t), max(opt, P / n * adamw_seconds)
            continue
        t = allreduce(4 * (P - own), ring, net)
        if own:
            t += allreduce(4 * own, holders if first != last else ring, net)
        reduce = max(reduce, t * (ZERO_COMM if zero else 1.0))
        opt = max(opt, P / (layout.dp if zero else 1) * adamw_seconds)
    total = pipe + reduce + opt + STEP_OVERHEAD
    return {"step": total, "pipeline": pipe, "reduce": reduce, "optimizer": opt,
            "bubble": idle}


def default_layout_seconds(cfg, layout, B, T, net=None, node_of=None, shared=True):
    """The default layout's score of one pp (layout.default_pp, which builds the layout:
    layout.scored_layout): a FLOP rate per rank, the optimizer included (node-shared dp, where
    `shared`, updates 1/n of it per rank)."""
    return step_seconds(cfg, layout, B, T, FlopModel(cfg), net or Net(), node_of,
                        shared=shared)["step"]
