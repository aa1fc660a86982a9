"""The schedules with virtual stages and split backward (parallel/builders.py): literal tables
for small cases, torch.distributed.pipelining's own builders as oracles, and the bubbles
against their closed forms."""

import os

import pytest

from mpigpt2.base.errors import UserError
from mpigpt2.model.config import GPTConfig, PRESETS
from mpigpt2.parallel import costs, schedule as S
from mpigpt2.parallel.layout import resolve
from mpigpt2.parallel.memory import in_flight

# interleaved 1F1B, p 2, v 2 (rank 0 holds stages 0 and 2, rank 1 stages 1 and 3), M 2, n 1:
# Megatron's order (a group of p micro-batches through chunk 0, then chunk 1), then 1F1B
INTERLEAVED_2_2_1 = """\
tick rank0    rank1   
   0 0F0.0    .       
   1 0F1.0    1F0.0   
   2 2F0.0    1F1.0   
   3 2F1.0    3F0.0   
   4 .        3B0.0   
   5 2B0.0    3F1.0   
   6 .        3B1.0   
   7 2B1.0    1B0.0   
   8 0B0.0    1B1.0   
   9 0B1.0    .       """

# ZB-V, p 2 (rank 0 holds stages 0 and 3, rank 1 stages 1 and 2), M 2, n 1: the V's turn
# (stage 2 to 3) and its way back (3 to 0) sit on one rank; Ws fill the tail
ZBV_2_2_1 = """\
tick rank0    rank1   
   0 0F0.0    .       
   1 0F1.0    1F0.0   
   2 .        2F0.0   
   3 3F0.0    1F1.0   
   4 3I0.0    2F1.0   
   5 3F1.0    2I0.0   
   6 3I1.0    1I0.0   
   7 0I0.0    2I1.0   
   8 3W0.0    1I1.0   
   9 0I1.0    2W0.0   
  10 3W1.0    1W0.0   
  11 0W0.0    2W1.0   
  12 0W1.0    1W1.0   """

# looped BFS, p 2, v 2, M 1, n 2: every forward slice of chunk 0, then of chunk 1; backwards
# last chunk first, slices descending
LOOPED_2_1_2 = """\
tick rank0    rank1   
   0 0F0.0    .       
   1 0F0.1    1F0.0   
   2 2F0.0    1F0.1   
   3 2F0.1    3F0.0   
   4 .        3F0.1   
   5 .        3B0.1   
   6 2B0.1    3B0.0   
   7 2B0.0    1B0.1   
   8 0B0.1    1B0.0   
   9 0B0.0    .       """


@pytest.mark.parametrize("name,placement,M,n,want", [
    ("interleaved-1f1b", S.loop_placement(2, 2), 2, 1, INTERLEAVED_2_2_1),
    ("zb-v", S.v_placement(2), 2, 1, ZBV_2_2_1),
    ("looped-bfs", S.loop_placement(2, 2), 1, 2, LOOPED_2_1_2)])
def test_literal_tables(name, placement, M, n, want):
    assert S.table(S.build(name, 2, M, n, placement)) == want


def torch_compute(tmp_path, name, p, M, v):
    from helpers_torch_schedules import torch_schedule_csv
    from mpigpt2.parallel import schedule_file
    path = torch_schedule_csv(os.path.join(tmp_path, f"{name}-{p}-{M}-{v}.csv"), name, p, M, v)
    return S.build(str(path), p, M, 1)


def compute_of(progs):
    return [[a for a in prog if a.kind in S.COMPUTE] for prog in progs]


def ticks(progs):
    return max(t + 1 for tl in S.simulate(progs) for t, _ in tl)


@pytest.mark.parametrize("p,M,v", [(2, 2, 2), (2, 4, 2), (4, 4, 2), (4, 8, 2), (2, 4, 3),
                                   (4, 8, 3), (3, 6, 2)])
def test_interleaved_equals_torch_order(tmp_path, p, M, v):
    """With whole micro-batches (n = 1) our interleaved 1F1B is torch's
    ScheduleInterleaved1F1B (Megatron's order) action for action."""
    ours = S.build("interleaved-1f1b", p, M, 1, S.loop_placement(p, v))
    assert compute_of(ours) == compute_of(torch_compute(tmp_path, "ScheduleInterleaved1F1B",
                                                        p, M, v))


@pytest.mark.parametrize("name,torch_name,v", [("zb-v", "ScheduleZBVZeroBubble", 2),
                                               ("zb-h1", "ScheduleInterleavedZeroBubble", 1),
                                               ("zb-h1", "ScheduleInterleavedZeroBubble", 2)])
