"""Train GPT-2 with data + pipeline parallelism: `mpiexec -n N python -m mpigpt2.train [...]`.

Reads top to bottom: arguments, layout and data checks (agreed by all ranks), the grid and this
rank's stage, the optimizer, then the loop (lr, step, reduce, update, log, eval, sample, save).
"""

import json
import os
import sys
import time

import numpy as np

from mpigpt2.options import parse_args, setup


def main(argv=None):
    args = parse_args(argv)
    from mpi4py import MPI
    from mpigpt2.parallel.failure import install_excepthook, agree
    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    install_excepthook(world)
    from mpigpt2 import malloc
    malloc.tune()  # keep big freed temporaries mapped: no page faults every step
    print0 = (lambda *a, **k: print(*a, **k, flush=True)) if rank == 0 else (lambda *a, **k: None)

    local = world.Split_type(MPI.COMM_TYPE_SHARED)  # the ranks sharing this node

    # -- set-up: checked on every rank, agreed, before any compute --------------------------
    # --print-schedule in one process only draws the table: --pp/--dp then give the grid
    grid_size = (args.pp or 1) * (args.dp or 1) if args.print_schedule and size == 1 and \
        (args.pp or args.dp) else size
    cfg, layout, train_loader, val_loader, resume = agree(
        world, lambda: setup(args, grid_size, local.Get_size()), args.debug)
    from mpigpt2.parallel import schedule
    B, T = args.batch_size, args.seq_len
    tuned = None
    saved_layout = resume[1].get("layout") if resume is not None else None
    if args.slice_tokens == "auto" and saved_layout and all(
            saved_layout.get(key) == value for key, value in layout.as_dict().items()
            if key != "slice_tokens"):  # same layout resumed: keep its k (bit-exact resume)
        import dataclasses
        layout = dataclasses.replace(layout, slice_tokens=int(saved_layout["slice_tokens"]))
        print0(f"autotune: k={layout.slice_tokens} kept from the checkpoint's layout")
    elif args.slice_tokens == "auto":  # rank 0 measures, all ranks agree before the Runner
        from mpigpt2.parallel import autotune
        layout, tuned = autotune.agree(world, cfg, layout, B, T, args.dtype, args.threads or
                                       max(1, (os.cpu_count() or 1) // local.Get_size()))
        print0(autotune.describe(tuned))
    n_slices = T // layout.slice_tokens
    if args.print_schedule:
        progs = schedule.build(layout.schedule, layout.pp, layout.microbatches, n_slices)
        print0(f"layout {layout.as_dict()}\n" + schedule.table(progs))
        print0(f"predicted bubble (unit costs): {schedule.bubble(schedule.simulate(progs)):.3f}")
        return 0

    from threadpoolctl import threadpool_limits
    from mpigpt2.parallel import waiting, signals
    from mpigpt2.observe import metrics as mx
    from mpigpt2.formats import checkpoint as ck
    from mpigpt2.parallel.collectives import sum_to_root, allreduce_sum, gather_model, barrier
    from mpigpt2.observe.metrics import gather_rows
    from mpigpt2.parallel.grid import make_grid
    from mpigpt2.formats.llmc import write_model
    from mpigpt2.model.optim import AdamW, lr_at, clip_scale
    from mpigpt2.model.params import init_params, PARAM_NAMES
    from mpigpt2.parallel.runtime import Runner
    from mpigpt2.model.stage import Stage
    from mpigpt2.model.config import PRESETS
    from mpigpt2.formats.atomic import atomic_write_text
    from mpigpt2.observe.trace import Tracer, merge, trace_path
    from mpigpt2.parallel.zero import ShardedAdam

    threads = args.threads or max(1, (os.cpu_count() or 1) // local.Get_size())
    threadpool_limits(threads, user_api="blas")
    waiting.STALL.update(seconds=args.stall_seconds, abort=args.stall_abort,
                         timeout=args.wait_timeout)
    signals.install()

    # -- grid, this rank's stage, optimizer ----------------------------------------------------
    grid = make_grid(world, layout.pp, layout.dp)
    spec = layout.spec(grid.stage)
    dtype = np.dtype(args.dtype)
    stage = Stage(cfg, spec, dtype)
    hyper = (args.beta1, args.beta2, args.eps, args.weight_decay)
    if args.zero:  # ZeRO-1: this rank keeps Adam state for 1/dp of the stage
        opt = ShardedAdam(grid, stage, *hyper)
        stage.before_use = opt.wait_param
    else:
        opt = AdamW(stage.layout.size, dtype, *hyper)
    start_step = 0
    if resume is not None:
        ckpt_path, ckpt_state = resume
        m_full = opt.m if not args.zero else np.empty_like(stage.flat)
        v_full = opt.v if not args.zero else np.empty_like(stage.flat)
        ck.load_into(ckpt_path, ckpt_state, spec, stage.p, stage.layout.views(m_full),
                     stage.layout.views(v_full), dtype == np.float64)
        if args.zero:
            opt.set_moments(m_full, v_full)
        start_step = ckpt_state["step"]
    elif args.model in PRESETS:
        init_params(cfg, spec, stage.p, args.seed)
    else:
        from mpigpt2.convert import load_stage_params  # llm.c .bin or Hugging Face model
        load_stage_params(args.model, spec, stage.p)
    M = layout.microbatches
    rows = B // layout.dp            # sequences per replica
    b = rows // M                    # sequences per micro-batch
    my_rows = slice(grid.replica * rows, (grid.replica + 1) * rows)
    tracer = Tracer(rank, grid.stage, grid.replica) if args.trace else None
    if tracer is not None:
        waiting.TRACE = lambda kind, what, t0, t1: tracer.span(f"wait {what}", kind, t0, t1)
    runner = Runner(grid, stage, layout, T, b, tracer, reducer=opt if args.zero else None,
                    overlap=not args.no_overlap)
    dloss = 1.0 / (B * T)
    peak_core, peak_src = mx.peak_gflops_per_core(args.peak_gflops) if rank == 0 else (0, "")
    cores_used = min(os.cpu_count() or 1, local.Get_size() * threads) * (size // local.Get_size())
    flops_tok = mx.flops_per_token(cfg, T)

    metrics_path = os.path.join(args.out_dir, "metrics.jsonl")
    if rank == 0:
        os.makedirs(args.out_dir, exist_ok=True)
        config = {"model": cfg.as_dict(), "layout": layout.as_dict(), "world": size,
                  "threads_per_rank": threads, "args": vars(args)}
        if tuned is not None:
            config["autotune"] = tuned
        atomic_write_text(os.path.join(args.out_dir, "config.json"), json.dumps(config, indent=2))
        kept = mx.rows_before(metrics_path, start_step) if start_step else []
        atomic_write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in kept))
        metrics = open(metrics_path, "a")
        if resume is None:
            moved = ck.move_aside(os.path.join(args.out_dir, ck.SUBDIR))
            if moved:
                print0(f"note: {args.out_dir} held checkpoints of an earlier run (not resumed): "
                       f"moved them to {moved}")
    # validation done at start_step before the interruption (it follows the checkpoint);
    # a polled broadcast: rank 0 may still be probing the matmul peak, and spinning ranks
    # would steal its core
    flag = np.array([rank == 0 and any("val_loss" in r and r["step"] == start_step
                                       for r in kept)], dtype=np.int8)
    waiting.wait_all([world.Ibcast(flag, root=0)], "setup")
    val_done_at_start = bool(flag[0])
    print0(f"model L={cfg.num_layers} C={cfg.channels} NH={cfg.num_heads} V={cfg.vocab_size} "
           f"maxT={cfg.max_seq_len} | ranks {size} = pp {layout.pp} × dp {layout.dp} | stages "
           f"{list(layout.stage_layers)} | M={M} k={layout.slice_tokens} "
           f"{layout.schedule} | B={B} T={T} | {threads} BLAS thread(s)/rank")
    print0(f"peak {peak_core:.1f} GFLOP/s per core ({peak_src}) × {cores_used} cores; "
           f"{flops_tok / 1e6:.1f} MFLOP per token")
    if resume is not None:
        print0(f"resumed from {resume[0]} at step {start_step}")
    for note in args.notes:
        print0(note)

    def batch(loader):
        """This replica's rows of the next global batch, as (M, b, T) micro-batches."""
        x, y = loader.next_batch(my_rows)
        return x.reshape(M, b, T), y.reshape(M, b, T)

    def log(obj):
        if rank == 0:
            metrics.write(json.dumps(obj) + "\n")
            metrics.flush()

    def evaluate(step):
        """Mean validation loss after `step` optimizer steps (traced as step -1)."""
        if val_loader is None:
            return None
        if tracer is not None:
            tracer.step = -1
        val_loader.reset()
        total = 0.0
        for _ in range(args.val_steps):
            x, y = batch(val_loader)
            total += runner.run(x, y, 0.0, train=False)
        val = sum_to_root(world, [total])[0] / (args.val_steps * B * T)
        print0(f"step {step:5d} | val loss {val:.6f}")
        log({"step": step, "val_loss": val})
        return val

    def sync():
        """ZeRO: finish the parameter allgathers still in flight."""
        if args.zero:
            opt.sync()

    def sample(step):
        sync()
        tensors = gather_model(grid, stage, layout)
        if rank == 0 and args.sample_tokens > 0:
            from mpigpt2.sample import generate, model_from_tensors, decode, start_token
            model = model_from_tensors(cfg, tensors)
            toks = generate(model, [start_token(cfg)], args.sample_tokens, temperature=1.0,
                            top_k=40, seed=args.seed + step)
            print0(f"--- sample at step {step} ---\n{decode(toks[1:])}\n---")
        barrier(world)
        return tensors

    def save_checkpoint(step):
        """Gather params and Adam moments on rank 0, which writes; all ranks agree on errors."""
        sync()
        params = gather_model(grid, stage, layout)
        m_full, v_full = opt.full_moments() if args.zero else (opt.m, opt.v)
        m = gather_model(grid, stage, layout, flat=m_full)
        v = gather_model(grid, stage, layout, flat=v_full)

        def write():
            if rank != 0:
                return None
            state = {"model": cfg.as_dict(), "dtype": args.dtype, "batch_size": B,
                     "seq_len": T, "seed": args.seed, "layout": layout.as_dict(),
                     "args": vars(args), "data": {
                         "train": ck.data_identity(train_loader.paths),
                         "loader": train_loader.state()}}
            path = ck.write(os.path.join(args.out_dir, ck.SUBDIR), step, cfg, params, m, v,
                            state, args.keep_checkpoints, dtype == np.float64)
            print0(f"checkpoint {path}")
            return path
        return agree(world, write, args.debug)

    # -- training loop --------------------------------------------------------------------------
    inject = tuple(int(v) for v in args.inject_error.split(":")) if args.inject_error else None
    delay = tuple(float(v) for v in args.inject_delay.split(":")) if args.inject_delay else None
    history = []
    barrier(world)
    if tracer is not None:
        tracer.align()
    if resume is not None and val_loader is not None and 0 < start_step < args.steps and \
            args.val_every and \
            start_step % args.val_every == 0 and not val_done_at_start:
        evaluate(start_step)  # the interrupted run stopped between its checkpoint and this
        if args.sample_every and start_step % args.sample_every == 0:
            sample(start_step)
    for step in range(start_step, args.steps):
        t0 = time.perf_counter()
        waiting.STALL["step"] = step
        if tracer is not None:
            tracer.step = step
        lr = lr_at(step, args.lr, args.steps, args.warmup_steps, args.lr_schedule,
                   args.min_lr_frac)
        x, y = batch(train_loader)
        if inject and inject == (rank, step):
            raise RuntimeError(f"injected failure on rank {rank} at step {step}")
        if delay and (delay[0], delay[1]) == (rank, step):
            time.sleep(delay[2])
        stage.zero_grad()
        waiting.STATS.take()
        runner.take_times()  # (validation between steps is not this step's time)
        loss_sum = runner.run(x, y, dloss)
        scale = 1.0
        if args.grad_clip > 0:
            if args.zero:  # shards partition every stage: sum over the whole world
                norm = float(np.sqrt(allreduce_sum(world, [opt.grad_sumsq()])[0]))
            else:  # wte is on two stages when pp > 1: count it once (on the first stage)
                g = stage.grad_flat if not (spec.last and not spec.first) else \
                    np.concatenate([stage.g[n].ravel() for n in stage.g if n != "wte"])
                norm = float(np.sqrt(allreduce_sum(grid.pipe, [float(g @ g)])[0]))
            scale = clip_scale(norm, args.grad_clip)
        t_up = time.perf_counter()
        if args.zero:
            opt.step(step + 1, lr, scale, overlap=not args.no_overlap)
        else:
            opt.step(stage.flat, stage.grad_flat, step + 1, lr, scale)
        t_done = time.perf_counter()
        if tracer is not None:
            tracer.span("update", "update", t_up, t_done)
        times = runner.take_times()
        gathered = waiting.STATS.take().get("allgather", 0.0)  # ZeRO waits inside forward
        times["forward"] = times.get("forward", 0.0) - gathered
        times.update(update=t_done - t_up, allgather=gathered)
        per_rank, loss_sums = gather_rows(world, [times.get(k, 0.0) for k in mx.PHASES],
                                          loss_sum, grid.stage)
        loss = loss_sums / (B * T) if rank == 0 else 0.0
        dt = time.perf_counter() - t0
        rec = {"step": step, "loss": loss, "lr": lr, "step_ms": dt * 1000,
               "tokens_per_s": B * T / dt}
        if rank == 0:
            mfu = flops_tok * B * T / dt / (peak_core * 1e9 * cores_used)
            rec.update(tokens_per_s_per_core=B * T / dt / cores_used, mfu=mfu,
                       **mx.step_record(per_rank, dt, layout, T))
            history.append(rec)
            busiest = max(rec["phases_ms"], key=lambda p: p["forward"] + p["backward"])
            print0(f"step {step + 1:5d}/{args.steps} | loss {loss:.6f} | lr {lr:.2e} | "
                   f"{dt * 1000:7.1f} ms | {B * T / dt:8.0f} tok/s "
                   f"({rec['tokens_per_s_per_core']:.0f}/core) | MFU {mfu * 100:5.1f}% | "
                   + mx.phase_line(busiest) + (f" | bubble {rec['bubble']:.2f} (predicted "
                   f"{rec['bubble_predicted']:.2f})" if layout.pp > 1 else ""))
        log(rec)
        if not np.isfinite(loss) and rank == 0:
            raise FloatingPointError(f"loss is {loss} at step {step}; lower --lr or clip")
        done = step + 1
        stop = signals.agree(world)
        if stop:
            print0(f"signal {stop} received: checkpointing at step {done} and exiting "
                   f"(status {signals.EXIT_PREEMPTED}: requeue me)")
            save_checkpoint(done)
            return signals.EXIT_PREEMPTED
        if args.checkpoint_every and done % args.checkpoint_every == 0 and done < args.steps:
            save_checkpoint(done)
            malloc.release()  # (the gathered model and moments)
        if args.val_every and done % args.val_every == 0 and done < args.steps:
            evaluate(done)
        if args.sample_every and done % args.sample_every == 0 and done < args.steps:
            sample(done)
            malloc.release()

    # -- the end: validation, a sample, the final model and checkpoint ---------------------------
    if not (start_step == args.steps and val_done_at_start):
        evaluate(args.steps)
    tensors = sample(args.steps)  # (syncs ZeRO's parameter allgathers first)

    def save_model():
        if args.save and rank == 0:
            os.makedirs(os.path.dirname(os.path.abspath(args.save)), exist_ok=True)
            write_model(args.save, cfg, {n: tensors[n] for n in PARAM_NAMES})
            print0(f"saved {args.save}")
    agree(world, save_model, args.debug)  # a full disk on rank 0 ends every rank with status 2
    if not args.no_final_checkpoint and start_step < args.steps:
        save_checkpoint(args.steps)
    if tracer is not None:
        evs = world.gather(((rank, grid.stage, grid.replica), tracer.chrome_events()), root=0)
        if rank == 0:
            print0(f"trace {merge(evs, trace_path(args.out_dir), {'layout': layout.as_dict()})}")
    # per-rank memory: what the parameters, gradients and Adam moments take, and peak RSS
    import resource
    mem = world.gather({"rank": rank, "stage": grid.stage, "replica": grid.replica,
                        "param_bytes": int(stage.flat.nbytes),
                        "optim_bytes": int(opt.nbytes if args.zero else opt.m.nbytes * 2),
                        "state_bytes": int(stage.flat.nbytes * 2 + (opt.nbytes if args.zero
                                                                     else opt.m.nbytes * 2)),
                        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024},
                       root=0)
    if rank == 0:
        summ = mx.summary(history, args.warmup_report)
        if summ:
            print0(f"summary (after {summ['warmup_excluded']} warm-up steps): "
                   f"{summ['step_ms_mean']:.1f} ms mean, {summ['step_ms_median']:.1f} ms "
                   f"median, {summ['tokens_per_s_mean']:.0f} tok/s, "
                   f"MFU {summ.get('mfu_mean', 0) * 100:.1f}%")
        log({"summary": True, "run": summ, "ranks": mem})
        metrics.close()
    return 0


if __name__ == "__main__":
    from mpigpt2.errors import run_cli
    sys.exit(run_cli(main))
