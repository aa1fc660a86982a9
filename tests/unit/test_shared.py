"""Node-shared data parallelism's pure parts: the in-place slot sum (parallel/shared.py), its
price in the step model (parallel/stepcost.py) and its memory (parallel/memory.py). The
reduction itself runs in the MPI parity matrix (tests/mpi, rows +shared and +shared4)."""

import numpy as np
import pytest

from mpigpt2.model.config import GPTConfig
from mpigpt2.model.params import ParamLayout
from mpigpt2.parallel import memory, shared, stepcost
from mpigpt2.parallel.layout import resolve

CFG = GPTConfig(max_seq_len=64, vocab_size=500, padded_vocab_size=512, num_layers=4,
                num_heads=2, channels=32)
NET = stepcost.Net(intra_latency=1e-6, intra_bps=1e9, inter_latency=1e-5, inter_bps=1e8)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [1, 2, 3, 8])
@pytest.mark.parametrize("lo,hi,block", [(0, 5000, 2048), (7, 4099, 2048), (100, 101, 16),
                                         (0, 5000, 1)])
def test_slot_sum_is_the_sequence_of_adds_bit_for_bit(dtype, n, lo, hi, block):
    """slot 0 over [lo, hi) becomes ((g0 + g1) + g2) + … exactly, nothing else changes."""
    rng = np.random.default_rng(n)
    slots = (rng.standard_normal((n, 5000)) * 10.0 ** rng.integers(-8, 8, (n, 5000)))
    slots = slots.astype(dtype)
    want = slots.copy()
    for j in range(1, n):
        want[0, lo:hi] = want[0, lo:hi] + slots[j, lo:hi]
    shared._sum_kernel()(slots, lo, hi, block)
    assert np.array_equal(slots, want)


def test_shared_reduce_prices_the_in_node_sum_and_the_ring_between_nodes():
    nbytes = 8e6
    assert stepcost.shared_reduce(nbytes, [0], NET) == 0.0
    inside = nbytes * 5 / 4 / stepcost.SHARED_SUM_BPS  # 4 ranks: 4 slices read, 1 written
    assert stepcost.shared_reduce(nbytes, [0] * 4, NET) == pytest.approx(inside)
    # two nodes of 4: the same in-node sum, then all the bytes ringed between the two nodes
    assert stepcost.shared_reduce(nbytes, [0] * 4 + [1] * 4, NET) == pytest.approx(
        inside + stepcost.ring_allreduce(nbytes, [0, 1], NET))
    # one node: far below MPI's ring over the same ranks (loopback at 1 GB/s here)
    assert stepcost.shared_reduce(nbytes, [0] * 8, NET) < \
        stepcost.ring_allreduce(nbytes, [0] * 8, NET) / 5


def test_step_model_updates_one_nth_per_rank_when_shared():
    lay = resolve(4, CFG, 8, 32, 1, 4)
    P = ParamLayout(CFG, lay.rank_spec(0)).size
    compute = stepcost.FlopModel(CFG)
    rep = stepcost.step_seconds(CFG, lay, 8, 32, compute, NET, adamw_seconds=1e-6)
    sh = stepcost.step_seconds(CFG, lay, 8, 32, compute, NET, adamw_seconds=1e-6, shared=True)
    assert rep["optimizer"] == pytest.approx(P * 1e-6)
    assert sh["optimizer"] == pytest.approx(P / 4 * 1e-6)
    assert sh["reduce"] < rep["reduce"]
    # ranks of a stage on separate nodes share nothing: the same as without
    spread = stepcost.step_seconds(CFG, lay, 8, 32, compute, NET, [0, 1, 2, 3],
                                   adamw_seconds=1e-6, shared=True)
    assert spread == stepcost.step_seconds(CFG, lay, 8, 32, compute, NET, [0, 1, 2, 3],
                                           adamw_seconds=1e-6)


