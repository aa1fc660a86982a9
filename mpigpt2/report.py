"""Pictures of training runs: `python -m mpigpt2.report OUT_DIR [OUT_DIR ...]`.

Writes loss.png (train and validation loss per step, one colour per run), throughput.png
(tokens/s per step) and, when the first run was traced (--trace), timeline.png: one step of
the pipeline, a row per rank, a bar per forward / backward slice, message wait, gradient
allreduce and optimizer update; blank is idle time.
"""

import argparse
import json
import os
import sys

from mpigpt2.base.errors import UserError

COLOURS = {"forward": "#4c8bd6", "backward": "#5fb35f", "communication": "#f0b45a",
           "allreduce": "#a56cc1", "update": "#8c6d5a"}
SEND_COLOUR = "#b35900"  # a darker shade of the communication colour
LABELS = {"forward": "forward", "backward": "backward",
          "communication": "waiting for a message",
          "allreduce": "gradient allreduce / ZeRO allgather", "update": "optimizer update"}
CATEGORY = {"forward": "forward", "backward": "backward", "wait": "communication",
            "send": "communication", "allreduce": "allreduce", "allgather": "allreduce",
            "update": "update"}



def save_png(fig, path):
    """Write the figure atomically: a reader never sees a half-written PNG."""
    from mpigpt2.formats.atomic import atomic_write
    atomic_write(path, lambda f: fig.savefig(f, format="png"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m mpigpt2.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dirs", nargs="+", metavar="OUT_DIR",
                   help="training output directories (with metrics.jsonl; the first one's "
                        "trace.json gives the timeline)")
    p.add_argument("--out", default=None,
                   help="directory for the PNGs (default: the first OUT_DIR)")
    p.add_argument("--step", type=int, default=None,
                   help="step index for the timeline (default: the last fully traced step)")
    return p.parse_args(argv)


def pyplot():
    """matplotlib.pyplot on the Agg backend, or a UserError saying how to install it."""
    try:
        import matplotlib
    except ImportError:
        raise UserError("report needs matplotlib: pip install 'mpigpt2[plot]'")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


# ---------------------------------------------------------------------------------------------
# reading runs

def read_metrics(out_dir):
    """(train step records, val records) of OUT/metrics.jsonl."""
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise UserError(f"{out_dir}: no metrics.jsonl; give a directory written by "
                        f"python -m mpigpt2.train --out-dir")
    steps, vals = [], []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                raise UserError(f"{path}:{i}: not a JSON line (a truncated or foreign file?)")
            if "loss" in rec:
                steps.append(rec)
            elif "val_loss" in rec:
                vals.append(rec)
    if not steps:
        raise UserError(f"{path} has no training steps yet")
    return steps, vals


def read_config(out_dir):
    try:
        with open(os.path.join(out_dir, "config.json"), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def run_labels(dirs):
    """Legend names: the directory names (with parents added until they differ) and, from
    config.json, the layout."""
    parts = [os.path.abspath(d).rstrip(os.sep).split(os.sep) for d in dirs]
    names = [str(i) for i in range(len(dirs))]
    for depth in range(1, max(len(p) for p in parts) + 1):
        short = [os.sep.join(p[-depth:]) for p in parts]
        if len(set(short)) == len(short):
            names = short
            break
    out = []
    for d, name in zip(dirs, names):
        lay = read_config(d).get("layout")
        if lay:
            name += (f" (pp {lay['pp']} × dp {lay['dp']}, M={lay['microbatches']}, "
                     f"k={lay['slice_tokens']})")
        out.append(name)
    return out


# ---------------------------------------------------------------------------------------------
# loss and throughput

def plot_curves(plt, runs, labels, path_loss, path_tput):
    from matplotlib.ticker import MaxNLocator
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for i, ((steps, vals), name) in enumerate(zip(runs, labels)):
        c = f"C{i % 10}"
        lw = 1.3 + 1.5 * (len(runs) - 1 - i)  # runs with equal losses (any layout) stay visible
        ax.plot([s["step"] for s in steps], [s["loss"] for s in steps], color=c, lw=lw,
                label=f"{name} train")
        if vals:
            ax.plot([v["step"] for v in vals], [v["val_loss"] for v in vals], color=c, ls="--",
                    marker="o", ms=4 + 2.5 * (len(runs) - 1 - i), lw=1.0, label=f"{name} val")
    ax.set(xlabel="step (updates done)", ylabel="loss (mean cross-entropy, nats)",
           title="training loss (lines) and validation loss (dashed, dots)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path_loss)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for i, ((steps, _), name) in enumerate(zip(runs, labels)):
        ax.plot([s["step"] for s in steps], [s["tokens_per_s"] for s in steps],
                color=f"C{i % 10}", marker=".", lw=1.3, label=name)
    ax.set(xlabel="step", ylabel="tokens / s (all ranks)", title="throughput")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path_tput)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# pipeline timeline

def step_events(doc):
    """{step: {rank: [events]}} of a trace: a step's events on a rank end with its update (a
    validation pass after the last step carries that step's number too, and is left out)."""
    by = {}
    for e in doc["traceEvents"]:
        if e.get("ph") in ("X", "i") and "step" in e.get("args", {}):
            by.setdefault(e["args"]["step"], {}).setdefault(e["tid"], []).append(e)
    out = {}
    for step, ranks in by.items():
        kept = {}
        for rank, evs in ranks.items():
            evs.sort(key=lambda e: e["ts"])
            ends = [i for i, e in enumerate(evs) if e.get("cat") == "update"]
            if ends:
                kept[rank] = evs[:ends[0] + 1]
        if kept:
            out[step] = kept
    return out


def rank_names(doc):
    """{rank: 'rank r (stage s)'} from the trace's row names (stage r mod pp otherwise)."""
    pp = doc.get("metadata", {}).get("layout", {}).get("pp")
    names = {}
    for e in doc["traceEvents"]:
        if e.get("ph") == "M" and e.get("name") == "thread_name":
            text = e["args"]["name"]  # "rank 1 (stage 1, replica 0)"
            names[e["tid"]] = text.split(",")[0] + ")" if "," in text else text
    for e in doc["traceEvents"]:
        if e.get("tid") not in names and e.get("ph") in ("X", "i"):
            names[e["tid"]] = f"rank {e['tid']}" + (f" (stage {e['tid'] % pp})" if pp else "")
    return names


def full_steps(steps, nranks):
    return sorted(s for s, r in steps.items() if len(r) == nranks)


def choose_step(doc, step=None):
    """The step to draw: step (checked: every rank traced it whole), by default the last
    step every rank traced."""
    complete = full_steps(step_events(doc), len(rank_names(doc)))
    if not complete:
        raise UserError("trace.json has no step traced on every rank (did the run finish?)")
    if step is None:
        return complete[-1]
    if step not in complete:
        raise UserError(f"--step {step}: not fully traced; traced steps are "
                        f"{complete[0]}..{complete[-1]}")
    return step


def plot_timeline(plt, doc, path, step, metrics=None, config=None):
    """Draw one step (fully traced, see choose_step) of a trace."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    names = rank_names(doc)
    ranks = sorted(names)
    evs = step_events(doc)[step]
    t0 = min(e["ts"] for r in evs.values() for e in r)
    t1 = max(e["ts"] + e.get("dur", 0) for r in evs.values() for e in r)
    span_ms = (t1 - t0) / 1e3

    fig, ax = plt.subplots(figsize=(12, 1.9 + 0.55 * len(ranks)), dpi=100,
                           layout="constrained")
    fig.canvas.draw()
    px_per_ms = ax.get_window_extent().width / span_ms
    for row, rank in enumerate(ranks):
        bars = {}
        for e in evs.get(rank, []):
            cat = CATEGORY.get(e.get("cat"))
            if cat is None:
                continue
            x = (e["ts"] - t0) / 1e3
            if e["ph"] == "i":  # a send: a tick across the top edge of the row's bars
                ax.plot([x, x], [row - 0.47, row - 0.25], color=SEND_COLOUR, lw=1.2,
                        solid_capstyle="butt")
                continue
            w = e["dur"] / 1e3
            bars.setdefault(cat, []).append((x, w))
            if cat in ("forward", "backward") and w * px_per_ms > 5 * len(e["name"]) + 4:
                ax.text(x + w / 2, row, e["name"], ha="center", va="center", fontsize=7,
                        color="white", clip_on=True)
        for cat, xs in bars.items():
            ax.broken_barh(xs, (row - 0.35, 0.7), facecolors=COLOURS[cat],
                           edgecolors="white", linewidth=0.4)
    ax.set_yticks(range(len(ranks)), [names[r] for r in ranks])
    ax.set_ylim(len(ranks) - 0.5, -0.5)  # rank 0 on top
    ax.set_xlim(0, span_ms * 1.005)
    ax.set_xlabel(f"ms since the start of step {step}")
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    ax.set_title(timeline_title(doc, step, metrics, config, span_ms), fontsize=10)
    handles = [Patch(color=COLOURS[c], label=LABELS[c]) for c in COLOURS]
    handles.insert(3, Line2D([], [], color=SEND_COLOUR, lw=1.2, label="send (start)"))
    fig.legend(handles=handles, loc="outside lower center", ncol=6, fontsize=8,
               frameon=False)
    save_png(fig, path)
    plt.close(fig)


def timeline_title(doc, step, metrics, config, span_ms):
    lay = doc.get("metadata", {}).get("layout") or (config or {}).get("layout", {})
    T = (config or {}).get("args", {}).get("seq_len")
    parts = []
    if lay:
        k = lay.get("slice_tokens")
        n = f" (n={T // k})" if T and k else ""
        parts.append(f"pp {lay.get('pp')} × dp {lay.get('dp')}, stages "
                     f"{lay.get('stage_layers')}, M={lay.get('microbatches')}, k={k}{n}, "
                     f"{lay.get('schedule')}")
    rec = next((m for m in metrics or [] if m.get("step") == step), None)
    line = f"step {step}: {rec['step_ms'] if rec else span_ms:.0f} ms"
    if rec and "bubble" in rec:
        line += (f", bubble {rec['bubble']:.2f} measured "
                 f"({rec.get('bubble_predicted', float('nan')):.2f} predicted)")
    return "\n".join(parts + [line])


# ---------------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    runs = [read_metrics(d) for d in args.dirs]  # fail before drawing anything
    trace = os.path.join(args.dirs[0], "trace.json")
    doc = step = None
    if os.path.isfile(trace):
        try:
            with open(trace, encoding="utf-8") as f:
                doc = json.load(f)
        except ValueError:
            raise UserError(f"{trace}: not valid JSON (was the run interrupted?)")
        step = choose_step(doc, args.step)
    elif args.step is not None:
        raise UserError(f"--step: {args.dirs[0]} has no trace.json (train with --trace)")
    plt = pyplot()
    out = args.out or args.dirs[0]
    os.makedirs(out, exist_ok=True)
    paths = [os.path.join(out, "loss.png"), os.path.join(out, "throughput.png")]
    plot_curves(plt, runs, run_labels(args.dirs), *paths)
    if doc is not None:
        path = os.path.join(out, "timeline.png")
        plot_timeline(plt, doc, path, step, runs[0][0], read_config(args.dirs[0]))
        paths.append(path)
        print(f"timeline of step {step} from {trace}")
    else:
        print(f"no timeline: {trace} is missing (train with --trace to get one)")
    for p in paths:
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    from mpigpt2.base.errors import run_cli
    sys.exit(run_cli(main))