@pytest.mark.parametrize("p,M", [(2, 2), (2, 4), (4, 4), (4, 8), (3, 6), (2, 8)])
def test_zero_bubble_as_short_as_torch(tmp_path, name, torch_name, v, p, M):
    """Our list-scheduled zero-bubble schedules against torch's builders (n = 1, unit costs
    F = I = W): the same peak of alive micro-batches, a step at most 2 ticks longer (ours is
    greedy; it is shorter in some cases)."""
    placement = S.v_placement(p) if name == "zb-v" else S.loop_placement(p, v)
    ours, theirs = S.build(name, p, M, 1, placement), torch_compute(tmp_path, torch_name, p, M, v)
    assert max(in_flight(x)[0] for x in ours) <= max(in_flight(x)[0] for x in theirs)
    assert ticks(ours) <= ticks(theirs) + 2


@pytest.mark.parametrize("p,M,n,v", [(2, 4, 1, 2), (4, 8, 1, 2), (4, 4, 2, 2), (2, 2, 4, 3),
                                     (4, 2, 4, 2), (3, 3, 1, 4), (4, 1, 8, 2)])
def test_interleaved_bubble(p, M, n, v):
    """Interleaved 1F1B idles (p-1)/(v·M·n + p-1) of the step with unit costs (Megatron's
    (p-1)/(v·m) of the ideal time) when n divides p or p divides n; 1F1B's is
    (p-1)/(M·n + p-1)."""
    tl = S.simulate(S.build("interleaved-1f1b", p, M, n, S.loop_placement(p, v)))
    assert costs.idle_fraction(tl) == pytest.approx((p - 1) / (v * M * n + p - 1), abs=1e-12)
    one = S.simulate(S.build("1f1b", p, M, n))
    assert costs.idle_fraction(tl) < costs.idle_fraction(one)


@pytest.mark.parametrize("p", [2, 3, 4, 6])
def test_zb_h1_bubble_is_a_third_of_1f1b(p):
    """Equal F, I, W costs (B = I + W): at M = p micro-batches the idle ticks per rank of
    zb-h1 are p-1, a third of 1F1B's 3(p-1) (Qi et al.'s (p-1)(F+B-2W) vs (p-1)(F+B))."""
    M = p
    zb = ticks(S.build("zb-h1", p, M, 1))
    one = max(t + S.cost_of(a.kind, b_cost=2) for tl in S.simulate(S.build("1f1b", p, M, 1),
                                                                 b_cost=2) for t, a in tl)
    assert zb - 3 * M == p - 1 and one - 3 * M == 3 * (p - 1)


@pytest.mark.parametrize("p,M,n", [(2, 1, 4), (2, 4, 4), (4, 4, 1), (4, 2, 2), (3, 3, 2)])
def test_zb_v_within_memory_and_shorter(p, M, n):
    """ZB-V: every unit's F, I and W on both chunks; at most 1F1B's peak of layer-units alive
    (2·(n+p-1) chunk units of half the layers); shorter than 1F1B at equal total costs."""
    zb = S.build("zb-v", p, M, n, S.v_placement(p))
    assert all(sum(a.kind == k for a in prog) == 2 * M * n for prog in zb for k in "FIW")
    assert max(in_flight(x)[0] for x in zb) <= 2 * min(M * n, n + p - 1)
    half = {"F": 0.5, "I": 0.5, "W": 0.5, "B": 1.0}
    ours = max(t + half[a.kind] for tl in S.simulate(zb, costs=lambda a: half[a.kind])
               for t, a in tl)
    assert ours < step_1f1b(p, M, n)


def step_1f1b(p, M, n):
    return max(t + S.cost_of(a.kind, b_cost=2) for tl in S.simulate(S.build("1f1b", p, M, n),
                                                                    b_cost=2) for t, a in tl)


@pytest.mark.parametrize("kw,message", [
    (dict(pp=1, virtual_stages=3, schedule="interleaved-1f1b"), "3 stages do not divide"),
    (dict(pp=2, virtual_stages=4, schedule="interleaved-1f1b"), "8 stages, but the model has 4"),
    (dict(pp=2, virtual_stages=0, schedule="interleaved-1f1b"), "must be ≥ 1"),
    (dict(pp=2, virtual_stages=1, schedule="zb-v"), "needs --virtual-stages 2"),
    (dict(pp=2, virtual_stages=2, schedule="1f1b"), "one stage per rank"),
    (dict(pp=2, virtual_stages=2, schedule="gpipe"), "one stage per rank"),
    (dict(pp=2, virtual_stages=2, stage_layers="1,1,2", schedule="zb-v"), "has 3 entries"),
])
def test_virtual_stage_errors(kw, message):
    with pytest.raises(UserError, match=message):
        resolve(8, PRESETS["gpt2-tiny"], 8, 64, **kw)


