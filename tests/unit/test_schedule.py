"""Schedules, layouts and tags as pure data: literal tables and every validator rule, no MPI."""

import subprocess
import sys

import pytest

from mpigpt2.parallel import builders, costs, schedule as S
from mpigpt2.model.config import PRESETS
from mpigpt2.base.errors import UserError
from mpigpt2.parallel.layout import resolve, balanced_partition, default_pp
from mpigpt2.parallel.schedule import Action, ScheduleError

GPIPE_2_2_2 = """\
tick rank0    rank1   
   0 0F0.0    .       
   1 0F0.1    1F0.0   
   2 0F1.0    1F0.1   
   3 0F1.1    1F1.0   
   4 .        1F1.1   
   5 .        1B0.1   
   6 0B0.1    1B0.0   
   7 0B0.0    1B1.1   
   8 0B1.1    1B1.0   
   9 0B1.0    .       """

ONEFONEB_2_2_2 = """\
tick rank0    rank1   
   0 0F0.0    .       
   1 0F0.1    1F0.0   
   2 0F1.0    1F0.1   
   3 .        1B0.1   
   4 0B0.1    1F1.0   
   5 0F1.1    1B0.0   
   6 0B0.0    1F1.1   
   7 .        1B1.1   
   8 0B1.1    1B1.0   
   9 0B1.0    .       """

ONEFONEB_3_3_1 = """\
tick rank0    rank1    rank2   
   0 0F0.0    .        .       
   1 0F1.0    1F0.0    .       
   2 0F2.0    1F1.0    2F0.0   
   3 .        .        2B0.0   
   4 .        1B0.0    2F1.0   
   5 0B0.0    1F2.0    2B1.0   
   6 .        1B1.0    2F2.0   
   7 0B1.0    .        2B2.0   
   8 .        1B2.0    .       
   9 0B2.0    .        .       """

# 1F1B with M < pp (Megatron's clamped warm-up): stage s warms up with min(M·n, n-1+p-1-s)
# forwards, so stages 0-2 run GPipe's order and stage 3 alternates after one forward
ONEFONEB_4_2_2 = """\
tick rank0    rank1    rank2    rank3   
   0 0F0.0    .        .        .       
   1 0F0.1    1F0.0    .        .       
   2 0F1.0    1F0.1    2F0.0    .       
   3 0F1.1    1F1.0    2F0.1    3F0.0   
   4 .        1F1.1    2F1.0    3F0.1   
   5 .        .        .        3B0.1   
   6 .        .        2B0.1    3F1.0   
   7 .        1B0.1    2F1.1    3B0.0   
   8 0B0.1    .        2B0.0    3F1.1   
   9 .        1B0.0    .        3B1.1   
  10 0B0.0    .        2B1.1    3B1.0   
  11 .        1B1.1    2B1.0    .       
  12 0B1.1    1B1.0    .        .       
  13 0B1.0    .        .        .       """


@pytest.mark.parametrize("name,p,M,n,want", [("gpipe", 2, 2, 2, GPIPE_2_2_2),
                                             ("1f1b", 2, 2, 2, ONEFONEB_2_2_2),
                                             ("1f1b", 3, 3, 1, ONEFONEB_3_3_1),
                                             ("1f1b", 4, 2, 2, ONEFONEB_4_2_2)])
def test_literal_tables(name, p, M, n, want):
    assert S.table(S.build(name, p, M, n)) == want


def test_lowered_program_literal():
    prog = S.build("1f1b", 2, 2, 2)[1]
    assert " ".join(map(str, prog)) == (
        "1RECV_F0.0 1RECV_F0.1 1RECV_F1.0 1RECV_F1.1 1F0.0 1F0.1 1B0.1 1SEND_B0.1 1F1.0 1B0.0 "
        "1SEND_B0.0 1F1.1 1B1.1 1SEND_B1.1 1B1.0 1SEND_B1.0 REDUCE")


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
@pytest.mark.parametrize("p,M,n", [(1, 1, 1), (2, 2, 4), (3, 4, 2), (4, 4, 16), (4, 8, 1)])
def test_bubble_matches_formula(name, p, M, n):
    """With unit costs the simulated idle fraction is (p-1)/(M·n+p-1), which is also what the
    cost model predicts."""
    tl = S.simulate(S.build(name, p, M, n))
    assert abs(costs.idle_fraction(tl) - (p - 1) / (M * n + p - 1)) < 1e-12
    assert abs(costs.bubble_fraction(p, M, n) - (p - 1) / (M * n + p - 1)) < 1e-12


