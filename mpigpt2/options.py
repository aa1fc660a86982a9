"""Command-line options of `python -m mpigpt2.train` and their range checks (setup.py turns them
into a run plan)."""

import argparse
import os

from mpigpt2.parallel.autotune import parse_slice_tokens
from mpigpt2.parallel.layout import SCHEDULES
from mpigpt2.base.argtypes import check_number
from mpigpt2.base.errors import UserError

DEFAULT_VAL = "data/tinyshakespeare/tiny_shakespeare_val.bin"


RANK_VARIABLES = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK",
                  "SLURM_PROCID")


def launcher_rank():
    """This process's rank as the MPI launcher tells it (before MPI is initialised), or 0."""
    for var in RANK_VARIABLES:
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


class Parser(argparse.ArgumentParser):
    """Under mpiexec every rank parses the flags: only rank 0 prints a usage error."""

    def error(self, message):
        if launcher_rank() != 0:
            self.exit(2)
        super().error(message)


def cluster_flags(a):
    """The flags about nodes and their network (a: the parser's add_argument)."""
    a("--grad-reduce", choices=("auto", "mpi", "hier"), default="auto", help="gradient "
      "reduction: mpi (MPI's allreduce), hier (reduce inside each node, allreduce between "
      "node leaders, broadcast inside the node), auto: time both at start-up where a data-"
      "parallel group has several ranks on a node and spans nodes, else mpi")
    a("--shared-dp", choices=("auto", "on", "off"), default="auto", help="node-shared data "
      "parallelism: the replicas of a stage on one node keep one copy of its parameters and "
      "Adam state in shared memory and sum gradients in place (ZeRO-1 inside the node); "
      "auto: on where every node holds the same number (two or more) of each stage's "
      "replicas and /dev/shm has room, unless --zero 1 or --grad-reduce is given")
    a("--busy-ranks", choices=("auto", "all"), default="auto", help="auto: on a node with "
      "more ranks than cores (and no --pp/--dp), one rank per core computes and the others "
      "wait for the end (oversubscribed ranks only time-share the cores); all: every rank")
    a("--net-gbps", type=float, default=None, help="bandwidth between nodes, Gbit/s, for the "
      "default layout (default: probed at start-up when the job spans nodes)")
    a("--net-latency-us", type=float, default=None, help="latency between nodes, µs (see "
      "--net-gbps)")


def parse_args(argv=None):
    p = Parser(prog="python -m mpigpt2.train", description=__doc__,
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--model", default="gpt2-tiny", help="preset name (random init), llm.c .bin, or Hugging "
      "Face GPT-2 directory / .safetensors to start from")
    a("--train-data", default="data/tinyshakespeare/tiny_shakespeare_train.bin",
      help="glob of llm.c token shards for training")
    a("--val-data", default=None,
      help="glob of llm.c token shards for validation ('' to skip; default: the prepared "
           "tinyshakespeare val shard when it exists)")
    a("--batch-size", type=int, default=8, help="B: sequences per optimizer step (global)")
    a("--seq-len", type=int, default=64, help="T: tokens per sequence")
    a("--steps", type=int, default=300, help="optimizer steps")
    a("--lr", type=float, default=1e-4, help="peak learning rate")
    a("--beta1", type=float, default=0.9, help="AdamW beta1")
    a("--beta2", type=float, default=0.999, help="AdamW beta2")
    a("--eps", type=float, default=1e-8, help="AdamW epsilon (added after the sqrt)")
    a("--weight-decay", type=float, default=0.0, help="decoupled weight decay (all parameters)")
    a("--warmup-steps", type=int, default=0, help="linear lr warm-up steps")
    a("--lr-schedule", choices=("constant", "cosine"), default="constant", help="lr after warm-up")
    a("--min-lr-frac", type=float, default=0.0, help="cosine floor as a fraction of --lr")
    a("--grad-clip", type=float, default=0.0, help="clip the global gradient norm (0 = off)")
    a("--seed", type=int, default=1337, help="seed of the random init and data shuffling")
    a("--shuffle", nargs="?", const="seeded", default=None, choices=("seeded", "llmc"),
      help="shuffle windows and shards each epoch: bare --shuffle = seeded by --seed (numpy), "
           "'llmc' = llm.c's single-process train order (MT19937 seed 42; --seed ignored)")
    a("--out-dir", default="out", help="where metrics.jsonl and config.json go")
    a("--val-every", type=int, default=0, help="validate every N steps (0 = only at the end)")
    a("--val-steps", type=int, default=5, help="validation batches per evaluation")
    a("--sample-every", type=int, default=0, help="sample every N steps (0 = only at the end)")
    a("--sample-tokens", type=int, default=64, help="tokens per sample (0 = no sampling)")
    a("--save", default=None, help="write the final model here (llm.c fp32 .bin)")
    a("--dtype", choices=("float32", "float64"), default="float32", help="compute precision")
    a("--pp", type=int, default=None, help="pipeline stages (default: see README)")
    a("--dp", type=int, default=None, help="data-parallel replicas (default: world / pp)")
    a("--stage-layers", default=None, help="layers per stage, e.g. 4,3,3,2 (default: balanced)")
    a("--microbatches", type=int, default=None, help="M micro-batches per replica per step")
    a("--slice-tokens", type=parse_slice_tokens, default=None, help="k tokens per slice (k "
      "divides T; k=T: none), explicit lengths summing to T (96,64,48,48: causal attention "
      "makes later slices dearer), or 'auto': time candidate k on this CPU and take the fastest")
    a("--schedule", default=None, help=f"pipeline schedule: {', '.join(SCHEDULES)}, or a "
      "torch.distributed.pipelining CSV file (README: The parallel layout)")
    a("--virtual-stages", type=int, default=None, metavar="V", help="stages per rank (layers "
      "split over pp·V stages): interleaved-1f1b, looped-bfs and zb-h1 place stages r, r+pp, … "
      "on rank r; zb-v (V = 2) r and 2pp-1-r (default 1; 2 for zb-v)")
    a("--rank-order", default="auto", help="pipe: world rank = replica·pp + stage (a "
      "replica's stages on neighbouring ranks); data: stage·dp + replica (a stage's replicas "
      "side by side); auto: whichever sends fewer bytes between nodes (README: The parallel "
      "layout)")
    a("--print-schedule", action="store_true", help="print the step × rank table and exit")
    a("--schedule-out", default=None, metavar="FILE.csv", help="with --print-schedule: also "
      "write the schedule as a file --schedule reads (torch's format when k = T, else with "
      "slices, 0F1.2)")
    a("--zero", type=int, choices=(0, 1), default=0, help="1: ZeRO-1, shard Adam state and the "
      "update over the data-parallel group (the tied wte over the 2·dp ranks holding it); "
      "gradients reduced onto their owners, updated shards broadcast back")
    a("--no-overlap", action="store_true", help="start gradient reduction only after the whole "
      "backward, and finish parameter allgathers right after the update (for comparison)")
    cluster_flags(a)
    a("--threads", type=int, default=None, help="BLAS threads per rank (default cores / ranks)")
    a("--checkpoint-every", type=int, default=0, help="checkpoint every N steps (0 = only "
      "at the end and on preemption)")
    a("--keep-checkpoints", type=int, default=3, help="keep the newest K checkpoints (0 = all)")
    a("--resume", default=None, help="'auto' (newest complete checkpoint in --out-dir, if any) "
      "or a checkpoint directory")
    a("--no-final-checkpoint", action="store_true", help="no checkpoint at the end of the run")
    a("--no-memory-check", action="store_true", help="start even when the memory estimate "
      "exceeds what the node has left (MPIGPT2_NODE_MEMORY=BYTES sets that amount)")
    a("--trace", action="store_true", help="write OUT/trace.json (Chrome trace, all ranks)")
    a("--peak-gflops", type=float, default=None, help="per-core float32 peak for MFU "
      "(default: a one-off matmul probe, cached)")
    a("--warmup-report", type=int, default=2, help="steps left out of the end-of-run summary")
    fault_flags(a)
    return p.parse_args(argv)


