"""Pictures of training runs: `python -m mpigpt2.report OUT_DIR [OUT_DIR ...]`.

Writes loss.png (train and validation loss per step, one colour per run), throughput.png
(tokens/s per step) and, when the first run was traced (--trace), timeline.png: one step of
the pipeline, a row per rank, a bar per forward / backward slice, message wait, gradient
allreduce and optimizer update; blank is idle time.

Inputs are checked whole before anything is drawn, and the pictures are drawn in memory before
any is written, so a report that fails leaves the disk as it was. Malformed input is refused,
never skipped: one error line naming the file and line (metrics.jsonl), the file and event
(trace.json) or the file and field (config.json), exit status 2. The one exception is a torn
last line of metrics.jsonl (no newline at its end and not parseable: what a run killed while
writing it leaves), which is skipped with a note on stdout. The rows of metrics.jsonl are step
rows (an integer step, a loss and tokens_per_s), validation rows (step, val_loss) and the
end-of-run summary (not drawn); any other row is refused. A number may be null (how a diverged
run logs a non-finite one) or, in older files, NaN or ±Infinity: it is drawn as a gap.
config.json and trace.json are optional; when present they must be regular files of the shape
mpigpt2.train writes.
"""

import argparse
import io
import json
import math
import os
import sys

from mpigpt2.base.errors import UserError
from mpigpt2.base.files import open_regular, require_regular

COLOURS = {"forward": "#4c8bd6", "backward": "#5fb35f", "communication": "#f0b45a",
           "allreduce": "#a56cc1", "update": "#8c6d5a"}
SEND_COLOUR = "#b35900"  # a darker shade of the communication colour
LABELS = {"forward": "forward", "backward": "backward",
          "communication": "waiting for a message",
          "allreduce": "gradient allreduce / ZeRO allgather", "update": "optimizer update"}
CATEGORY = {"forward": "forward", "backward": "backward", "wait": "communication",
            "send": "communication", "allreduce": "allreduce", "allgather": "allreduce",
            "update": "update"}
MAX_VALUE = 1e15      # |a number| in metrics or trace beyond this is not a measurement
MAX_STEP = 2 ** 53    # steps are exact in a float (the plots' axis) below this
MAX_RANKS = 512       # rows of the timeline
LAYOUT_INTS = ("pp", "dp", "microbatches", "slice_tokens")


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
    p.add_argument("--debug", action="store_true", help="show tracebacks for input errors")
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
# checked values