def test_actions_round_trip():
    for prog in S.build("1f1b", 3, 3, 2):
        assert [Action.parse(str(a)) for a in prog] == prog
    with pytest.raises(ScheduleError):
        Action.parse("X1.2")
    with pytest.raises(ScheduleError):
        Action.parse("F1.2")  # (the stage is part of an action)


def test_one_f_one_b_bounds_memory():
    """1F1B keeps at most n+p-1-s (micro-batch, slice) units in flight on stage s."""
    p, M, n = 4, 8, 2
    for s, prog in enumerate(S.build("1f1b", p, M, n)):
        live = peak = 0
        for a in prog:
            live += (a.kind == "F") - (a.kind == "B")
            peak = max(peak, live)
        assert peak == n + p - 1 - s
        gp = S.build("gpipe", p, M, n)[s]
        assert max(sum(1 for a in gp[:i] if a.kind == "F") for i in range(len(gp))) == M * n


def progs_with(mutate, name="gpipe", p=2, M=2, n=2):
    pipe = S.make_pipe(p, M, n)
    progs = [S.lower(c, r, pipe) for r, c in enumerate(builders.BUILDERS[name](pipe))]
    mutate(progs)
    return progs


def swap(prog, a, b):
    i, j = prog.index(Action.parse(a)), prog.index(Action.parse(b))
    prog[i], prog[j] = prog[j], prog[i]


@pytest.mark.parametrize("mutate,message", [
    (lambda ps: swap(ps[0], "0F0.0", "0F0.1"), "forward slices must ascend"),
    (lambda ps: swap(ps[0], "0B0.1", "0B0.0"), "backward slices must descend"),
    (lambda ps: swap(ps[1], "1B0.1", "1F0.1"), "needs all of its forward slices"),
    (lambda ps: ps[0].remove(Action.parse("0B1.0")), "missing 0B1.0"),
    (lambda ps: ps[0].insert(5, Action.parse("0F0.0")), "appears twice"),
    (lambda ps: ps[1].remove(Action.parse("1RECV_F1.1")), "no receive posted"),
    (lambda ps: ps[0].remove(Action.parse("0SEND_F1.0")), "0SEND_F1.0 missing"),
    (lambda ps: ps[1].insert(0, Action.parse("1RECV_B0.0")), "no peer stage"),
    (lambda ps: ps[0].append(S.REDUCE()), "REDUCE"),
    (lambda ps: ps[0].insert(0, Action.parse("0F5.0")), "out of range"),
    (lambda ps: ps[0].insert(0, Action.parse("1F0.0")), "names stage 1, which rank 0 does not"),
])
def test_validator_rejects(mutate, message):
    with pytest.raises(ScheduleError, match=message):
        S.validate(progs_with(mutate), S.make_pipe(2, 2, 2))


def test_deadlock_detected():
    """A cross-rank cycle that every per-rank rule accepts: stage 0 runs F0 B0 F1 B1, stage 1
    runs F1 B1 F0 B0. Stage 0's B0 waits for stage 1's B0, which comes after stage 1's F1,
    which waits for stage 0's F1, which comes after B0. Only the simulator can see it."""
    pipe = S.make_pipe(2, 2, 1)
    order = [[0, 1], [1, 0]]  # micro-batch order per rank
    progs = [S.lower([x for mb in order[r] for x in (S.F(r, mb, 0), S.B(r, mb, 0))], r, pipe)
             for r in range(2)]
    for r, prog in enumerate(progs):
        S._check_rank(prog, r, pipe)  # each rank alone is well formed
    with pytest.raises(ScheduleError, match="deadlock: ranks wait on 0B0.0, 1F1.0"):
        S.validate(progs, pipe)
    same = [S.lower([x for mb in order[0] for x in (S.F(r, mb, 0), S.B(r, mb, 0))], r, pipe)
            for r in range(2)]  # the same order on both: fine
    S.validate(same, pipe)


