"""mpigpt2 across several Slurm nodes (issue 14): a 3-node cluster on this machine
(tests/multinode_cluster.py: a network namespace, hostname, /etc/hosts, IPC namespace and
private /dev/shm per node, one slurmd each), brought up once for the module and torn down at
its end.

Every run trains pp 2 × dp 2 on two nodes and must give the losses and final weights of the
same layout on one node bit for bit (the reference runs under the venv's mpiexec here):
`srun -N 2` with block and cyclic task placement, and `sbatch -N 2 slurm/train.sbatch` with
both launchers (srun with PMI-2, and MPICH's own mpiexec inside the allocation). The byte
counters of the nodes' links prove the traffic crossed them: block placement puts each
data-parallel pair on two nodes (the gradient allreduce crosses), cyclic placement each
pipeline (activations and gradients cross). A job warned with SIGUSR1 checkpoints on two
nodes, requeues and resumes bit for bit.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import mpiexec
from multinode_cluster import MultiNodeCluster, NamespacesRefused
from slurm_cluster import Unavailable, serve
from slurm_jobs import Job
from tolerances import PARITY_F32
from mpigpt2.model.config import PRESETS
from mpigpt2.model.params import num_parameters

STEPS = 6
B, T = 4, 32
CROSSED = {}  # rank order -> bytes the block-placed srun run sent over the links


def flags(shards, mpi_reduction=True):
    """The runs compared bit for bit across placements, launchers and a requeue: with MPI's
    reduction everywhere (node-shared dp, where a placement puts two replicas of a stage on one
    node, sums in another order: equal to float32 rounding, test_node_shared_… below)."""
    train, _ = shards
    return (["--shared-dp", "off"] if mpi_reduction else []) + [
        "--model", "gpt2-tiny", "--batch-size", str(B), "--seq-len", str(T), "--steps",
        str(STEPS), "--checkpoint-every", "2", "--keep-checkpoints", "0", "--val-data", "",
            "--sample-tokens", "0", "--train-data", str(train), "--pp", "2", "--dp", "2",
            "--microbatches", "2", "--slice-tokens", "16", "--peak-gflops", "100"]


@pytest.fixture(scope="module")
def cluster(request):
    yield from serve(request, lambda root: MultiNodeCluster(
        root, nodes=3, log=lambda m: print(f"[cluster] {m}", flush=True)), "mpigpt2-mn-",
        refused=(Unavailable, NamespacesRefused))


def losses(out_dir):
    rows = [json.loads(x) for x in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def hosts(out_dir):
    """{rank: host} from config.json's rank table."""
    cfg = json.loads((Path(out_dir) / "config.json").read_text())
    return {r["rank"]: r["host"] for r in cfg["ranks"]}