def test_uneven_chunks_need_explicit_layers():
    """pp·v must divide the layers unless --stage-layers says how to split them."""
    cfg = GPTConfig(max_seq_len=64, vocab_size=64, padded_vocab_size=64, num_layers=6,
                    num_heads=2, channels=8)
    lay = resolve(2, cfg, 8, 64, pp=2, virtual_stages=3, schedule="interleaved-1f1b")
    assert lay.stages == 6 and lay.stages_of(0) == (0, 2, 4)
    lay = resolve(2, cfg, 8, 64, pp=2, virtual_stages=2, stage_layers="2,1,2,1",
                  schedule="zb-v")
    assert lay.stages_of(0) == (0, 3) and lay.rank_spec(0).layers == (0, 1, 5)


def test_cross_node_bytes_and_the_rank_order():
    """pp 2 × dp 2 on two nodes of two ranks (node_of = 0 0 1 1): the pipe order keeps each
    pipeline on a node and sends both stages' gradient rings across (2 edges each); the data
    order keeps each ring on a node and sends both pipelines' activations across. auto picks
    the cheaper; one node, or a tie, keeps pipe."""
    from dataclasses import replace
    from mpigpt2.parallel.layout import choose_rank_order
    cfg = PRESETS["gpt2-tiny"]
    lay = resolve(4, cfg, 8, 64, pp=2)
    node_of = [0, 0, 1, 1]
    pipe, data = replace(lay, rank_order="pipe"), replace(lay, rank_order="data")
    assert [pipe.coords(r) for r in range(4)] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    assert [data.coords(r) for r in range(4)] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(x.world_rank(*x.coords(r)) == r for x in (pipe, data) for r in range(4))
    assert costs.cross_node_bytes(pipe, node_of, [100, 30], 7) == 2 * (100 + 30)
    assert costs.cross_node_bytes(data, node_of, [100, 30], 7) == 2 * 7
    # the tied wte's ring (in the pipe order's order: s0r0 s1r0 s0r1 s1r1) crosses twice in
    # the pipe order (nodes 0 0 1 1) and four times in the data order (0 1 0 1), 1.5 W each
    assert costs.cross_node_bytes(pipe, node_of, [100, 30], 7, 1000) == 260 + 3000
    assert costs.cross_node_bytes(data, node_of, [100, 30], 7, 1000) == 14 + 6000
    # gpt2-tiny: the 50k-row wte dominates, its ring crosses less in the pipe order
    assert choose_rank_order(cfg, lay, 8, 64, node_of, "auto") == "pipe"
    # wide layers and a small vocabulary: the stages' gradients outweigh the activations
    wide = GPTConfig(max_seq_len=64, vocab_size=64, padded_vocab_size=64, num_layers=4,
                     num_heads=4, channels=512)
    assert choose_rank_order(wide, resolve(4, wide, 8, 64, pp=2), 8, 64, node_of,
                             "auto") == "data"
    assert resolve(4, wide, 8, 64, pp=2, rank_order="auto", node_of=node_of).rank_order == "data"
    assert choose_rank_order(wide, lay, 8, 64, [0, 0, 0, 0], "auto") == "pipe"
    assert choose_rank_order(wide, lay, 8, 64, node_of, "pipe") == "pipe"
    with pytest.raises(UserError, match="--rank-order 'zig'"):
        resolve(4, cfg, 8, 64, pp=2, rank_order="zig")


def test_cores_count_each_node_on_its_own():
    """MFU's core count: per node its own CPUs, at most its ranks × threads (3 ranks on two
    nodes: 2 + 1 cores, where the old rank-0 extrapolation said 2)."""
    from mpigpt2.observe.metrics import node_cores
    got = [("a", 1, 4, 2), ("a", 2, 4, 2), ("b", 3, 4, 1)]
    assert node_cores(got, 1) == 3
    assert node_cores(got, 4) == 4 + 4
    assert node_cores([("a", 1, 2, 8)] * 8, 1) == 2  # oversubscribed: the node's 2 CPUs