def test_tags_unique_and_invertible():
    P, M, n = 4, 3, 5
    tags = {}
    for d in (S.FORWARD, S.BACKWARD):
        for s in range(P):
            for mb in range(M):
                for j in range(n):
                    t = S.tag(d, s, mb, j, P, M, n)
                    assert S.untag(t, P, M, n) == (d, s, mb, j)
                    tags[t] = 1
    assert len(tags) == 2 * P * M * n and max(tags) == S.max_tag(P, M, n)


def test_partition_no_layer_dropped_or_duplicated():
    for cfg in PRESETS.values():
        for pp in range(1, min(cfg.num_layers, 8) + 1):
            counts = balanced_partition(cfg, 256, pp)
            assert len(counts) == pp and sum(counts) == cfg.num_layers and min(counts) >= 1
            lay = resolve(pp, cfg, 8 * pp, 64, pp=pp, dp=1)
            layers = [l for s in range(pp) for l in range(lay.spec(s).l0, lay.spec(s).l1)]
            assert layers == list(range(cfg.num_layers))


def test_partition_balances_the_head():
    """The logits matmul weighs on the last stage: it gets fewer layers."""
    counts = balanced_partition(PRESETS["gpt2-124m"], 1024, 4)
    assert counts[-1] < counts[0] and sum(counts) == 12
    assert balanced_partition(PRESETS["gpt2-tiny"], 64, 2) == (3, 1)


def test_default_layout_rule():
    """Small models: the logits dominate, pipelining cannot balance them, so pure data
    parallelism wins; big models: pp grows until a rank's training state fits in memory, and
    to the most stages where none does (gpt2-1558m on a 24 GB node of 8 or 4 ranks)."""
    tiny, big = PRESETS["gpt2-tiny"], PRESETS["gpt2-1558m"]
    assert default_pp(8, tiny, 8, 64) == 1
    assert default_pp(8, big, 64, 256, mem_bytes=24e9, ranks_per_node=8) == 8
    assert default_pp(4, big, 64, 256, mem_bytes=24e9, ranks_per_node=4) == 4
    assert default_pp(2, PRESETS["gpt2-124m"], 8, 64, mem_bytes=24e9, ranks_per_node=2) == 1
    lay = resolve(8, tiny, 8, 64)
    assert (lay.pp, lay.dp, lay.microbatches, lay.slice_tokens) == (1, 8, 1, 64)
    lay = resolve(8, big, 64, 256, mem_bytes=24e9, ranks_per_node=8)
    assert (lay.pp, lay.dp, lay.microbatches, lay.schedule) == (8, 1, 8, "1f1b")
    assert 256 % lay.slice_tokens == 0 and lay.slice_tokens == 64


@pytest.mark.parametrize("kw,message", [
    (dict(pp=3), "does not divide the 8 MPI ranks"),
    (dict(pp=2, dp=2), "mpiexec started 8 ranks"),
    (dict(pp=8, dp=1), "exceeds the model's 4 layers"),
    (dict(pp=2, stage_layers="2,1"), "sums to 3 but the model has 4 layers"),
    (dict(pp=2, stage_layers="2,1,1"), "has 3 entries"),
    (dict(pp=2, stage_layers="4,0"), "stage 1 has 0 layers"),
    (dict(pp=2, stage_layers="a,b"), "comma-separated"),
    (dict(slice_tokens=7), "does not divide --seq-len"),
    (dict(slice_tokens=(32, 16)), "sums to 48 tokens, but --seq-len is 64"),
    (dict(slice_tokens=(64, 0)), "slice 1 has 0 tokens"),
    (dict(slice_tokens=(70, -6)), "slice 1 has -6 tokens"),
    (dict(slice_tokens=0), "must be ≥ 1"),
    (dict(pp=2, microbatches=3), "not divisible by dp × microbatches"),
    (dict(schedule="zigzag"), "choose one of"),
])
def test_layout_errors(kw, message):
    with pytest.raises(UserError, match=message):
        resolve(8, PRESETS["gpt2-tiny"], 8, 64, **kw)


