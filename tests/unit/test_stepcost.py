"""The step-time model (parallel/stepcost.py) against hand-computed steps, and the network
probe's flags (parallel/netprobe.py)."""

import dataclasses

import pytest

from mpigpt2.model.config import GPTConfig, PRESETS
from mpigpt2.model.params import StageSpec, ParamLayout
from mpigpt2.parallel import costs, netprobe, stepcost
from mpigpt2.parallel.layout import Layout, resolve

CFG = GPTConfig(max_seq_len=64, vocab_size=500, padded_vocab_size=512, num_layers=4,
                num_heads=2, channels=32)
NET = stepcost.Net(intra_latency=1e-6, intra_bps=1e9, inter_latency=1e-5, inter_bps=1e8)


def test_alpha_beta_links():
    assert NET.seconds(1e6) == pytest.approx(1e-6 + 1e-3)
    assert NET.seconds(1e6, same_node=False) == pytest.approx(1e-5 + 1e-2)


def test_ring_allreduce_is_two_d_minus_one_steps_of_a_dth_over_the_slowest_edge():
    n = 4e6
    assert stepcost.ring_allreduce(n, [0], NET) == 0
    assert stepcost.ring_allreduce(n, [0, 0, 0, 0], NET) == pytest.approx(6 * (1e-6 + 1e6 / 1e9))
    assert stepcost.ring_allreduce(n, [0, 0, 1, 1], NET) == pytest.approx(6 * (1e-5 + 1e6 / 1e8))


def test_hierarchical_is_the_largest_node_then_the_leaders():
    n = 4e6
    inside = 2 * (1e-6 + 2e6 / 1e9)       # two ranks on a node
    between = 2 * (1e-5 + 2e6 / 1e8)      # two leaders
    assert stepcost.hierarchical_allreduce(n, [0, 0, 1, 1], NET) == pytest.approx(inside + between)
    # fewer bytes cross the slow link than in the flat ring: cheaper here
    assert stepcost.hierarchical_allreduce(n, [0, 0, 1, 1], NET) < \
        stepcost.ring_allreduce(n, [0, 0, 1, 1], NET)


def test_flop_model_prices_a_stage_from_the_flops():
    m = stepcost.FlopModel(CFG, flops=1e9)
    spec = StageSpec(0, 2, True, False)
    f, b = m.stage(spec, 2, 8, 0)
    attention = 2 * 4 * 2 * 8 * 4.5 * CFG.channels  # 2 layers, 8 queries over 4.5 keys each
    want = ((2 * costs.layer_cost(CFG, 0) + costs.embed_cost(CFG)) * 16 + attention) / 1e9
    assert f == pytest.approx(want) and b == pytest.approx(2 * want)
    # a later slice attends to the 8 tokens before it: 4·b·k·prefix·C more forward FLOPs a layer
    f2, b2 = m.stage(spec, 2, 8, 8)
    assert f2 - f == pytest.approx(2 * 4 * 2 * 8 * 8 * CFG.channels / 1e9)
    assert b2 - b == pytest.approx(2 * (f2 - f))


def test_one_process_step_is_forward_backward_optimizer_overhead():
    lay = resolve(1, CFG, 4, 32, pp=1, dp=1)
    m = stepcost.FlopModel(CFG, flops=1e9)
    got = stepcost.step_seconds(CFG, lay, 4, 32, m, NET, adamw_seconds=1e-9)
    fwd = (4 * costs.layer_cost(CFG, 0) + costs.embed_cost(CFG) + costs.head_cost(CFG)) * 128
    fwd += 4 * 4 * 4 * 32 * 16.5 * CFG.channels  # 4 layers' attention: 32 queries, 16.5 keys
    params = ParamLayout(CFG, lay.rank_spec(0)).size
    assert got["pipeline"] == pytest.approx(3 * fwd / 1e9)
    assert got["reduce"] == 0 and got["bubble"] == pytest.approx(0, abs=1e-12)
    assert got["optimizer"] == pytest.approx(params * 1e-9)
    assert got["step"] == pytest.approx(got["pipeline"] + got["optimizer"]
                                        + stepcost.STEP_OVERHEAD)


def test_two_stage_pipeline_by_hand():
    """pp 2, M 1, one slice: F0, send, F1, B1, send back, B0 in sequence."""
    lay = Layout(2, 1, (2, 2), 1, 32, "1f1b")
    m = stepcost.FlopModel(CFG, flops=1e9)
    f0, b0 = m.stage(lay.spec(0), 4, 32, 0)
    f1, b1 = m.stage(lay.spec(1), 4, 32, 0)
    msg = NET.seconds(4 * 32 * CFG.channels * 4)
    got = stepcost.step_seconds(CFG, lay, 4, 32, m, NET, adamw_seconds=0.0)
    assert got["pipeline"] == pytest.approx(f0 + msg + f1 + b1 + msg + b0)
    work = f0 + f1 + b1 + b0 + 2 * msg
    assert got["bubble"] == pytest.approx(1 - work / (2 * got["pipeline"]))