def fault_flags(a):
    """The flags about stalls, errors and the failure tests (a: the parser's add_argument)."""
    a("--stall-seconds", type=float, default=60.0, help="report waits longer than this")
    a("--stall-abort", action="store_true", help="abort the job when a wait stalls")
    a("--wait-timeout", type=float, default=1800.0, help="abort the job when any single wait "
      "for a message or collective exceeds this (a peer died unnoticed)")
    a("--debug", action="store_true", help="show tracebacks for input errors")
    a("--inject-error", default=None, help=argparse.SUPPRESS)  # "RANK:STEP", for failure tests
    a("--inject-delay", default=None, help=argparse.SUPPRESS)  # "RANK:STEP:SECONDS" (stalls)


def check_args(args):
    for flag in ("batch_size", "seq_len", "val_steps", "steps"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be ≥ 1, got {getattr(args, flag)}")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be ≥ 1, got {args.threads}")
    for flag in ("val_every", "sample_every", "sample_tokens", "warmup_steps",
                 "checkpoint_every", "keep_checkpoints", "warmup_report"):
        if getattr(args, flag) < 0:
            raise UserError(f"--{flag.replace('_', '-')} must be ≥ 0, got {getattr(args, flag)}")
    for flag, lo, lo_open, hi in (("lr", 0, False, None), ("beta1", 0, False, None),
                                  ("beta2", 0, False, None), ("eps", 0, True, None),
                                  ("weight_decay", 0, False, None), ("grad_clip", 0, False, None),
                                  ("min_lr_frac", 0, False, 1), ("stall_seconds", 0, True, None),
                                  ("wait_timeout", 0, True, None), ("peak_gflops", 0, True, None),
                                  ("net_gbps", 0, True, None), ("net_latency_us", 0, False, None)):
        try:
            check_number("--" + flag.replace("_", "-"), getattr(args, flag), lo, lo_open, hi)
        except UserError as e:
            optimizer = flag in ("lr", "beta1", "beta2", "eps")
            raise UserError(f"optimizer flags out of range: {e}" if optimizer else str(e))
    if not (args.beta1 < 1 and args.beta2 < 1):
        raise UserError("optimizer flags out of range: need 0 ≤ --beta1/--beta2 < 1")
    if args.shared_dp == "on" and (args.zero or args.grad_reduce != "auto"):
        raise UserError("--shared-dp on shards the optimizer and reduces inside a node "
                        "itself: it does not combine with --zero 1 or --grad-reduce")
    if args.seed < 0:
        raise UserError(f"--seed must be ≥ 0, got {args.seed}")
    for flag, spec, n in (("--inject-error", args.inject_error, 2),
                          ("--inject-delay", args.inject_delay, 3)):
        if spec is not None and len(spec.split(":")) != n:
            raise UserError(f"{flag} takes {n} colon-separated numbers")