def test_memory_counts_one_copy_of_parameters_and_moments_per_node():
    lay = resolve(4, CFG, 8, 32, 1, 4)
    P = ParamLayout(CFG, lay.rank_spec(0)).size
    rep, _, _ = memory.node_estimate(CFG, lay, [0, 1, 2, 3], 8, 32, 4, 0)
    sh, worst, _ = memory.node_estimate(CFG, lay, [0, 1, 2, 3], 8, 32, 4, 0, shared=True)
    assert worst.state == (P + 3 * P // 4) * 4  # its gradient slot and a quarter of the copy
    assert rep - sh == 4 * ((4 * P) - (P + 3 * P // 4)) * 4


def test_node_bytes_are_parameters_moments_and_every_slot():
    assert shared.node_bytes(4, 1000, 4) == (3 + 4) * 1000 * 4


def test_default_layout_counts_one_copy_per_node():
    """GPT-2 124M on 8 ranks of a 24 GB node: 8 private copies of the training state (16 bytes
    a parameter each, 15.9 GB) exceed half the node, so without node-shared dp pure data
    parallelism is not weighed; with it (8 gradient slots + one copy of parameters and
    moments, 44 bytes a parameter, 5.5 GB) it is."""
    from mpigpt2.model.config import PRESETS
    from mpigpt2.model.params import num_parameters
    from mpigpt2.parallel.layout import default_pp_scores
    cfg = PRESETS["gpt2-124m"]
    N = num_parameters(cfg)
    assert 8 * 16 * N > 12e9 > (8 + 3) * 4 * N
    scores = {s: default_pp_scores(8, cfg, 64, 256, 24e9, 8, shared=s) for s in (False, True)}
    assert 1 not in scores[False] and 1 in scores[True]
    assert set(scores[False]) <= set(scores[True])
    # in float64 the one copy takes 11 GB: over half of a 20 GB node, not of a 24 GB one
    assert 1 in default_pp_scores(8, cfg, 64, 256, 20e9, 8, shared=True)
    assert 1 not in default_pp_scores(8, cfg, 64, 256, 20e9, 8, shared=True, itemsize=8)
    assert 1 in default_pp_scores(8, cfg, 64, 256, 24e9, 8, shared=True, itemsize=8)
    # ranks of one stage on separate nodes (1 rank a node) share nothing: the same pp weighed
    assert default_pp_scores(8, cfg, 64, 256, 3.5e9, 1, shared=True).keys() == \
        default_pp_scores(8, cfg, 64, 256, 3.5e9, 1, shared=False).keys()


def test_estimate_sums_to_what_the_shared_windows_allocate():
    """The ranks of a stage on one node: their estimated state adds up to the windows that
    parallel/shared.py allocates (every slot, one copy of parameters and both moments)."""
    lay = resolve(8, CFG, 16, 32, 2, 4)
    est = memory.node_estimate(CFG, lay, range(8), 16, 32, 4, 0, shared=True)
    for stage in (0, 1):
        P = ParamLayout(CFG, lay.rank_spec(stage)).size
        ranks = [r for r in range(8) if lay.coords(r)[0] == stage]
        total = sum(memory.rank_estimate(CFG, lay, stage, 16, 32, 4, 0,
                                         shared_n=lay.shared_replicas()).state for _ in ranks)
        assert 0 <= shared.node_bytes(4, P, 4) - total <= 3 * 4  # (3·P/4 rounded down)
        if est[2] in ranks:  # the node's largest rank counts its stage's share, as above
            assert est[1].state == total // 4


def test_unequal_node_maps_are_estimated_with_private_copies():
    """6 ranks in nodes of 3 at pp 2: node 0 holds two replicas of stage 0 and one of stage 1,
    so the run keeps a private copy per rank (shared.choose; tests/mpi/test_shared_choice.py)
    and every estimate must count that: the memory check, the planner, the step model and the
    default layout's rule."""
    from mpigpt2.parallel import planner
    lay = resolve(6, CFG, 12, 32, 2, 3)
    nodes = [0, 0, 0, 1, 1, 1]
    assert lay.shared_replicas(nodes) == 1
    private = [memory.node_estimate(CFG, lay, range(3 * n, 3 * n + 3), 12, 32, 4, 0)
               for n in (0, 1)]
    counted = [memory.node_estimate(CFG, lay, range(3 * n, 3 * n + 3), 12, 32, 4, 0,
                                    shared=True, node_of=nodes) for n in (0, 1)]
    assert counted == private
    assert planner.memory_of(CFG, lay, 12, 32, 0, 3) == (
        max(e[1].total for e in private), max(e[0] for e in private), False, False)
    compute = stepcost.FlopModel(CFG)
    assert stepcost.step_seconds(CFG, lay, 12, 32, compute, NET, nodes, shared=True) == \
        stepcost.step_seconds(CFG, lay, 12, 32, compute, NET, nodes)

    def private(lay, nodes):  # 16 bytes a parameter of each rank's stage, the fullest node
        P = [ParamLayout(CFG, lay.rank_spec(s)).size for s in range(lay.pp)]
        return max(sum(16 * P[lay.coords(w)[0]] for w in range(len(nodes)) if nodes[w] == n)
                   for n in set(nodes))
    assert memory.default_rule_bytes(CFG, lay, nodes, True) == (private(lay, nodes), False)
    # nodes of 4 at pp 2: two replicas of each stage per node share, and the rule counts
    # what parallel/shared.py allocates for them (a gradient slot each, one copy of the
    # parameters and moments); not where /dev/shm cannot hold that
    lay8, nodes8 = resolve(8, CFG, 16, 32, 2, 4), [w // 4 for w in range(8)]
    assert lay8.shared_replicas(nodes8) == 2
    windows = sum(shared.node_bytes(2, ParamLayout(CFG, lay8.rank_spec(s)).size, 4)
                  for s in (0, 1))
    got, shares = memory.default_rule_bytes(CFG, lay8, nodes8, True)
    assert shares and 0 <= windows - got <= 2 * 4  # (3·P/2 rounded down per rank)
    assert memory.default_rule_bytes(CFG, lay8, nodes8, True, shm=got / 0.9) == (got, True)
    assert memory.default_rule_bytes(CFG, lay8, nodes8, True, shm=got) == \
        (private(lay8, nodes8), False)


def test_a_suggested_layout_is_checked_with_node_shared_dp():
    """When a run does not fit, the suggestion is priced by the same rule as the check: with
    node-shared dp a milder change (more micro-batches) fits that needs --zero 1 or more
    without it."""
    lay = resolve(4, CFG, 8, 32, 1, 4, microbatches=1)
    lay2 = resolve(4, CFG, 8, 32, 1, 4, microbatches=2)
    need_shared = memory.node_estimate(CFG, lay, range(4), 8, 32, 4, 0, shared=True)[0]
    need2 = memory.node_estimate(CFG, lay2, range(4), 8, 32, 4, 0, shared=True)[0]
    assert need2 < need_shared
    fit = memory.suggest(CFG, lay, 4, range(4), 8, 32, 4, 0, need2, shared=True)
    assert fit == [("--microbatches 2", need2)]
    assert memory.suggest(CFG, lay, 4, range(4), 8, 32, 4, 0, need2) != fit


def test_the_reduction_line_names_why_node_shared_is_off_only_where_it_could_be_on():
    from types import SimpleNamespace
    from mpigpt2.train import reduction_line
    args = SimpleNamespace(zero=0, grad_reduce="auto")
    alone = reduction_line("mpi", None, args, False, shared.NO_DATA_PARALLELISM)
    assert alone.startswith("gradient reduction: MPI's allreduce") and "node-shared" not in alone
    off = reduction_line("mpi", None, args, False, "--shared-dp off")
    assert off.endswith("; node-shared off: --shared-dp off)")
    on = reduction_line("mpi", None, args, True, "8 replicas of a stage per node share one copy")
    assert on.startswith("gradient reduction: node-shared") and "8 replicas" in on


def test_turning_node_shared_dp_back_on_is_the_first_suggestion():
    lay = resolve(4, CFG, 8, 32, 1, 4)
    need = memory.node_estimate(CFG, lay, range(4), 8, 32, 4, 0, shared=True)[0]
    private = memory.node_estimate(CFG, lay, range(4), 8, 32, 4, 0)[0]
    assert need < private
    assert memory.suggest(CFG, lay, 4, range(4), 8, 32, 4, 0, need, shareable=True) == \
        [("--shared-dp auto", need)]
    assert memory.suggest(CFG, lay, 4, range(4), 8, 32, 4, 0, need)[0][0] != "--shared-dp auto"


def test_the_default_layout_counts_private_copies_where_dev_shm_is_too_small():
    """GPT-2 124M on 8 ranks of a 24 GB node whose /dev/shm has 64 MiB (a container's
    default): the run would keep a private copy per rank (shared.choose), so pp 1 is ruled out
    as without node-shared dp, and the memory check counts private copies too."""
    from mpigpt2.model.config import PRESETS
    from mpigpt2.parallel.layout import default_pp_scores
    cfg = PRESETS["gpt2-124m"]
    small = default_pp_scores(8, cfg, 64, 256, 24e9, 8, shared=True, shm=64 << 20)
    assert small.keys() == default_pp_scores(8, cfg, 64, 256, 24e9, 8, shared=False).keys()
    assert 1 in default_pp_scores(8, cfg, 64, 256, 24e9, 8, shared=True, shm=8 << 30)
    lay = resolve(4, CFG, 8, 32, 1, 4)
    private = memory.node_estimate(CFG, lay, range(4), 8, 32, 4, 0)
    assert memory.node_estimate(CFG, lay, range(4), 8, 32, 4, 0, True, shm=1 << 10) == private
    assert memory.node_estimate(CFG, lay, range(4), 8, 32, 4, 0, True, shm=1 << 30) != private