def test_math_modules_import_without_mpi():
    """ops, model, stage, schedule, layout never import MPI (mpi4py blocked here)."""
    code = ("import sys; sys.modules['mpi4py'] = None; sys.modules['mpi4py.MPI'] = None\n"
            "import mpigpt2.model.ops, mpigpt2.model.gpt, mpigpt2.model.stage, mpigpt2.parallel.schedule, "
            "mpigpt2.parallel.layout, mpigpt2.model.params, mpigpt2.model.optim, mpigpt2.formats.data\nprint('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.stdout.strip() == "ok", r.stderr


@pytest.mark.parametrize("p,M,n", [(4, 1, 1), (4, 2, 1), (4, 1, 8), (4, 3, 2), (3, 2, 4),
                                   (8, 2, 2), (2, 1, 1)])
def test_one_f_one_b_with_few_micro_batches(p, M, n):
    """M < pp: valid, deadlock-free, GPipe's order where the warm-up covers the step, never
    more units alive than GPipe, and at most n+p-1-s where it does not."""
    from mpigpt2.parallel.memory import in_flight
    ours, gp = S.build("1f1b", p, M, n), S.build("gpipe", p, M, n)
    for s in range(p):
        compute = [a for a in ours[s] if a.kind in ("F", "B")]
        if M * n <= n - 1 + p - 1 - s:
            assert compute == [a for a in gp[s] if a.kind in ("F", "B")]
        units = in_flight(ours[s])[0]
        assert units <= in_flight(gp[s])[0] and units <= n + p - 1 - s


def step_ticks(progs, **costs):
    return max(t + S.cost_of(a.kind, **costs) for tl in S.simulate(progs, **costs)
               for t, a in tl)


@pytest.mark.parametrize("p,M,n", [(2, 1, 4), (4, 4, 1), (4, 8, 1), (2, 4, 2), (4, 2, 2),
                                   (3, 1, 1), (4, 4, 4), (2, 1, 8), (3, 6, 1), (4, 1, 32)])
def test_zb_h1(p, M, n):
    """Valid (every unit F, I, W; W after I; slices in order), within 1F1B's peak memory
    (n+p-1 units), shorter than 1F1B with B = I + W, and at the zero-bubble paper's step
    length 3·M + (p-1) for unit costs at M = p, n = 1 (its figure's case)."""
    from mpigpt2.parallel.memory import in_flight
    zb = S.build("zb-h1", p, M, n)
    assert all(sum(a.kind == k for a in prog) == M * n for prog in zb for k in "FIW")
    assert not any(a.kind == "B" for prog in zb for a in prog)
    assert max(in_flight(prog)[0] for prog in zb) <= min(M * n, n + p - 1)
    ours, one = step_ticks(zb), step_ticks(S.build("1f1b", p, M, n), b_cost=2)
    assert ours < one or p == 1
    if n == 1 and M == p:
        assert ours == 3 * M + p - 1
    assert ours <= 3 * M * n + p - 1 + 2 * (p - 1)


@pytest.mark.parametrize("mutate,message", [
    (lambda ps: swap(ps[0], "0I0.0", "0W0.0"), "0W0.0 before 0I0.0"),
    (lambda ps: ps[0].remove(S.Action.parse("0W0.1")), "missing 0W0.1: I and W come in pairs"),
    (lambda ps: ps[0].insert(0, S.Action.parse("0B0.0")), "both given"),
])
def test_validator_rejects_split_backward_errors(mutate, message):
    pipe = S.make_pipe(2, 1, 2)
    progs = [S.lower(c, r, pipe) for r, c in enumerate(builders.zb_h1(pipe))]
    S.validate(progs, pipe)  # (valid before the mutation)
    mutate(progs)
    with pytest.raises(ScheduleError, match=message):
        S.validate(progs, pipe)


def test_non_uniform_slices():
    """Explicit lengths: kept in order, k is the longest, n their count; equal lengths are
    plain k; the CLI parses them."""
    from mpigpt2.parallel.autotune import parse_slice_tokens
    tiny = PRESETS["gpt2-tiny"]
    lay = resolve(2, tiny, 8, 64, pp=2, slice_tokens=parse_slice_tokens("32,16,8,8"))
    assert lay.lengths(64) == (32, 16, 8, 8) and lay.slice_tokens == 32
    assert lay.n_slices(64) == 4 and lay.slices_text(64) == "32,16,8,8"
    assert len(lay.programs(64)[0]) == len(resolve(2, tiny, 8, 64, pp=2, slice_tokens=16)
                                           .programs(64)[0])
    lay = resolve(2, tiny, 8, 64, pp=2, slice_tokens=(16, 16, 16, 16))
    assert lay.slice_lengths == () and lay.slice_tokens == 16
