"""Row 6: parameter bytes held per pipeline stage for pp = 1, 2, 4 (construction only, no MPI).

    python bench/param_memory.py [--model gpt2-124m] [--T 1024] [--pps 1,2,4]

Each stage of the default (compute-balanced) partition is built as mpigpt2.stage.Stage and its
flat parameter buffer measured; gradients and the two Adam moments have the same size, so a
rank's training state is 4× that.
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gpt2-124m", help="mpigpt2 preset")
    ap.add_argument("--T", type=int, default=1024, help="sequence length the partition balances for")
    ap.add_argument("--pps", default="1,2,4", help="pipeline sizes")
    args = ap.parse_args()
    from mpigpt2 import layout as lay
    from mpigpt2.config import PRESETS
    from mpigpt2.params import full_spec
    from mpigpt2.stage import Stage
    cfg = PRESETS[args.model]
    full = Stage(cfg, full_spec(cfg), np.float32)
    full_bytes = int(full.flat.nbytes)
    wte_bytes = int(full.p["wte"].nbytes)
    del full
    for pp in (int(p) for p in args.pps.split(",")):
        layout = lay.resolve(pp, cfg, pp, args.T, pp, 1, None, 1, args.T, None)
        stages = []
        for s in range(pp):
            st = Stage(cfg, layout.spec(s), np.float32)
            stages.append({"stage": s, "layers": st.nl, "tensors": list(st.p),
                           "param_bytes": int(st.flat.nbytes),
                           "ratio": st.flat.nbytes / full_bytes})
            del st
        emit({"kind": "param_memory", "model": args.model, "pp": pp, "T": args.T,
              "stage_layers": list(layout.stage_layers), "full_bytes": full_bytes,
              "wte_bytes": wte_bytes, "stages": stages,
              "max_ratio": max(s["ratio"] for s in stages),
              "sum_ratio": sum(s["ratio"] for s in stages)})


if __name__ == "__main__":
    main()
