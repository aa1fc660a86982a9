"""The cost model's parts (pure): FLOPs per stage, pipeline step time, bubble, bytes between
nodes. parallel/stepcost.py puts them together into the one step-time model (the default
layout and the planner); observe.metrics (the predicted bubble of the step line), autotune (the
step time of each slice length) and --print-schedule price a step here.
"""

# constants of the default-layout model (orders of magnitude measured on our machines)
RANK_FLOPS = 50e9        # float32 FLOP/s a rank gets when ranks share cores
ALLREDUCE_BPS = 2e9      # bytes/s of a ring allreduce between ranks of one node


def layer_cost(cfg, T):
    """Forward FLOPs per token of one transformer block (matmuls + attention, mean prefix T/2)."""
    C = cfg.channels
    return 24 * C * C + 2 * T * C


def head_cost(cfg):
    """Forward FLOPs per token of the logits matmul, plus the softmax/cross-entropy passes."""
    return 2 * cfg.channels * cfg.padded_vocab_size + 5 * cfg.vocab_size


def embed_cost(cfg):
    """The embedding lookup and its scatter-add backward, weighted as memory-bound work."""
    return 16 * cfg.channels


def stage_costs(cfg, T, stage_layers):
    """Forward FLOPs per token of each stage: its layers, plus embedding (first) and logits
    and loss (last)."""
    cost = [n * layer_cost(cfg, T) for n in stage_layers]
    cost[0] += embed_cost(cfg)
    cost[-1] += head_cost(cfg)
    return cost


def pipeline_seconds(unit_seconds, M, pp):
    """Step time of a pipelined step (TeraPipe's bound): M micro-batches of the bottleneck
    stage's units (slices, in order), plus pp − 1 of its slowest unit to fill and drain."""
    t = list(unit_seconds)
    return M * sum(t) + (pp - 1) * max(t)


def bubble_fraction(pp, M, n):
    """Idle fraction of a step of M micro-batches × n equal slices on pp stages."""
    work = M * n
    return 1.0 - work / pipeline_seconds([1.0] * n, M, pp)


def idle_fraction(timeline, **costs):
    """Idle fraction of a simulated step (schedule.simulate with the same costs: all stages,
    tick 0 to the end)."""
    from mpigpt2.parallel.schedule import cost_of
    end = max(t + cost_of(a.kind, **costs) for tl in timeline for t, a in tl)
    work = sum(cost_of(a.kind, **costs) for tl in timeline for _, a in tl)
    return 1.0 - work / (end * len(timeline))


def unit_bubble(progs):
    """Idle fraction of a schedule simulated with unit costs per chunk action (F = 1, B = 2,
    I = W = 1: a backward costs two forwards, its halves one each)."""
    from mpigpt2.parallel.schedule import simulate
    kinds = dict(f_cost=1, b_cost=2, i_cost=1, w_cost=1)
    return idle_fraction(simulate(progs, **kinds), **kinds)


def measured_pipeline(progs, seconds):
    """The schedule simulated with measured costs (docs/design.md#predicted-and-measured-
    bubble): seconds maps every compute Action of progs to its measured seconds (from
    whichever rank ran it). Returns (timeline of (start, action) per rank, predicted seconds
    of the pipelined part, its idle fraction 1 − work / (p · end))."""
    from mpigpt2.parallel.schedule import simulate
    timeline = simulate(progs, costs=lambda a: seconds[a])
    end = max((t + seconds[a] for tl in timeline for t, a in tl), default=0.0)
    work = sum(seconds[a] for tl in timeline for _, a in tl)
    return timeline, end, (1.0 - work / (len(progs) * end) if end > 0 else 0.0)


def _ring_bytes(nodes, nbytes):
    """Bytes a ring allreduce of nbytes over ranks on `nodes` (in ring order) sends between
    nodes: 2·(n−1)/n · nbytes over every ring edge that joins two nodes."""
    n = len(nodes)
    if n < 2:
        return 0.0
    return sum(nodes[i] != nodes[(i + 1) % n] for i in range(n)) * 2 * (n - 1) / n * nbytes


def cross_node_bytes(layout, node_of, stage_bytes, act_bytes, wte_bytes=0):
    """Bytes one step sends between nodes under layout's rank order, node_of[world rank]
    giving each rank's node: every pipeline boundary whose two stages sit on different nodes
    carries act_bytes (a replica's activations forward and gradients back); each stage's
    data-parallel ring its gradient bytes without wte (stage_bytes[pipe rank]); and the ring
    of every rank holding the tied wte (the first and last stage of each replica, in the
    embed communicator's order) wte_bytes (docs/design.md#layout)."""
    pp, dp, total = layout.pp, layout.dp, 0.0
    for q in range(dp):
        for s in range(pp - 1):
            if node_of[layout.world_rank(s, q)] != node_of[layout.world_rank(s + 1, q)]:
                total += act_bytes
    for s in range(pp):
        total += _ring_bytes([node_of[layout.world_rank(s, q)] for q in range(dp)],
                             stage_bytes[s])
    first, last = layout.wte_ranks
    holders = sorted({(q * pp + s, layout.world_rank(s, q)) for q in range(dp)
                      for s in (first, last)})
    return total + _ring_bytes([node_of[w] for _, w in holders], wte_bytes)
