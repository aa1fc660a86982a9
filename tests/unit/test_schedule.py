"""Schedules, layouts and tags as pure data: literal tables and every validator rule, no MPI."""

import subprocess
import sys

import pytest

from mpigpt2.parallel import costs, schedule as S
from mpigpt2.model.config import PRESETS
from mpigpt2.base.errors import UserError
from mpigpt2.parallel.layout import resolve, balanced_partition, default_pp
from mpigpt2.parallel.schedule import Action, ScheduleError

GPIPE_2_2_2 = """\
tick stage0   stage1  
   0 F0.0     .       
   1 F0.1     F0.0    
   2 F1.0     F0.1    
   3 F1.1     F1.0    
   4 .        F1.1    
   5 .        B0.1    
   6 B0.1     B0.0    
   7 B0.0     B1.1    
   8 B1.1     B1.0    
   9 B1.0     .       """

ONEFONEB_2_2_2 = """\
tick stage0   stage1  
   0 F0.0     .       
   1 F0.1     F0.0    
   2 F1.0     F0.1    
   3 .        B0.1    
   4 B0.1     F1.0    
   5 F1.1     B0.0    
   6 B0.0     F1.1    
   7 .        B1.1    
   8 B1.1     B1.0    
   9 B1.0     .       """

ONEFONEB_3_3_1 = """\
tick stage0   stage1   stage2  
   0 F0.0     .        .       
   1 F1.0     F0.0     .       
   2 F2.0     F1.0     F0.0    
   3 .        .        B0.0    
   4 .        B0.0     F1.0    
   5 B0.0     F2.0     B1.0    
   6 .        B1.0     F2.0    
   7 B1.0     .        B2.0    
   8 .        B2.0     .       
   9 B2.0     .        .       """

# 1F1B with M < pp (Megatron's clamped warm-up): stage s warms up with min(M·n, n-1+p-1-s)
# forwards, so stages 0-2 run GPipe's order and stage 3 alternates after one forward
ONEFONEB_4_2_2 = """\
tick stage0   stage1   stage2   stage3  
   0 F0.0     .        .        .       
   1 F0.1     F0.0     .        .       
   2 F1.0     F0.1     F0.0     .       
   3 F1.1     F1.0     F0.1     F0.0    
   4 .        F1.1     F1.0     F0.1    
   5 .        .        .        B0.1    
   6 .        .        B0.1     F1.0    
   7 .        B0.1     F1.1     B0.0    
   8 B0.1     .        B0.0     F1.1    
   9 .        B0.0     .        B1.1    
  10 B0.0     .        B1.1     B1.0    
  11 .        B1.1     B1.0     .       
  12 B1.1     B1.0     .        .       
  13 B1.0     .        .        .       """


@pytest.mark.parametrize("name,p,M,n,want", [("gpipe", 2, 2, 2, GPIPE_2_2_2),
                                             ("1f1b", 2, 2, 2, ONEFONEB_2_2_2),
                                             ("1f1b", 3, 3, 1, ONEFONEB_3_3_1),
                                             ("1f1b", 4, 2, 2, ONEFONEB_4_2_2)])
def test_literal_tables(name, p, M, n, want):
    assert S.table(S.build(name, p, M, n)) == want


def test_lowered_program_literal():
    prog = S.build("1f1b", 2, 2, 2)[1]
    assert " ".join(map(str, prog)) == (
        "RECV_F0.0 RECV_F0.1 RECV_F1.0 RECV_F1.1 F0.0 F0.1 B0.1 SEND_B0.1 F1.0 B0.0 SEND_B0.0 "
        "F1.1 B1.1 SEND_B1.1 B1.0 SEND_B1.0 REDUCE")


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
    progs = [S.lower(S.BUILDERS[name](s, p, M, n), s, p, M, n) for s in range(p)]
    mutate(progs)
    return progs


def swap(prog, a, b):
    i, j = prog.index(Action.parse(a)), prog.index(Action.parse(b))
    prog[i], prog[j] = prog[j], prog[i]


@pytest.mark.parametrize("mutate,message", [
    (lambda ps: swap(ps[0], "F0.0", "F0.1"), "forward slices must ascend"),
    (lambda ps: swap(ps[0], "B0.1", "B0.0"), "backward slices must descend"),
    (lambda ps: swap(ps[1], "B0.1", "F0.1"), "needs all of its forward slices"),
    (lambda ps: ps[0].remove(Action.parse("B1.0")), "missing B1.0"),
    (lambda ps: ps[0].insert(5, Action.parse("F0.0")), "appears twice"),
    (lambda ps: ps[1].remove(Action.parse("RECV_F1.1")), "no receive posted"),
    (lambda ps: ps[0].remove(Action.parse("SEND_F1.0")), "SEND_F1.0 missing"),
    (lambda ps: ps[1].insert(0, Action.parse("RECV_B0.0")), "no peer stage"),
    (lambda ps: ps[0].append(S.REDUCE()), "REDUCE"),
    (lambda ps: ps[0].insert(0, Action.parse("F5.0")), "out of range"),
])
def test_validator_rejects(mutate, message):
    with pytest.raises(ScheduleError, match=message):
        S.validate(progs_with(mutate), 2, 2)


def test_deadlock_detected():
    """A cross-rank cycle that every per-rank rule accepts: stage 0 runs F0 B0 F1 B1, stage 1
    runs F1 B1 F0 B0. Stage 0's B0 waits for stage 1's B0, which comes after stage 1's F1,
    which waits for stage 0's F1, which comes after B0. Only the simulator can see it."""
    M, n, p = 2, 1, 2
    order = [[S.F(0, 0), S.B(0, 0), S.F(1, 0), S.B(1, 0)],
             [S.F(1, 0), S.B(1, 0), S.F(0, 0), S.B(0, 0)]]
    progs = [S.lower(order[s], s, p, M, n) for s in range(p)]
    for s, prog in enumerate(progs):
        S._check_rank(prog, s, p, M, n)  # each rank alone is well formed
    with pytest.raises(ScheduleError, match="deadlock at tick 1: stages wait on B0.0, F1.0"):
        S.validate(progs, M, n)
    swapped = [S.lower(order[0], s, p, M, n) for s in range(p)]  # same order on both: fine
    S.validate(swapped, M, n)


def test_tags_unique_and_invertible():
    M, n = 3, 5
    tags = {}
    for d in (S.FORWARD, S.BACKWARD):
        for mb in range(M):
            for j in range(n):
                t = S.tag(d, mb, j, M, n)
                assert S.untag(t, M, n) == (d, mb, j)
                tags[t] = 1
    assert len(tags) == 2 * M * n and max(tags) == S.max_tag(M, n)


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
    parallelism wins; big models: pp grows until a rank's training state fits in memory."""
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
    (lambda ps: swap(ps[0], "I0.0", "W0.0"), "W0.0 before I0.0"),
    (lambda ps: ps[0].remove(S.Action.parse("W0.1")), "missing W0.1: I and W come in pairs"),
    (lambda ps: ps[0].insert(0, S.Action.parse("B0.0")), "both given"),
])
def test_validator_rejects_split_backward_errors(mutate, message):
    progs = [S.lower(c, s, 2, 1, 2) for s, c in enumerate(S.zb_h1(2, 1, 2))]
    S.validate(progs, 1, 2)  # (valid before the mutation)
    mutate(progs)
    with pytest.raises(ScheduleError, match=message):
        S.validate(progs, 1, 2)
