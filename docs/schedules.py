"""Draw the README's schedule pictures: every schedule of `--schedule`, simulated with the
per-action costs measured in bench/ row 10 (per layer: F 1.2, I 1.0, W 0.8, B = I + W), on one
time axis so the pictures compare.

    .venv/bin/python docs/schedules.py [--pp 2] [--microbatches 1] [--slices 4] [--out docs/img]
"""

import argparse
import os

from mpigpt2.formats.atomic import atomic_write
from mpigpt2.parallel import costs, schedule as S
from mpigpt2.report import COLOURS, png, pyplot

# the report's forward and backward colours; W (the deferred weight gradients) a paler green
KIND_COLOUR = {"F": COLOURS["forward"], "B": COLOURS["backward"], "I": COLOURS["backward"],
               "W": "#a8d8a0"}

KIND_COST = {"F": 1.2, "I": 1.0, "W": 0.8, "B": 1.8}  # one stage's layers, one slice
SCHEDULES = [("gpipe", 1), ("1f1b", 1), ("zb-h1", 1), ("interleaved-1f1b", 2),
             ("looped-bfs", 2), ("zb-h1", 2), ("zb-v", 2)]


def simulated(name, p, M, n, v):
    """(timeline, end, bubble) of a schedule with KIND_COST split over its v chunks."""
    placement = S.v_placement(p) if name == "zb-v" else S.loop_placement(p, v)
    progs = S.build(name, p, M, n, placement)
    seconds = {a: KIND_COST[a.kind] / v for prog in progs for a in prog if a.kind in S.COMPUTE}
    return costs.measured_pipeline(progs, seconds) + (seconds,)


def draw(plt, name, v, p, M, n, span):
    timeline, end, bubble, seconds = simulated(name, p, M, n, v)
    fig, ax = plt.subplots(figsize=(11, 0.9 + 0.42 * p), dpi=100, layout="constrained")
    fig.canvas.draw()
    px_per_unit = ax.get_window_extent().width / span
    for r, tl in enumerate(timeline):
        for t, a in tl:
            w = seconds[a]
            ax.broken_barh([(t, w)], (r - 0.35, 0.7), facecolors=KIND_COLOUR[a.kind],
                           edgecolors="white", linewidth=0.4)
            if w * px_per_unit > 4.2 * len(str(a)) + 2:
                ax.text(t + w / 2, r, str(a), ha="center", va="center", fontsize=6,
                        color="black" if a.kind == "W" else "white", clip_on=True)
    ax.set_yticks(range(p), [f"rank {r}" for r in range(p)])
    ax.set_ylim(p - 0.5, -0.5)
    ax.set_xlim(0, span)
    ax.set_xlabel("time (one F of a whole stage's layers on one slice = 1.2)")
    label = name + (f", v = {v}" if v > 1 else "")
    ax.set_title(f"{label}: pp {p}, M = {M}, n = {n}: step {end:.1f}, bubble {bubble:.3f} "
                 f"(blue F, green B or I, pale green W)", fontsize=9)
    data = png(fig)
    plt.close(fig)
    return data


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pp", type=int, default=2)
    ap.add_argument("--microbatches", type=int, default=1)
    ap.add_argument("--slices", type=int, default=4)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "img"))
    a = ap.parse_args()
    plt = pyplot()
    span = max(simulated(name, a.pp, a.microbatches, a.slices, v)[1] for name, v in SCHEDULES)
    os.makedirs(a.out, exist_ok=True)
    for name, v in SCHEDULES:
        path = os.path.join(a.out, f"schedule-{name}{'-v' + str(v) if v > 1 else ''}.png")
        data = draw(plt, name, v, a.pp, a.microbatches, a.slices, span * 1.01)
        atomic_write(path, lambda f, d=data: f.write(d))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