def test_data_parallel_across_nodes_pays_the_slow_link():
    lay = resolve(4, CFG, 8, 32, pp=1, dp=4)
    m = stepcost.FlopModel(CFG)
    one = stepcost.step_seconds(CFG, lay, 8, 32, m, NET, [0, 0, 0, 0])
    two = stepcost.step_seconds(CFG, lay, 8, 32, m, NET, [0, 0, 1, 1])
    hier = stepcost.step_seconds(CFG, lay, 8, 32, m, NET, [0, 0, 1, 1], hierarchical=True)
    nbytes = 4 * ParamLayout(CFG, lay.rank_spec(0)).size
    assert one["reduce"] == pytest.approx(stepcost.ring_allreduce(nbytes, [0] * 4, NET))
    assert two["reduce"] > one["reduce"] and hier["reduce"] < two["reduce"]
    assert one["pipeline"] == two["pipeline"]


def test_large_schedules_use_the_bound_and_stay_fast():
    cfg = PRESETS["gpt2-1558m"]
    lay = resolve(48, cfg, 384, 1024, pp=48, dp=1, microbatches=96, slice_tokens=128)
    assert 48 * 96 * 8 > stepcost.SIMULATE_UNITS
    got = stepcost.step_seconds(cfg, lay, 384, 1024, stepcost.FlopModel(cfg), NET)
    # the last stage holds a layer and the head (2·C·Vp > 24·C² per token): it is the
    # bottleneck, and the others idle for most of the step
    head = costs.head_cost(cfg) + costs.layer_cost(cfg, 0)
    assert got["bubble"] == pytest.approx(1 - (47 * costs.layer_cost(cfg, 0) + head
                                               + costs.embed_cost(cfg)) / (48 * head), abs=0.05)


@pytest.mark.parametrize("sched,v", [("1f1b", 1), ("zb-h1", 1), ("interleaved-1f1b", 2)])
def test_the_bound_is_close_above_the_simulation(sched, v):
    cfg = dataclasses.replace(CFG, num_layers=8)
    lay = resolve(4, cfg, 16, 64, pp=4, dp=1, microbatches=8, slice_tokens=16, schedule=sched,
                  virtual_stages=v)
    progs, seconds = stepcost._action_costs(cfg, lay, 16, 64, stepcost.FlopModel(cfg), NET,
                                            None)
    sim, _ = stepcost.pipelined_seconds(progs, seconds, 4, v, 8, 4)
    bound, _ = stepcost.pipelined_seconds(progs, seconds, 4, v, 8, 4, limit=0)
    assert sim * 0.999 <= bound <= sim * 1.25, (sim, bound)


def test_measured_model_interpolates_and_scales():
    cal = {name: {"1": {"16": [1.0, 2.0], "64": [2.0, 4.0]},
                  "2": {"16": [0.6, 1.2], "64": [1.2, 2.4]}} for name in ("layer", "head",
                                                                           "embed")}
    cal["attention"] = {"1": [1e-9, 2e-9], "2": [0.6e-9, 1.2e-9]}
    m1 = stepcost.MeasuredModel(CFG, cal)
    assert m1.piece("layer", 16) == pytest.approx((1.0, 2.0))
    assert m1.piece("layer", 64) == pytest.approx((2.0, 4.0))
    f, _ = m1.piece("layer", 32)
    assert 16 / 16 * 1.0 < f < 2.0  # between the two points, per token between the two rates
    assert m1.piece("layer", 128) == pytest.approx((4.0, 8.0))  # by tokens beyond the last
    m4 = stepcost.MeasuredModel(CFG, cal, threads=4)  # two doublings of the 2-thread speed-up
    assert m4.piece("head", 64) == pytest.approx((2.0 * 0.36, 4.0 * 0.36))
    shared = stepcost.MeasuredModel(CFG, cal, share=2.0)
    assert shared.piece("embed", 16) == pytest.approx((2.0, 4.0))
    assert m4.attention() == pytest.approx((0.36e-9, 0.72e-9))
    # a one-layer stage over 1 row × 16 tokens at prefix 0: the calibration's own rows
    spec = StageSpec(0, 1, False, False)
    assert m1.stage(spec, 1, 16, 0) == pytest.approx((1.0, 2.0))
    f, b = m1.stage(spec, 1, 16, 100)  # 100 more keys per query: 4·16·100·C FLOPs more
    assert (f - 1.0, b - 2.0) == pytest.approx((4 * 16 * 100 * 32 * 1e-9, 4 * 16 * 100 * 32 * 2e-9))


def test_net_flags():
    net = netprobe.from_flags(100, 2)
    assert net.inter_bps == pytest.approx(12.5e9) and net.inter_latency == pytest.approx(2e-6)
    assert netprobe.from_flags(None, None) == stepcost.Net()
    assert "between nodes 2.0 µs 100.0 Gbit/s" in netprobe.describe(net, "flags")


def test_the_default_layout_follows_the_network():
    """Two nodes of four ranks: on a 100 Gbit/s fabric gpt2-124m stays data parallel; on
    1 Gbit/s the gradient ring across the nodes costs more than a pipeline's bubble."""
    from mpigpt2.parallel.layout import default_pp
    cfg, nodes = PRESETS["gpt2-124m"], [0] * 4 + [1] * 4
    fast = stepcost.Net(inter_bps=100e9 / 8, inter_latency=2e-6)
    slow = stepcost.Net(inter_bps=1e9 / 8, inter_latency=50e-6)
    assert default_pp(8, cfg, 8, 64, None, 4, fast, nodes) == 1
    assert default_pp(8, cfg, 8, 64, None, 4, slow, nodes) == 4
