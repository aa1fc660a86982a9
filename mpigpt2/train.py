"""Train GPT-2 with data + pipeline parallelism: `mpiexec -n N python -m mpigpt2.train [...]`.

Reads top to bottom: flags and set-up checks (agreed by every rank, before any compute), the
grid and this rank's stage, the optimizer and the schedule's runner, the loop (lr, batch, step,
log, checkpoint / validate / sample), then the end of the run. docs/design.md explains the
parallel machinery underneath.
"""

import sys

if __name__ == "__main__":  # bound MPI_Init (mpi4py's import below) against a stopped peer
    from mpigpt2.base.watchdog import guard_init
    guard_init(sys.argv[1:])

import dataclasses  # noqa: E402 (the rest as usual, after the guard)
import math
import os
import resource
import socket
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
from mpi4py import MPI
from threadpoolctl import threadpool_limits

from mpigpt2 import faults, outputs
from mpigpt2.base import blas, malloc
from mpigpt2.base.errors import run_cli
from mpigpt2.base.machine import shm_free
from mpigpt2.base.watchdog import init_done
from mpigpt2.formats import checkpoint as ck, lineage
from mpigpt2.formats.llmc import write_model
from mpigpt2.formats.models import load_stage_params
from mpigpt2.model.config import PRESETS
from mpigpt2.model.optim import lr_at
from mpigpt2.model.params import init_params, PARAM_NAMES
from mpigpt2.model.stage import Stage
from mpigpt2.model.warmup import warm_up
from mpigpt2.observe import metrics as mx
from mpigpt2.observe.peak import peak_gflops_per_core
from mpigpt2.observe.runlog import RunLog
from mpigpt2.observe.trace import Tracer, merge, trace_path
from mpigpt2.options import parse_args
from mpigpt2.parallel import (autotune, busy, costs, netprobe, schedule, schedule_file,
                              shared, signals)
from mpigpt2.parallel.collectives import (barrier, choose_reduction, gather_model, gather_rows,
                                          sum_to_root)
from mpigpt2.parallel.failure import agree, install_excepthook
from mpigpt2.parallel.grid import make_grid
from mpigpt2.parallel.optimizer import make_optimizer
from mpigpt2.parallel.runtime import Runner
from mpigpt2.parallel.step import train_step
from mpigpt2.parallel.waiting import Waiter
from mpigpt2.setup import Plan, plan as make_plan


def main(argv=None):
    init_done()  # MPI_Init has returned (base/watchdog.py)
    args = parse_args(argv)
    world = MPI.COMM_WORLD
    install_excepthook(world)
    malloc.tune()  # keep big freed temporaries mapped: no page faults every step
    waiter = make_waiter(args)  # every wait from here to the end is bounded by it
    with waiter.bounded("the node's ranks (Comm_split_type, set-up)"):
        local = world.Split_type(MPI.COMM_TYPE_SHARED)  # the ranks sharing this node
    comm, note = busy.split(world, local, args.busy_ranks, bool(args.pp or args.dp or
                                                                args.print_schedule), waiter)
    if comm is None:  # (docs/design.md#busy-ranks)
        signals.install()  # a signal is for the busy ranks to act on
        return busy.idle(world, waiter)
    if comm.Get_size() == world.Get_size():
        return main_busy(args, comm, waiter, local=local)  # (every rank busy: same ranks)
    try:
        status = main_busy(args, comm, waiter, note)
    except SystemExit as e:  # (an agreed set-up error)
        busy.release(world, e.code, waiter)
        raise
    busy.release(world, status, waiter)
    return status