def show(v, limit=60):
    """A value read from a file, for a one-line message (repr escapes newlines, shortened)."""
    text = repr(v)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def text(v):
    """A string read from a file, for a picture: control characters escaped, and '$' too
    (matplotlib would parse $...$ as mathtext, and refuse a malformed one)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(v)).replace("$", r"\$")


def real(v, finite=True, lo=-MAX_VALUE, hi=MAX_VALUE):
    """v as a float when it is a JSON number (not a bool) in [lo, hi] (NaN and ±inf too when
    finite is False), else None."""
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return None
    try:
        x = float(v)
    except OverflowError:
        return None
    if not math.isfinite(x):
        return None if finite else x
    return x if lo <= x <= hi else None


def integer(v, lo=0, hi=MAX_STEP):
    """v when it is a JSON integer (not a bool) in [lo, hi), else None."""
    ok = isinstance(v, int) and not isinstance(v, bool) and lo <= v < hi
    return v if ok else None


def read_bytes(path, what):
    """The bytes of a regular file (a FIFO or a device is refused before it is opened)."""
    try:
        with open_regular(path, what) as f:
            return f.read()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None


def parse_json(path, data):
    """The JSON document in data (the bytes of path): UTF-8, well-formed."""
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}); not a file mpigpt2 "
                        f"wrote") from None
    except RecursionError:
        raise UserError(f"{path}: not valid JSON (nested too deeply)") from None
    except ValueError as e:
        raise UserError(f"{path}: not valid JSON ({text(e)}; was the run interrupted?)") \
            from None


# ---------------------------------------------------------------------------------------------
# reading runs

def read_metrics(out_dir, notes=None):
    """(train step rows, validation rows) of OUT/metrics.jsonl, each row checked and reduced to
    the fields drawn. A torn last line is skipped with a note appended to notes."""
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.exists(path):
        raise UserError(f"{out_dir}: no metrics.jsonl; give a directory written by "
                        f"python -m mpigpt2.train --out-dir")
    data = read_bytes(path, "metrics file")
    lines = data.split(b"\n")
    torn = lines.pop()  # b"" when the file ends with a newline
    steps, vals = [], []
    for i, line in enumerate(lines, 1):
        row = parse_row(path, i, line)
        kind, rec = check_row(row, f"{path}:{i}")
        if kind == "step":
            steps.append(rec)
        elif kind == "val":
            vals.append(rec)
    if torn:
        i = len(lines) + 1
        try:
            row = json.loads(torn.decode("utf-8"))
        except (ValueError, RecursionError):  # (UnicodeDecodeError is a ValueError)
            if notes is not None:
                notes.append(f"note: {path}:{i}: skipped the torn last line ({len(torn)} bytes "
                             f"without a newline: the run was stopped while writing it)")
        else:
            kind, rec = check_row(row, f"{path}:{i}")
            if kind == "step":
                steps.append(rec)
            elif kind == "val":
                vals.append(rec)
    if not steps:
        raise UserError(f"{path} has no training steps yet")
    return steps, vals


def parse_row(path, i, line):
    where = f"{path}:{i}"
    try:
        line = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{where}: not UTF-8 text (byte {e.start} of the line); not a file "
                        f"mpigpt2 wrote") from None
    if not line.strip():
        raise UserError(f"{where}: an empty line; metrics.jsonl holds one JSON object per "
                        f"line")
    try:
        return json.loads(line)
    except RecursionError:
        raise UserError(f"{where}: not a JSON line (nested too deeply)") from None
    except ValueError:
        raise UserError(f"{where}: not a JSON line (a truncated or foreign file?)") from None


def check_row(row, where):
    """("step" | "val" | "summary", the row reduced to the fields drawn), or a UserError."""
    def bad(what):
        return UserError(f"{where}: {what}; not a metrics row mpigpt2.train writes")

    if not isinstance(row, dict):
        raise bad(f"a JSON {type(row).__name__}, not an object")
    if row.get("summary") is True and "loss" not in row and "val_loss" not in row:
        return "summary", None
    if "loss" not in row and "val_loss" not in row:
        raise bad("neither a step row (loss), a validation row (val_loss) nor the summary")
    step = integer(row.get("step"))
    if step is None:
        raise bad(f"step {show(row.get('step'))} is not an integer in [0, 2**53)")
    key = "loss" if "loss" in row else "val_loss"
    loss = math.nan if row[key] is None else real(row[key], finite=False)
    if loss is None:
        raise bad(f"{key} {show(row[key])} is not a number (of magnitude at most "
                  f"{MAX_VALUE:g}) or null")
    if key == "val_loss":
        return "val", {"step": step, "val_loss": loss}
    rec = {"step": step, "loss": loss}
    for name in ("tokens_per_s", "step_ms", "bubble", "bubble_predicted"):
        if name not in row:
            if name == "tokens_per_s":
                raise bad(f"a step row without {name}")
            continue
        if row[name] is None:  # a non-finite number, as mpigpt2.train writes it
            if name == "tokens_per_s":
                rec[name] = math.nan
            continue
        v = real(row[name], finite=False, lo=0.0)
        if v is None or v < 0:
            raise bad(f"{name} {show(row[name])} is not a non-negative number (at most "
                      f"{MAX_VALUE:g}) or null")
        if math.isfinite(v) or name == "tokens_per_s":
            rec[name] = v
    return "step", rec


def check_layout(lay, where, required):
    """A layout object (config.json's, or the trace's metadata) reduced to the fields shown."""
    if lay is None:
        return None
    if not isinstance(lay, dict):
        raise UserError(f"{where}: layout is {show(lay)}, not an object")
    out = {}
    for key in LAYOUT_INTS:
        if key not in lay and key not in required:
            continue
        v = integer(lay.get(key), lo=1, hi=1 << 31)
        if v is None:
            raise UserError(f"{where}: layout.{key} {show(lay.get(key))} is not a positive "
                            f"integer")
        out[key] = v
    if "stage_layers" in lay:
        sl = lay["stage_layers"]
        if not isinstance(sl, list) or len(sl) > 4096 or \
                any(integer(x, hi=1 << 31) is None for x in sl):
            raise UserError(f"{where}: layout.stage_layers {show(sl)} is not a list of layer "
                            f"counts")
        out["stage_layers"] = sl
    if "schedule" in lay:
        if not isinstance(lay["schedule"], str) or len(lay["schedule"]) > 40:
            raise UserError(f"{where}: layout.schedule {show(lay['schedule'])} is not a "
                            f"schedule name")
        out["schedule"] = text(lay["schedule"])
    return out


def read_config(out_dir):
    """{"layout": checked layout or None, "seq_len": int or None} of OUT/config.json (both
    None when there is no config.json)."""
    path = os.path.join(out_dir, "config.json")
    if not os.path.lexists(path):
        return {"layout": None, "seq_len": None}
    doc = parse_json(path, read_bytes(path, "run config"))
    if not isinstance(doc, dict):
        raise UserError(f"{path}: a JSON {type(doc).__name__}, not the run's config object")
    layout = check_layout(doc.get("layout"), path, LAYOUT_INTS)
    args = doc.get("args", {})
    if not isinstance(args, dict):
        raise UserError(f"{path}: args is {show(args)}, not an object")
    T = args.get("seq_len")
    if T is not None and integer(T, lo=1, hi=1 << 31) is None:
        raise UserError(f"{path}: args.seq_len {show(T)} is not a positive integer")
    return {"layout": layout, "seq_len": T}


def run_labels(dirs, configs):
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
    for name, config in zip(names, configs):
        name = text(name)
        lay = config["layout"]
        if lay:
            name += (f" (pp {lay['pp']} × dp {lay['dp']}, M={lay['microbatches']}, "
                     f"k={lay['slice_tokens']})")
        out.append(name)
    return out


def read_trace(path):
    """OUT/trace.json checked and reduced to what the timeline draws: {"events": the complete
    and instant events, "names": {rank: row name}, "layout": the metadata's layout or None}."""
    require_regular(path, "trace")
    doc = parse_json(path, read_bytes(path, "trace"))
    if not isinstance(doc, dict) or not isinstance(doc.get("traceEvents"), list):
        raise UserError(f"{path}: not a Chrome trace (an object with a traceEvents list)")
    meta = doc.get("metadata", {})
    if not isinstance(meta, dict):
        raise UserError(f"{path}: metadata is {show(meta)}, not an object")
    layout = check_layout(meta.get("layout"), f"{path}: metadata", ())
    events, named = [], {}
    for i, e in enumerate(doc["traceEvents"]):
        ev = check_event(e, f"{path}: traceEvents[{i}]")
        if ev is None or ev["pid"] != 0:  # (pid 1: the predicted timeline, drawn anew)
            continue
        if ev["ph"] == "M":
            named[ev["tid"]] = ev["name"]
        else:
            events.append(ev)
    pp = (layout or {}).get("pp")
    names = {}
    for tid, name in named.items():  # "rank 1 (stage 1, replica 0)" -> "rank 1 (stage 1)"
        names[tid] = name.split(",")[0] + ")" if "," in name else name
    for ev in events:
        if ev["tid"] not in names:
            names[ev["tid"]] = f"rank {ev['tid']}" + (f" (stage {ev['tid'] % pp})" if pp else "")
    if len(names) > MAX_RANKS:
        raise UserError(f"{path}: {len(names)} ranks traced; the timeline draws at most "
                        f"{MAX_RANKS}")
    return {"events": events, "names": names, "layout": layout}


def check_event(e, where):
    """A trace event reduced to its drawn fields; None for metadata events other than a row
    name. Phases other than X (complete), i (instant) and M (metadata) are refused."""
    def bad(what):
        return UserError(f"{where}: {what}; not a trace mpigpt2.train writes")

    if not isinstance(e, dict):
        raise bad(f"a JSON {type(e).__name__}, not an event object")
    ph, args = e.get("ph"), e.get("args", {})
    if ph not in ("X", "i", "M") or not isinstance(ph, str):
        raise bad(f"phase {show(ph)} is not X, i or M")
    if not isinstance(args, dict):
        raise bad(f"args is {show(args)}, not an object")
    tid, pid = integer(e.get("tid"), hi=1 << 31), integer(e.get("pid", 0), hi=1 << 31)
    if pid is None:
        raise bad(f"pid {show(e.get('pid'))} is not a non-negative integer")
    if ph == "M":
        if e.get("name") != "thread_name":
            return None
        if tid is None or not isinstance(args.get("name"), str):
            raise bad("a thread_name event needs an integer tid and a string args.name")
        return {"ph": "M", "tid": tid, "pid": pid, "name": text(args["name"])}
    if tid is None:
        raise bad(f"tid {show(e.get('tid'))} is not a rank (a non-negative integer)")
    ts = real(e.get("ts"))
    if ts is None:
        raise bad(f"ts {show(e.get('ts'))} is not a finite time in µs")
    dur = 0.0
    if ph == "X":
        dur = real(e.get("dur"), lo=0.0)
        if dur is None:
            raise bad(f"dur {show(e.get('dur'))} is not a finite non-negative duration")
    name, cat = e.get("name", ""), e.get("cat")
    if not isinstance(name, str) or not (cat is None or isinstance(cat, str)):
        raise bad("name and cat must be strings")
    step = None
    if "step" in args:
        step = integer(args["step"], lo=-1)
        if step is None:
            raise bad(f"args.step {show(args['step'])} is not an integer step")
    return {"ph": ph, "tid": tid, "pid": pid, "ts": ts, "dur": dur, "name": text(name),
            "cat": cat, "step": step}


# ---------------------------------------------------------------------------------------------
# loss and throughput

def png(fig):
    """The figure as PNG bytes (drawn in memory: nothing is written until every picture is)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def gaps(values):
    """A non-finite number (a diverged step) as NaN: matplotlib leaves a gap there."""
    return [v if math.isfinite(v) else math.nan for v in values]


def plot_curves(plt, runs, labels):
    """(loss.png bytes, throughput.png bytes)."""
    from matplotlib.ticker import MaxNLocator
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for i, ((steps, vals), name) in enumerate(zip(runs, labels)):
        c = f"C{i % 10}"
        lw = 1.3 + 1.5 * (len(runs) - 1 - i)  # runs with equal losses (any layout) stay visible
        ax.plot([s["step"] for s in steps], gaps(s["loss"] for s in steps), color=c, lw=lw,
                label=f"{name} train")
        if vals:
            ax.plot([v["step"] for v in vals], gaps(v["val_loss"] for v in vals), color=c,
                    ls="--", marker="o", ms=4 + 2.5 * (len(runs) - 1 - i), lw=1.0,
                    label=f"{name} val")
    ax.set(xlabel="step (updates done)", ylabel="loss (mean cross-entropy, nats)",
           title="training loss (lines) and validation loss (dashed, dots)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    loss = png(fig)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for i, ((steps, _), name) in enumerate(zip(runs, labels)):
        ax.plot([s["step"] for s in steps], gaps(s["tokens_per_s"] for s in steps),
                color=f"C{i % 10}", marker=".", lw=1.3, label=name)
    ax.set(xlabel="step", ylabel="tokens / s (all ranks)", title="throughput")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tput = png(fig)
    plt.close(fig)
    return loss, tput


# ---------------------------------------------------------------------------------------------
# pipeline timeline

def step_events(trace):
    """{step: {rank: [events]}} of a checked trace: a step's events on a rank end with its
    update (a validation pass after the last step carries that step's number too, and is left
    out)."""
    by = {}
    for e in trace["events"]:
        if e["step"] is not None:
            by.setdefault(e["step"], {}).setdefault(e["tid"], []).append(e)
    out = {}
    for step, ranks in by.items():
        kept = {}
        for rank, evs in ranks.items():
            evs.sort(key=lambda e: e["ts"])
            ends = [i for i, e in enumerate(evs) if e["cat"] == "update"]
            if ends:
                kept[rank] = evs[:ends[0] + 1]
        if kept:
            out[step] = kept
    return out


def full_steps(steps, nranks):
    return sorted(s for s, r in steps.items() if len(r) == nranks)


def choose_step(trace, step=None):
    """The step to draw: step (checked: every rank traced it whole), by default the last
    step every rank traced."""
    complete = full_steps(step_events(trace), len(trace["names"]))
    if not complete:
        raise UserError("trace.json has no step traced on every rank (did the run finish?)")
    if step is None:
        return complete[-1]
    if step not in complete:
        raise UserError(f"--step {step}: not fully traced; traced steps are "
                        f"{complete[0]}..{complete[-1]}")
    return step


def plot_timeline(plt, trace, step, metrics=None, config=None):
    """One step (fully traced, see choose_step) of a checked trace, as PNG bytes: the measured
    timeline, and under it the schedule simulated with the measured compute durations
    (observe/predict.py), on one time axis."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    names = trace["names"]
    ranks = sorted(names)
    evs = step_events(trace)[step]
    predicted = predicted_step(trace, evs)
    t0 = min(e["ts"] for r in evs.values() for e in r)
    t1 = max(e["ts"] + e["dur"] for r in evs.values() for e in r)
    if predicted is not None:
        t1 = max([t1] + [t + d for xs in predicted[0].values() for _, t, d in xs])
    span_ms = max((t1 - t0) / 1e3, 1e-3)  # a step of instants only still gets an axis
    panels = 2 if predicted is not None else 1
    fig, axes = plt.subplots(panels, 1, figsize=(12, 1.9 + 0.55 * panels * len(ranks)),
                             dpi=100, layout="constrained", sharex=True, squeeze=False)
    axes = [a for row in axes for a in row]
    fig.canvas.draw()
    px_per_ms = axes[0].get_window_extent().width / span_ms
    draw_ranks(axes[0], ranks, {r: evs.get(r, []) for r in ranks}, t0, px_per_ms)
    if predicted is not None:
        pred = {r: [{"ph": "X", "cat": "forward" if "F" in name else "backward", "name": name,
                     "ts": t, "dur": d} for name, t, d in predicted[0].get(r, [])]
                for r in ranks}
        draw_ranks(axes[1], ranks, pred, t0, px_per_ms)
        axes[1].set_title(predicted_title(predicted[1]), fontsize=9)
    for ax in axes:
        ax.set_yticks(range(len(ranks)), [names[r] for r in ranks])
        ax.set_ylim(len(ranks) - 0.5, -0.5)  # rank 0 on top
        ax.set_xlim(0, span_ms * 1.005)
        ax.grid(axis="x", alpha=0.3)
        ax.set_axisbelow(True)
    axes[-1].set_xlabel(f"ms since the start of step {step}")
    axes[0].set_title(timeline_title(trace, step, metrics, config, span_ms), fontsize=10)
    handles = [Patch(color=COLOURS[c], label=LABELS[c]) for c in COLOURS]
    handles.insert(3, Line2D([], [], color=SEND_COLOUR, lw=1.2, label="send (start)"))
    fig.legend(handles=handles, loc="outside lower center", ncol=6, fontsize=8,
               frameon=False)
    data = png(fig)
    plt.close(fig)
    return data


def draw_ranks(ax, ranks, evs, t0, px_per_ms):
    """One row of bars per rank (compute labelled where they fit), send ticks on top."""
    for row, rank in enumerate(ranks):
        bars = {}
        for e in evs.get(rank, []):
            cat = CATEGORY.get(e["cat"])
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


def predicted_step(trace, evs):
    """observe.predict.predict_step on a step's measured compute spans, or None when they do
    not form a schedule (a trace of another program)."""
    from mpigpt2.observe.predict import predict_step, COMPUTE_CATS
    pp = (trace["layout"] or {}).get("pp") or len(evs)
    spans = {r: [(e["name"], e["ts"], e["dur"]) for e in xs
                 if e["ph"] == "X" and e["cat"] in COMPUTE_CATS] for r, xs in evs.items()}
    return predict_step(spans, {r: (r % pp, r // pp) for r in evs})


def predicted_title(spans):
    """Measured vs predicted span of the pipelined part (the slowest replica)."""
    measured, predicted = max(spans.values())
    return (f"predicted: the schedule simulated with these measured compute durations (no "
            f"message latency): pipeline {predicted / 1e3:.1f} ms vs {measured / 1e3:.1f} ms "
            f"measured ({100 * (predicted / measured - 1):+.0f} %)")


def timeline_title(trace, step, metrics, config, span_ms):
    config = config or {"layout": None, "seq_len": None}
    lay = trace["layout"] or config["layout"] or {}
    T = config["seq_len"]
    parts = []
    if lay:
        k, lengths = lay.get("slice_tokens"), lay.get("slice_lengths")
        if isinstance(lengths, list) and lengths:  # non-uniform slices
            k, n = ",".join(map(str, lengths)), f" (n={len(lengths)})"
        else:
            n = f" (n={T // k})" if T and k else ""
        parts.append(f"pp {lay.get('pp')} × dp {lay.get('dp')}, stages "
                     f"{lay.get('stage_layers')}, M={lay.get('microbatches')}, k={k}{n}, "
                     f"{lay.get('schedule')}")
    rec = next((m for m in metrics or [] if m["step"] == step), None)
    ms = rec.get("step_ms", span_ms) if rec else span_ms
    line = f"step {step}: {ms:.0f} ms"
    if rec and "bubble" in rec:
        line += (f", bubble {rec['bubble']:.2f} measured "
                 f"({rec.get('bubble_predicted', float('nan')):.2f} predicted)")
    return "\n".join(parts + [line])


# ---------------------------------------------------------------------------------------------

def output_dir(out, names):
    """The directory the pictures go to, checked (not created) before anything is drawn."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out} exists and is not a directory")
    for name in names:
        p = os.path.join(out, name)
        if os.path.isdir(p):
            raise UserError(f"{p} is a directory; cannot write the picture there")
    return out


def write_all(out, pictures):
    """Write the drawn pictures, each atomically (a reader never sees a half-written PNG)."""
    from mpigpt2.formats.atomic import atomic_write
    written = []
    try:
        os.makedirs(out, exist_ok=True)
        for name, data in pictures:
            path = os.path.join(out, name)
            atomic_write(path, lambda f, data=data: f.write(data))
            written.append(path)
    except OSError as e:
        raise UserError(f"cannot write the pictures into {out}: {e.strerror or e}") from None
    return written


def main(argv=None):
    args = parse_args(argv)
    notes = []
    runs = [read_metrics(d, notes) for d in args.dirs]  # every input checked before drawing
    configs = [read_config(d) for d in args.dirs]
    trace_path = os.path.join(args.dirs[0], "trace.json")
    trace = step = None
    if os.path.lexists(trace_path):
        trace = read_trace(trace_path)
        step = choose_step(trace, args.step)
    elif args.step is not None:
        raise UserError(f"--step: {args.dirs[0]} has no trace.json (train with --trace)")
    out = output_dir(args.out or args.dirs[0], ["loss.png", "throughput.png"] +
                     (["timeline.png"] if trace else []))
    plt = pyplot()
    loss, tput = plot_curves(plt, runs, run_labels(args.dirs, configs))
    pictures = [("loss.png", loss), ("throughput.png", tput)]
    if trace is not None:
        pictures.append(("timeline.png", plot_timeline(plt, trace, step, runs[0][0],
                                                       configs[0])))
    paths = write_all(out, pictures)
    for note in notes:
        print(note)
    if trace is not None:
        print(f"timeline of step {step} from {trace_path}")
    else:
        print(f"no timeline: {trace_path} is missing (train with --trace to get one)")
    for p in paths:
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    from mpigpt2.base.errors import run_cli
    sys.exit(run_cli(main))