@pytest.fixture(scope="module")
def reference(shards, module_tmp):
    """The same layout on one node (this machine's own namespaces, the venv's mpiexec)."""
    out = module_tmp("reference")
    r = subprocess.run(mpiexec(4) + [sys.executable, "-m", "mpigpt2.train", *flags(shards),
                                     "--out-dir", str(out / "o"), "--save", str(out / "m.bin")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return losses(out / "o"), (out / "m.bin").read_bytes()


def traffic(cluster):
    return {n: cluster.tx_bytes(n) for n in cluster.nodes}


def sent(before, after):
    return sum(after[n] - before[n] for n in before)


def volumes():
    """(gradient bytes the data-parallel rings move per step in all, activation bytes the
    pipelines move per step in all) of the flags' layout, lower bounds."""
    C = PRESETS["gpt2-tiny"].channels
    return STEPS * 4 * num_parameters(PRESETS["gpt2-tiny"]), STEPS * 2 * B * T * C * 4


@pytest.mark.timeout(900)  # includes bringing the cluster up (apt on a fresh machine)
@pytest.mark.parametrize("distribution,order", [("block", "pipe"), ("cyclic", "pipe"),
                                                ("block", "data"), ("block", "auto")])
def test_srun_two_nodes(cluster, shards, reference, tmp_path, distribution, order):
    before = traffic(cluster)
    out = tmp_path / "o"
    r = cluster.run("srun", "-N", "2", "-n", "4", "--ntasks-per-node", "2", "--mpi=pmi2",
                    f"--distribution={distribution}",
                    "--chdir", tmp_path, sys.executable, "-m", "mpigpt2.train", *flags(shards),
                    "--rank-order", order, "--out-dir", out, "--save", tmp_path / "m.bin",
                    timeout=300, check=False)
    assert r.returncode == 0, r.stdout + r.stderr + cluster.logs()
    assert "× 4 cores" in r.stdout, r.stdout  # two nodes' own cores: 2 ranks × 1 thread each
    crossed = sent(before, traffic(cluster))
    assert losses(out) == reference[0]
    assert (tmp_path / "m.bin").read_bytes() == reference[1]
    where, (grads, acts) = hosts(out), volumes()
    if distribution == "block":  # ranks 0, 1 on one node, 2, 3 on the other
        assert where[0] == where[1] != where[2] == where[3], where
    else:  # ranks 0, 2 on one node
        assert where[0] == where[2] != where[1] == where[3], where
    if order == "pipe" and distribution == "block":
        # a replica's stages share a node: each data-parallel pair sums its stage's gradients
        # across the link, every step
        assert crossed >= grads, (crossed, grads)
    elif order == "pipe":  # each pipeline spans the nodes: activations and their gradients
        assert crossed >= acts, (crossed, acts)
    if distribution == "block":
        CROSSED[order] = crossed
    if order == "auto":
        # the cost model's choice is the order that measured fewer bytes on the links
        # (gpt2-tiny: the tied wte's ring crosses the nodes twice in the pipe order, four
        # times in the data order, and outweighs everything else)
        best = min(("pipe", "data"), key=CROSSED.get)
        assert f"placement ({best} rank order, 2 node(s))" in r.stdout, (CROSSED, r.stdout)
        assert crossed <= 1.1 * CROSSED[best], CROSSED


@pytest.mark.timeout(600)
@pytest.mark.parametrize("launcher", ["srun", "mpiexec"])
def test_sbatch_two_nodes(cluster, shards, reference, tmp_path, launcher):
    before = traffic(cluster)
    job = Job(cluster, tmp_path, flags(shards) + ["--save", str(tmp_path / "m.bin")],
              env={"MPIGPT2_LAUNCHER": launcher}, sbatch=("-N", "2", "--ntasks-per-node", "2"))
    info = job.finish(timeout=300)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", job.report()
    assert f"launcher {launcher}" in job.output(), job.report()
    assert job.losses() == reference[0], job.report()
    assert (tmp_path / "m.bin").read_bytes() == reference[1]
    assert len(set(hosts(job.out_dir).values())) == 2
    assert sent(before, traffic(cluster)) >= volumes()[1]  # (auto: the data order)


@pytest.mark.timeout(600)
def test_preempted_across_nodes_resumes_bit_for_bit(cluster, shards, reference, tmp_path):
    """Warned (SIGUSR1 to the batch shell) once step 2 is logged while rank 0 sleeps in step 3:
    the ranks on both nodes stop after step 3, checkpoint, the job requeues itself, resumes on
    two nodes and ends with the uninterrupted losses and weights."""
    job = Job(cluster, tmp_path, flags(shards) + ["--inject-delay", "0:3:8", "--save",
                                                  str(tmp_path / "m.bin")],
              sbatch=("-N", "2", "--ntasks-per-node", "2"))
    deadline = time.time() + 240
    while not job.logged(2):
        assert time.time() < deadline and job.alive(), job.report()
        time.sleep(0.2)
    job.warn()
    info = job.finish(timeout=300)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", job.report()
    assert [a.split(" ")[0] for a in job.attempts()] == ["start", "end", "requeue", "start",
                                                         "end"], job.report()
    assert job.losses() == reference[0], job.report()  # every step once, bit for bit
    assert (tmp_path / "m.bin").read_bytes() == reference[1]
    assert len(set(hosts(job.out_dir).values())) == 2


@pytest.mark.timeout(300)
def test_a_rank_count_no_layout_fits_is_refused(cluster, shards, tmp_path):
    """sbatch -N 3 with one task per node: 3 ranks for pp 2 × dp 2. One clear line on every
    node's behalf, status 2 before any compute, no requeue and no node-loss handling."""
    job = Job(cluster, tmp_path, flags(shards), sbatch=("-N", "3", "--ntasks-per-node", "1"))
    info = job.finish(timeout=240)
    out = job.output()
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", job.report()
    assert info["Restarts"] == "0" and "lost node" not in out, job.report()
    assert "error: --pp 2 × --dp 2 = 4, but mpiexec started 3 ranks" in out, job.report()
    assert not (job.out_dir / "metrics.jsonl").exists()


@pytest.mark.timeout(900)
def test_node_shared_and_hierarchical_reduction_across_nodes(cluster, shards, tmp_path):
    """dp 4 on two nodes of two ranks: every data-parallel group spans the nodes with two
    ranks on each. By default the two replicas of a node share one copy in shared memory and
    their slices cross the links (node-shared dp); with --shared-dp off, auto times MPI's
    allreduce against the node/leaders/node reduction and says both; the network line shows
    the start-up probe. Every reduction trains to one process's losses within the parity
    matrix's float32 tolerance, and the node-shared and hierarchical runs moved at least the
    gradients over the links."""
    base = flags(shards, mpi_reduction=False)[:-10] + ["--peak-gflops", "100",
                                                      "--microbatches", "1"]
    one = tmp_path / "one"
    r = subprocess.run([sys.executable, "-m", "mpigpt2.train", *base, "--out-dir", str(one)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    ref = [loss for _, loss in losses(one)]
    for mode, extra in (("shared", []), ("timed", ["--shared-dp", "off"]),
                        ("hier", ["--grad-reduce", "hier"]), ("mpi", ["--grad-reduce", "mpi"])):
        before = traffic(cluster)
        out = tmp_path / mode
        r = cluster.run("srun", "-N", "2", "-n", "4", "--ntasks-per-node", "2", "--mpi=pmi2",
                        "--chdir", tmp_path, sys.executable, "-m", "mpigpt2.train", *base,
                        "--pp", "1", "--dp", "4", *extra, "--out-dir", out,
                        timeout=300, check=False)
        assert r.returncode == 0, r.stdout + r.stderr + cluster.logs()
        print("\n".join(x for x in r.stdout.splitlines()  # (the record: -s shows it)
                        if x.startswith(("gradient reduction", "network ("))))
        if mode == "shared":
            assert "gradient reduction: node-shared" in r.stdout and "2 replicas of a stage " \
                "per node share one copy" in r.stdout, r.stdout
            assert "network (probe)" in r.stdout or "network (cache)" in r.stdout, r.stdout
        elif mode == "timed":
            assert "gradient reduction: " in r.stdout and "timed: MPI " in r.stdout, r.stdout
        else:
            assert f"(--grad-reduce" in r.stdout and ("hierarchical (node" in r.stdout) == (
                mode == "hier"), r.stdout
        got = [loss for _, loss in losses(out)]
        assert len(got) == len(ref) and all(abs(a - b) <= PARITY_F32 * abs(b)
                                            for a, b in zip(got, ref)), (mode, got, ref)
        if mode in ("shared", "hier"):
            assert sent(before, traffic(cluster)) >= volumes()[0] / 2


def nd_flags(shards):
    """B 12 divides by dp·M for dp 3 and dp 2; --pp only, so dp follows the ranks there are."""
    train, _ = shards
    return ["--model", "gpt2-tiny", "--batch-size", "12", "--seq-len", str(T), "--steps", "8",
            "--checkpoint-every", "2", "--keep-checkpoints", "0", "--val-data", "",
            "--sample-tokens", "0", "--train-data", str(train), "--pp", "2", "--microbatches",
            "2", "--slice-tokens", "16", "--peak-gflops", "100"]


@pytest.mark.timeout(900)
def test_a_node_dies_and_the_job_goes_on_with_the_nodes_left(cluster, shards, tmp_path):
    """Submitted with a node range (-N 2-3), the job runs pp 2 × dp 3 on three nodes; node3
    (its slurmd and ranks 4, 5) is killed while rank 0 sleeps in step 3. The attempt ends
    within 15 s naming the lost node and its ranks, nothing is left running, the job shrinks
    to the two nodes left and launches there, resumes from the step-2 checkpoint as pp 2 × dp 2,
    and its losses equal one process's within the parity matrix's float32 tolerance. (Last in
    the module: node3 stays down.)"""
    one = tmp_path / "one"
    r = subprocess.run([sys.executable, "-m", "mpigpt2.train", *nd_flags(shards), "--pp", "1",
                        "--out-dir", str(one)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    job = Job(cluster, tmp_path / "job", nd_flags(shards) + ["--inject-delay", "0:3:8"],
              sbatch=("-N", "2-3", "--ntasks-per-node", "2"))
    deadline = time.time() + 240
    while not job.logged(2):
        assert time.time() < deadline and job.alive(), job.report()
        time.sleep(0.2)
    assert sorted(set(hosts(job.out_dir).values())) == ["node1", "node2", "node3"]
    killed = time.time()
    cluster.kill_node("node3")
    while not any(a.startswith("end restart=0") for a in job.attempts()):
        assert time.time() - killed < 15, job.report()
        time.sleep(0.1)
    assert not [p for n in ("node1", "node2") for p in cluster.node_pids(n)
                if b"mpigpt2.train" in Path(f"/proc/{p}/cmdline").read_bytes()], job.report()
    info = job.finish(timeout=300)
    out = job.output()
    assert "lost node(s) node3 (ranks 4, 5)" in out, job.report()
    assert "shrank the job to node[1-2]" in out, job.report()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", job.report()
    assert [a.split(" ")[0] for a in job.attempts()] == ["start", "end", "lost", "shrink",
                                                         "start", "end"], job.report()
    assert "ranks 6 = pp 2 × dp 3" in out and "ranks 4 = pp 2 × dp 2" in out, job.report()
    assert set(hosts(job.out_dir).values()) == {"node1", "node2"}
    got, want = dict(job.losses()), dict(losses(one))
    assert sorted(got) == list(range(8)), job.report()
    assert max(abs(got[s] - want[s]) / abs(want[s]) for s in want) <= PARITY_F32