def main_busy(args, world, waiter, note="", local=None):
    """The run on the busy ranks (world: their communicator; local: its ranks on this node,
    when already split)."""
    with waiter.bounded("the node's ranks (Comm_split_type, set-up)"):
        if local is None:
            local = world.Split_type(MPI.COMM_TYPE_SHARED)  # the ranks sharing this node
        node_ranks = local.allgather(world.Get_rank())
        node_of = world.allgather(min(node_ranks))  # each rank's node (its lowest rank)
        # the least /dev/shm free of any node: node-shared dp needs every node's windows
        shm = min((b for b in world.allgather(shm_free()) if b is not None), default=None)
    print0 = print_on_rank0(world.Get_rank())
    net = network(args, world, node_of, waiter)
    # -- set-up: checked on every rank, agreed, before any compute ----------------------------
    plan = agree(world, lambda: make_plan(args, grid_size(args, world), node_ranks, node_of,
                                          net, shm), args.debug, waiter)
    plan.notes.extend([note] if note else [])
    threads = args.threads or max(1, (os.cpu_count() or 1) // local.Get_size())
    plan, tuned = resolve_slices(args, plan, world, threads, print0, waiter)
    if args.print_schedule:
        return print_schedule(plan, args.seq_len, print0, args.schedule_out)
    threadpool_limits(threads, user_api="blas")
    np.seterr(all="ignore")  # overflow in a diverging run is caught per step (stop_diverged)
    signals.install()
    run = start(args, plan, world, print0, waiter)
    open_outputs(run, threads, local.Get_size(), tuned)
    status = train(run)
    if status == 0:
        finish(run)
    return status


# -- set-up ---------------------------------------------------------------------------------------
def make_waiter(args):
    """The run's one Waiter. Made before the flags are checked (set-up waits need it), so a
    value check_args will refuse falls back to the default here."""
    def valid(v, default):
        return v if isinstance(v, float) and math.isfinite(v) and v > 0 else default
    return Waiter(stall_seconds=valid(args.stall_seconds, 60.0), abort=args.stall_abort,
                  timeout=valid(args.wait_timeout, 1800.0))


def network(args, world, node_of, waiter):
    """(Net, source) for the default layout: the flags', else a probe when the job spans
    nodes (parallel/netprobe.py). Bad flag values skip the probe; check_args then refuses
    them on every rank."""
    if args.net_gbps is not None or args.net_latency_us is not None:
        ok = all(x is None or (math.isfinite(x) and x >= 0) for x in
                 (args.net_gbps, args.net_latency_us)) and args.net_gbps != 0
        return (netprobe.from_flags(args.net_gbps, args.net_latency_us) if ok else None), "flags"
    return netprobe.measure(world, node_of, waiter)


def print_on_rank0(rank):
    return (lambda *a, **k: print(*a, **k, flush=True)) if rank == 0 else (lambda *a, **k: None)


def grid_size(args, world):
    """The world size, except --print-schedule in one process: --pp/--dp then give the grid."""
    if args.print_schedule and world.Get_size() == 1 and (args.pp or args.dp):
        return (args.pp or 1) * (args.dp or 1)
    return world.Get_size()


def resolve_slices(args, plan, world, threads, print0, waiter):
    """--slice-tokens auto: keep the checkpoint's k when resuming the same layout (bit-exact
    resume), else rank 0 times the candidates and every rank takes its choice."""
    if args.slice_tokens != "auto":
        return plan, None
    layout, saved = plan.layout, plan.resume.layout if plan.resume else None
    if saved and all(saved.get(key) == value for key, value in layout.as_dict().items()
                     if key != "slice_tokens"):
        k = int(saved["slice_tokens"])
        print0(f"autotune: k={k} kept from the checkpoint's layout")
        return dataclasses.replace(plan, layout=dataclasses.replace(layout, slice_tokens=k)), None
    layout, tuned = autotune.agree(world, plan.cfg, layout, args.batch_size, args.seq_len,
                                   args.dtype, threads, waiter=waiter)
    print0(autotune.describe(tuned))
    return dataclasses.replace(plan, layout=layout), tuned


def print_schedule(plan, T, print0, out=None):
    layout = plan.layout
    n = layout.n_slices(T)
    progs = layout.programs(T)
    print0(f"layout {layout.as_dict()}\n" + schedule.table(progs))
    print0(f"predicted bubble: {costs.idle_fraction(schedule.simulate(progs)):.3f} with this "
           f"table's unit costs, {costs.unit_bubble(progs):.3f} with F = I = W = 1, B = 2")
    if out and MPI.COMM_WORLD.Get_rank() == 0:
        schedule_file.write(progs, out, n)
        print0(f"schedule written to {out} (--schedule {out} runs it)")
    return 0


@dataclass
class Run:
    """Everything the loop needs, built once by start()."""
    args: object
    plan: Plan
    world: MPI.Comm
    grid: object
    stage: Stage
    opt: object
    runner: Runner
    tracer: Optional[Tracer]
    print0: Callable
    log: Optional[RunLog] = None   # rank 0 only
    peak: tuple = (0.0, "")        # (GFLOP/s per core, source), rank 0 only
    cores: int = 1
    history: list = dataclasses.field(default_factory=list)
    lineage: list = None           # this session's checkpoint lineage, rank 0 only
    last_checkpoint: str = None    # the newest good checkpoint (the resumed one at first)
    val_done_at_start: bool = False

    @property
    def rank(self):
        return self.world.Get_rank()

    def batch(self, loader):
        """This replica's rows of the next global batch, as (M, b, T) micro-batches."""
        B, T, lay = self.args.batch_size, self.args.seq_len, self.plan.layout
        rows = B // lay.dp
        x, y = loader.next_batch(slice(self.grid.replica * rows, (self.grid.replica + 1) * rows))
        M = lay.microbatches
        return x.reshape(M, rows // M, T), y.reshape(M, rows // M, T)


def start(args, plan, world, print0, waiter):
    """The grid, this rank's stage with its weights, the optimizer and the runner."""
    layout = plan.layout
    grid = make_grid(world, layout.pp, layout.dp, waiter, layout.wte_ranks, layout.rank_order)
    spec = layout.rank_spec(grid.stage)
    stage = Stage(plan.cfg, spec, np.dtype(args.dtype))
    warm_up(stage.dtype)  # numba's loops loaded now, not inside step 0 (model/warmup.py)
    shared_on, why = agree(world, lambda: shared.choose(
        grid, stage.layout.size, stage.dtype.itemsize, args.shared_dp, args.zero,
        args.grad_reduce), args.debug, waiter)
    mode, timed = "mpi", {}
    if not shared_on:
        mode, timed = choose_reduction(grid, stage.layout.size, "mpi" if args.zero else
                                       args.grad_reduce)
    plan.notes.append(reduction_line(mode, timed, args, shared_on, why))
    opt = make_optimizer(grid, stage, args.zero, args.beta1, args.beta2, args.eps,
                         args.weight_decay, overlap=not args.no_overlap,
                         hierarchical=mode == "hier", shared=shared_on)
    if plan.resume is not None:
        m, v = opt.moment_buffers()
        ck.load_into(plan.resume.path, plan.resume.state, spec, stage.p, stage.layout.views(m),
                     stage.layout.views(v), stage.dtype == np.float64)
        opt.set_moments(m, v)
    elif args.model in PRESETS:
        init_params(plan.cfg, spec, stage.p, args.seed)
    else:  # an llm.c .bin or a Hugging Face model
        load_stage_params(args.model, spec, stage.p)
    opt.loaded()  # (node-shared: local rank 0's copy becomes the node's)
    tracer = Tracer(grid.rank, grid.stage, grid.replica) if args.trace else None
    if tracer is not None:
        waiter.trace = lambda kind, what, t0, t1: tracer.span(f"wait {what}", kind, t0, t1)
    b = args.batch_size // layout.dp // layout.microbatches  # sequences per micro-batch
    runner = Runner(grid, stage, layout, args.seq_len, b, tracer, reducer=opt.reducer,
                    overlap=not args.no_overlap)
    faults.install_checkpoint_crash()
    return Run(args, plan, world, grid, stage, opt, runner, tracer, print0,
               last_checkpoint=plan.resume and plan.resume.path)


def reduction_line(mode, timed, args, shared_on=False, shared_why=shared.NO_DATA_PARALLELISM):
    """The gradient reduction in use and why: node-shared, or MPI's / hierarchical (when
    auto timed both, the two times)."""
    if shared_on:
        return (f"gradient reduction: node-shared, in place in shared memory, by slice between "
                f"nodes ({shared_why})")
    why = ("ZeRO-1 reduce-scatters" if args.zero else "--grad-reduce" if args.grad_reduce != "auto"
           else f"timed: MPI {1e3 * timed['mpi']:.1f} ms, hierarchical {1e3 * timed['hier']:.1f}"
           f" ms" if timed else "no data-parallel group spans nodes with ranks to share")
    name = {"mpi": "MPI's allreduce", "hier": "hierarchical (node, leaders, node)"}[mode]
    off = f"; node-shared off: {shared_why}" if shared_why != shared.NO_DATA_PARALLELISM else ""
    return f"gradient reduction: {name} ({why}{off})"


def open_outputs(run, threads, ranks_per_node, tuned):
    """config.json and metrics.jsonl on rank 0, the matmul peak for MFU, the opening lines."""
    args, plan, cfg, layout = run.args, run.plan, run.plan.cfg, run.plan.layout
    size = run.world.Get_size()
    kept_val = False
    with run.grid.waiter.bounded("the rank table (gather)"):
        got = run.world.gather((socket.gethostname(), os.getpid(), os.cpu_count() or 1,
                                ranks_per_node), root=0)
    ranks = None if got is None else [(host, pid) for host, pid, _, _ in got]
    blas_info = blas.info()  # the kernels numpy runs and why: config.json and the report
    if run.rank == 0:
        run.cores = mx.node_cores(got, threads)
        run.peak = peak_gflops_per_core(args.peak_gflops)
        config = {"model": cfg.as_dict(), "layout": layout.as_dict(), "world": size,
                  "ranks": [{"rank": r, "host": h, "pid": pid} for r, (h, pid) in
                            enumerate(ranks)],
                  "threads_per_rank": threads, "blas": blas_info, "args": vars(args)}
        if tuned is not None:
            config["autotune"] = tuned
        run.lineage = lineage.new_session(plan.resume and plan.resume.state, plan.start_step)
        plan.notes += outputs.keep_earlier(args.out_dir, plan.resume and plan.resume.state,
                                           run.lineage)
        run.log = RunLog(args.out_dir, config, plan.start_step)
        if run.log.damaged:
            plan.notes.append(f"note: {run.log.path} had lines that do not parse; the file as "
                              f"it was is kept in {run.log.damaged}")
        kept_val = run.log.validated_at(plan.start_step) if plan.start_step else False
    # validation done at start_step before the interruption (it follows the checkpoint); a
    # polled broadcast: rank 0 may still be probing the matmul peak
    flag = np.array([kept_val], dtype=np.int8)
    run.grid.waiter.wait([run.world.Ibcast(flag, root=0)], "setup")
    run.val_done_at_start = bool(flag[0])
    B, T = args.batch_size, args.seq_len
    run.print0(f"model L={cfg.num_layers} C={cfg.channels} NH={cfg.num_heads} "
               f"V={cfg.vocab_size} maxT={cfg.max_seq_len} | ranks {size} = pp {layout.pp} × "
               f"dp {layout.dp} | stages {list(layout.stage_layers)} | M={layout.microbatches} "
               f"k={layout.slices_text(T)} {layout.schedule} | B={B} T={T} | {threads} BLAS "
               f"thread(s)/rank")
    run.print0(blas.describe(blas_info))
    run.print0(f"peak {run.peak[0]:.1f} GFLOP/s per core ({run.peak[1]}) × {run.cores} cores; "
               f"{mx.flops_per_token(cfg, T) / 1e6:.1f} MFLOP per token")
    run.print0(rank_table(ranks, args.out_dir))
    run.print0(placement_line(layout, ranks))
    if plan.net[1] not in ("", "one node"):
        run.print0(netprobe.describe(*plan.net))
    if plan.resume is not None:
        run.print0(f"resumed from {plan.resume.path} at step {plan.start_step}")
    for note in plan.notes:
        run.print0(note)


def placement_line(layout, ranks, shown=8):
    """Which (stage, replica) each node holds, node by node: rank(s stage, r replica)."""
    if ranks is None:
        return ""
    nodes = {}
    for r, (host, _) in enumerate(ranks):
        q, rep = layout.coords(r)
        nodes.setdefault(host, []).append(f"{r}(s{q} r{rep})")
    parts = [f"{host}: {' '.join(xs[:16])}{' …' if len(xs) > 16 else ''}"
             for host, xs in list(nodes.items())[:shown]]
    more = f" | … ({len(nodes)} nodes)" if len(nodes) > shown else ""
    return (f"placement ({layout.rank_order} rank order, {len(nodes)} node(s)): "
            + " | ".join(parts) + more)


def rank_table(ranks, out_dir, shown=16):
    """One line mapping PIDs to ranks: an MPI launcher reports a killed rank by its PID."""
    if ranks is None:
        return ""
    text = " ".join(f"{r}={pid}@{host}" for r, (host, pid) in enumerate(ranks[:shown]))
    more = f" … ({len(ranks)} in {out_dir}/config.json)" if len(ranks) > shown else ""
    return f"ranks (rank=pid@host; a launcher names a dead rank by its PID): {text}{more}"


# -- the training loop ----------------------------------------------------------------------------
def train(run):
    """Steps start_step..steps-1; returns 0, EXIT_PREEMPTED after a signal's checkpoint, or
    EXIT_DIVERGED at a non-finite loss or gradient norm."""
    args, plan, print0 = run.args, run.plan, run.print0
    dloss = 1.0 / (args.batch_size * args.seq_len)
    next_batch = faults.wrap_batches(lambda step: run.batch(plan.train), args, run.rank)
    progress = mx.Progress(plan.start_step, args.steps)
    barrier(run.world, run.grid.waiter)
    if run.tracer is not None:
        run.tracer.align()
    resume_eval(run)
    for step in range(plan.start_step, args.steps):
        t0 = time.perf_counter()
        run.grid.waiter.step = step
        if run.tracer is not None:
            run.tracer.step = step
        lr = lr_at(step, args.lr, args.steps, args.warmup_steps, args.lr_schedule,
                   args.min_lr_frac)
        x, y = next_batch(step)
        result = train_step(run.runner, run.opt, x, y, step + 1, lr, dloss, args.grad_clip,
                            norm=True)
        loss = log_step(run, step, lr, result, t0, progress)
        done = step + 1
        stop, diverged = signals.agree(run.world, run.grid.waiter,
                                       not finite(loss, result.loss_sum, result.grad_norm))
        if diverged:
            return stop_diverged(run, step, loss, result.grad_norm)
        if stop:
            print0(f"signal {stop} received: checkpointing at step {done} and exiting "
                   f"(status {signals.EXIT_PREEMPTED}: requeue me)")
            save_checkpoint(run, done)
            return signals.EXIT_PREEMPTED
        if every(args.checkpoint_every, done, args.steps):
            save_checkpoint(run, done)
            malloc.release()  # (the gathered model and moments)
        if every(args.val_every, done, args.steps):
            evaluate(run, done)
        if every(args.sample_every, done, args.steps):
            sample(run, done)
            malloc.release()
    return 0


def finite(*values):
    return all(v is None or math.isfinite(v) for v in values)


def stop_diverged(run, step, loss, grad_norm):
    """A non-finite loss or gradient norm on any rank: stop at once, saving nothing (the
    update of that step was skipped if the gradient was the non-finite one)."""
    last = run.last_checkpoint
    if run.rank == 0:
        print(f"error: non-finite values at step {step + 1}/{run.args.steps} (loss {loss}, "
              f"gradient norm {grad_norm}): stopped without saving; the last good checkpoint is "
              f"{last or 'none (no checkpoint was written)'} — resume from it with a lower "
              f"--lr or a --grad-clip", file=sys.stderr, flush=True)
        run.log.close()
    return signals.EXIT_DIVERGED


def every(n, done, steps):
    """A periodic action due after `done` steps (the last step has its own at the end)."""
    return bool(n) and done % n == 0 and done < steps


def resume_eval(run):
    """A run interrupted between its checkpoint and that step's validation does it now."""
    args, start_step = run.args, run.plan.start_step
    if run.plan.resume is None or run.plan.val is None or not 0 < start_step < args.steps \
            or not args.val_every or start_step % args.val_every or run.val_done_at_start:
        return
    evaluate(run, start_step)
    if args.sample_every and start_step % args.sample_every == 0:
        sample(run, start_step)


def log_step(run, step, lr, result, t0, progress):
    """Gather every rank's phase times and loss on rank 0; print the step line, log the row.
    Returns the mean loss on rank 0 (None elsewhere)."""
    args, layout = run.args, run.plan.layout
    BT = args.batch_size * args.seq_len
    actions = np.zeros(mx.action_width(layout, args.seq_len))  # (padded to the longest)
    actions[:len(result.action_seconds)] = result.action_seconds
    per_rank, loss_sum = gather_rows(run.world, mx.PHASES,
                                     [result.times.get(k, 0.0) for k in mx.PHASES],
                                     result.loss_sum, run.grid.stage, run.grid.waiter,
                                     [result.pipeline_s, *actions])
    if run.rank != 0:
        return None
    for r in per_rank:
        r["pipeline"], r["actions"] = r["extra"][0], r.pop("extra")[1:]
    dt = time.perf_counter() - t0
    loss = loss_sum / BT
    mfu = mx.flops_per_token(run.plan.cfg, args.seq_len) * BT / dt / (
        run.peak[0] * 1e9 * run.cores)
    rec = {"step": step, "loss": loss, "lr": lr, "grad_norm": result.grad_norm,
           "step_ms": dt * 1000, "tokens_per_s": BT / dt,
           "tokens_per_s_per_core": BT / dt / run.cores, "mfu": mfu,
           **mx.step_record(per_rank, layout, args.seq_len)}
    run.history.append(rec)
    run.print0(mx.step_line(rec, args.steps, layout.pp, progress))
    run.log.log(rec)
    return loss


# -- validation, samples, checkpoints ---------------------------------------------------------------
def evaluate(run, step):
    """Mean validation loss after `step` optimizer steps (traced as step -1)."""
    args, val = run.args, run.plan.val
    if val is None:
        return None
    if run.tracer is not None:
        run.tracer.step = -1
    val.reset()
    total = 0.0
    for _ in range(args.val_steps):
        x, y = run.batch(val)
        total += run.runner.run(x, y, 0.0, train=False)
    loss = sum_to_root(run.world, [total], run.grid.waiter)[0] / (
        args.val_steps * args.batch_size * args.seq_len)
    run.print0(f"step {step:5d} | val loss {loss:.6f}")
    if run.log is not None:
        run.log.log({"step": step, "val_loss": loss})
    return loss


def gather(run, flat=None):
    """Replica 0's full tensors (parameters, or a flat array like them) on rank 0."""
    return gather_model(run.grid, run.stage, run.plan.layout, flat=flat)


def sample(run, step):
    """Print a sample from the current model (rank 0); returns the gathered tensors."""
    from mpigpt2.sample import generate, model_from_tensors, decode, start_token
    args, cfg = run.args, run.plan.cfg
    run.opt.sync()  # ZeRO: finish the parameter broadcasts still in flight
    tensors = gather(run)
    if run.rank == 0 and args.sample_tokens > 0:
        model = model_from_tensors(cfg, tensors)
        toks = generate(model, [start_token(cfg)], args.sample_tokens, temperature=1.0,
                        top_k=40, seed=args.seed + step)
        run.print0(f"--- sample at step {step} ---\n{decode(toks[1:])}\n---")
    barrier(run.world, run.grid.waiter)
    return tensors


def save_checkpoint(run, step):
    """Gather params and Adam moments on rank 0, which writes; all ranks agree on errors."""
    args, plan = run.args, run.plan
    run.opt.sync()
    params = gather(run)
    m_full, v_full = run.opt.full_moments()
    m, v = gather(run, m_full), gather(run, v_full)

    def write():
        if run.rank != 0:
            return None
        state = {"model": plan.cfg.as_dict(), "dtype": args.dtype,
                 "batch_size": args.batch_size, "seq_len": args.seq_len, "seed": args.seed,
                 "layout": plan.layout.as_dict(), "args": vars(args), "lineage": run.lineage,
                 "data": {"train": ck.data_identity(plan.train.paths),
                          "loader": plan.train.state()}}
        path = ck.write(os.path.join(args.out_dir, ck.SUBDIR), step, plan.cfg, params, m, v,
                        state, args.keep_checkpoints, run.stage.dtype == np.float64)
        run.print0(f"checkpoint {path}")
        run.last_checkpoint = path
        return path
    return agree(run.world, write, args.debug, run.grid.waiter)


# -- the end of the run -----------------------------------------------------------------------------
def finish(run):
    """Final validation, a sample, the model file, the last checkpoint, trace and summary."""
    args, start_step = run.args, run.plan.start_step
    if not (start_step == args.steps and run.val_done_at_start):
        evaluate(run, args.steps)
    tensors = sample(run, args.steps)  # (syncs ZeRO's parameter broadcasts first)

    def save_model():
        if args.save and run.rank == 0:
            os.makedirs(os.path.dirname(os.path.abspath(args.save)), exist_ok=True)
            write_model(args.save, run.plan.cfg, {n: tensors[n] for n in PARAM_NAMES})
            run.print0(f"saved {args.save}")
    agree(run.world, save_model, args.debug, run.grid.waiter)  # a full disk ends all with 2
    if not args.no_final_checkpoint and start_step < args.steps:
        save_checkpoint(run, args.steps)
    if run.tracer is not None:
        with run.grid.waiter.bounded("the trace events (gather)"):
            evs = run.world.gather(((run.rank, run.grid.stage, run.grid.replica),
                                    run.tracer.chrome_events()), root=0)
        if run.rank == 0:
            meta = {"layout": run.plan.layout.as_dict()}
            run.print0(f"trace {merge(evs, trace_path(args.out_dir), meta)}")
    report_summary(run)


def report_summary(run):
    """Per-rank memory (parameters, gradients, Adam moments, peak RSS) and the step summary."""
    stage, opt = run.stage, run.opt
    row = {"rank": run.rank, "stage": run.grid.stage, "replica": run.grid.replica,
           "host": socket.gethostname(), "param_bytes": int(opt.param_bytes),
           "optim_bytes": int(opt.nbytes), "grad_bytes": int(stage.grad_flat.nbytes),
           "state_bytes": int(opt.param_bytes + stage.grad_flat.nbytes + opt.nbytes),
           "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    with run.grid.waiter.bounded("the memory summary (gather)"):
        mem = run.world.gather(row, root=0)
    if run.rank != 0:
        return
    summ = mx.summary(run.history, run.args.warmup_report)
    if summ:
        run.print0(f"summary (after {summ['warmup_excluded']} warm-up steps): "
                   f"{summ['step_ms_mean']:.1f} ms mean, {summ['step_ms_median']:.1f} ms "
                   f"median, {summ['tokens_per_s_mean']:.0f} tok/s, "
                   f"MFU {summ.get('mfu_mean', 0) * 100:.1f}%")
    nodes = {}
    for r in mem:
        nodes[r["host"]] = nodes.get(r["host"], 0) + r["param_bytes"] + r["optim_bytes"]
    largest = max(r["param_bytes"] + r["optim_bytes"] for r in mem)
    run.print0(f"parameters + Adam state: {largest / 2**20:.1f} MiB on the largest rank, "
               + ", ".join(f"{v / 2**20:.1f} MiB on {h}" for h, v in nodes.items()))
    run.log.log({"summary": True, "run": summ, "ranks": mem, "node_state_bytes": nodes})
    run.log.close()


if __name__ == "__main__":
    sys.exit(run_cli(main))
