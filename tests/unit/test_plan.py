"""`python -m mpigpt2.plan`: ranked layouts the trainer accepts, memory refusals, bad input.
(The predictions against measured steps are bench row 12; README: Planning a cluster.)"""

import json
import subprocess
import sys

import pytest

from mpigpt2 import plan
from mpigpt2.base.errors import UserError
from mpigpt2.model.config import PRESETS
from mpigpt2.options import parse_args as train_args
from mpigpt2.parallel import memory, planner
from mpigpt2.parallel.layout import resolve
from mpigpt2.setup import shared_default

TINY = ["--model", "gpt2-tiny", "--batch-size", "8", "--seq-len", "64"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def own_cache(cache_dir, monkeypatch):
    """A calibration cache of the module's own (gpt2-tiny measured once, then reused)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache_dir))


def run_plan(*argv):
    return subprocess.run([sys.executable, "-m", "mpigpt2.plan", *argv], capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("shm", [None, 160 << 20])
def test_every_ranked_layout_is_one_the_trainer_accepts(tmp_path, capsys, shm):
    """Every ranked layout, run with its flags, is the layout planned, and the memory columns
    are the trainer's own check on each node. shm: --shm-per-node (None: half the node's 16
    GiB; 160 MiB holds node-shared dp's windows on some layouts, not on others)."""
    out = tmp_path / "plans.json"
    assert plan.main(["--nodes", "2", "--cores-per-node", "4", "--mem-per-node", "16GiB",
                      "--json", str(out)] + TINY
                     + ([] if shm is None else ["--shm-per-node", f"{shm >> 20}MiB"])) == 0
    text = capsys.readouterr().out
    plans = json.loads(out.read_text())
    steps = [p["step_s"] for p in plans]
    assert steps == sorted(steps) and len(plans) > 20
    cfg = PRESETS["gpt2-tiny"]
    shapes, sharing, held = set(), set(), set()
    for p in plans:
        a = train_args(p["flags"].split() + TINY)
        world = 2 * p["ranks_per_node"]
        lay = resolve(world, cfg, 8, 64, a.pp, a.dp, None, a.microbatches, a.slice_tokens,
                      a.schedule, virtual_stages=a.virtual_stages, rank_order=a.rank_order)
        assert lay.as_dict() == p["layout"]
        assert a.threads * p["ranks_per_node"] == 4
        # the memory columns are the trainer's own check (setup.check_memory: node-shared dp
        # by default where the node map allows it and /dev/shm holds it) on each node of
        # block placement; the flags turn node-shared dp off where it was priced without
        rpn = p["ranks_per_node"]
        node_of, room = planner.node_map(world, rpn), shm or 8 << 30
        nodes = [memory.node_estimate(cfg, lay, range(n * rpn, (n + 1) * rpn), 8, 64, 4,
                                      a.zero, shared_default(a), node_of, room)
                 for n in (0, 1)]
        assert p["node_bytes"] == max(need for need, _, _ in nodes)
        assert p["rank_bytes"] == max(worst.total for _, worst, _ in nodes)
        shares = not a.zero and memory.shared_copies(cfg, lay, node_of, 4, room) > 1
        assert p["node_shared"] == shares
        map_shares = lay.shared_replicas(node_of) > 1 and not a.zero
        # --shared-dp off only where the map would share and /dev/shm alone made it private:
        # elsewhere the trainer's --shared-dp auto keeps private copies by itself
        assert ("--shared-dp off" in p["flags"]) == (map_shares and not shares)
        if map_shares:  # the map shares: does /dev/shm hold it?
            held.add(shares)
        sharing.add(map_shares)
        shapes.add((lay.pp, lay.virtual_stages, lay.schedule, a.zero, lay.rank_order))
    # the grid covers the dimensions: pipeline depths, virtual stages, ZeRO and both orders
    assert {s[0] for s in shapes} >= {1, 2, 4} and {s[1] for s in shapes} == {1, 2}
    assert {s[3] for s in shapes} == {0, 1} and {s[4] for s in shapes} == {"pipe", "data"}
    assert sharing == {True, False}  # layouts with and without replicas meeting on a node
    assert held == ({True, False} if shm else {True})  # 160 MiB holds some of the windows
    assert text.splitlines()[1].split()[:2] == ["#", "step"]  # the table after one header line


def test_memory_refusals_are_said(capsys):
    # gpt2-tiny's layouts on one 4-core node need 264-796 MiB (node-shared dp where replicas
    # meet): 700 MiB (630 usable) refuses some
    assert plan.main(["--nodes", "1", "--cores-per-node", "4", "--mem-per-node", "700MiB"]
                     + TINY) == 0
    out = capsys.readouterr().out
    assert "refused (memory): layouts needing more than 90% of a node's memory" in out


@pytest.mark.parametrize("argv,message", [
    (["--nodes", "0", "--cores-per-node", "4"], "--nodes must be ≥ 1, got 0"),
    (["--nodes", "2", "--cores-per-node", "-4"], "--cores-per-node must be ≥ 1, got -4"),
    (["--nodes", "2", "--cores-per-node", "4", "--mem-per-node", "256Gb"], "unknown unit 'Gb'"),
    (["--nodes", "2", "--cores-per-node", "4", "--mem-per-node", "12 parsecs"],
     "unknown unit 'parsecs'"),
    (["--nodes", "2", "--cores-per-node", "4", "--mem-per-node", "0GiB"], "must be > 0"),
    (["--nodes", "2", "--cores-per-node", "4", "--net-gbps", "0"], "--net-gbps must be > 0"),
    (["--nodes", "2", "--cores-per-node", "4", "--shm-per-node", "64Mb"], "unknown unit 'Mb'"),
    (["--nodes", "2", "--cores-per-node", "4", "--mem-per-node", "16GiB", "--shm-per-node",
      "32GiB"], "--shm-per-node 32GiB exceeds --mem-per-node 16GiB"),
    (["--nodes", "2", "--cores-per-node", "4", "--net-latency-us", "nan"],
     "--net-latency-us must be a finite number"),
    (["--nodes", "2", "--cores-per-node", "4", "--model", "gpt5"], "unknown model preset"),
])
def test_bad_input_is_one_line_and_status_2(argv, message):
    r = run_plan(*argv, "--batch-size", "8", "--seq-len", "64")
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and message in r.stderr, r.stderr


def test_a_model_that_fits_nowhere():
    r = run_plan("--nodes", "1", "--cores-per-node", "2", "--mem-per-node", "64MiB", *TINY)
    assert r.returncode == 2
    # refused before anything is measured: the one line is all there is
    assert r.stderr.startswith("error: gpt2-tiny with B 8 × T 64 fits nowhere on 1 node(s)")
    assert "needs" in r.stderr and "MiB per node, more than 90% of 64 MiB" in r.stderr
    assert r.stderr.count("\n") == 1 and r.stdout == ""


def test_seq_len_beyond_the_context():
    with pytest.raises(UserError, match="exceeds gpt2-tiny's context of 256"):
        plan.main(["--nodes", "1", "--cores-per-node", "2", "--model", "gpt2-tiny",
                   "--batch-size", "8", "--seq-len", "512"])


def test_train_refuses_bad_network_flags(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mpigpt2.train", "--net-gbps", "-1", "--out-dir",
                        str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--net-gbps must be > 0" in r.stderr, r.stderr
    assert not (tmp_path / "o" / "metrics.jsonl").exists()
