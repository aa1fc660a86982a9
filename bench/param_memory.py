"""Row 6: parameter bytes held per pipeline stage for pp = 1, 2, 4 (construction only, no MPI).

    python bench/param_memory.py [--models gpt2-124m,gpt2-1558m] [--T 1024] [--pps 1,2,4]

For each stage of the default (compute-balanced) partition the stage's flat parameter buffer is
sized by mpigpt2.model.params.ParamLayout — what mpigpt2.model.stage.Stage allocates (checked against a real
Stage for the first model) — and split into the transformer blocks and the rest (wte, wpe, lnf).
Gradients and the two Adam moments have the same size, so a rank's training state is 4× that.
"""

import argparse
import os
import sys

import mpigpt2  # noqa: F401 - first: numpy's BLAS kernels as the trainer picks them
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="gpt2-124m,gpt2-1558m", help="mpigpt2 presets")
    ap.add_argument("--T", type=int, default=1024, help="sequence length the partition balances for")
    ap.add_argument("--pps", default="1,2,4", help="pipeline sizes")
    args = ap.parse_args()
    from mpigpt2.parallel import layout as lay
    from mpigpt2.model.config import PRESETS
    from mpigpt2.model.params import ParamLayout, LAYER_NAMES, full_spec
    from mpigpt2.model.stage import Stage
    for mi, name in enumerate(args.models.split(",")):
        cfg = PRESETS[name]
        itemsize = np.dtype(np.float32).itemsize
        full = ParamLayout(cfg, full_spec(cfg))
        full_bytes = full.size * itemsize
        wte_bytes = int(np.prod(full.shapes["wte"])) * itemsize
        layer_total = sum(int(np.prod(full.shapes[n])) for n in LAYER_NAMES) * itemsize
        for pp in (int(p) for p in args.pps.split(",")):
            layout = lay.resolve(pp, cfg, pp, args.T, pp, 1, None, 1, args.T, None)
            stages = []
            for s in range(pp):
                pl = ParamLayout(cfg, layout.spec(s))
                if mi == 0:  # the layout is what a Stage really allocates
                    st = Stage(cfg, layout.spec(s), np.float32)
                    assert st.flat.nbytes == pl.size * itemsize
                    del st
                layers = sum(int(np.prod(pl.shapes[n])) for n in LAYER_NAMES) * itemsize
                stages.append({"stage": s, "layers": layout.stage_layers[s],
                               "tensors": list(pl.shapes), "param_bytes": pl.size * itemsize,
                               "ratio": pl.size * itemsize / full_bytes,
                               "layer_ratio": layers / layer_total})
            emit({"kind": "param_memory", "model": name, "pp": pp, "T": args.T,
                  "stage_layers": list(layout.stage_layers), "full_bytes": full_bytes,
                  "wte_bytes": wte_bytes, "stages": stages,
                  "max_ratio": max(s["ratio"] for s in stages),
                  "sum_ratio": sum(s["ratio"] for s in stages),
                  "max_layer_ratio": max(s["layer_ratio"] for s in stages),
                  # with wte on both ends, no partition can go below (1 + wte share) / pp
                  "lower_bound": (1 + (wte_bytes / full_bytes if pp > 1 else 0)) / pp})


if __name__ == "__main__":
    main()
