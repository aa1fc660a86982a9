"""The issue-2/3 bar as a test: `python -m mpigpt2.train --model model.bin --train-data
tokens.bin --batch-size 4 --seq-len 64 --steps 10 --lr 1e-4` on an llm.c model file and token
shard written here byte by byte (not with mpigpt2's writers), under one process and under
mpiexec with several layouts; the 10 losses must match an independent PyTorch float64 run
(autograd + torch.optim.AdamW, reading the same files with numpy) within 1e-4."""

import json
import sys

import numpy as np
import pytest
import torch

from helpers import run, mpiexec
from torch_ref import to_torch, gpt2_loss
from mpigpt2.model.config import GPTConfig
from mpigpt2.model.params import PARAM_NAMES

PY = sys.executable
L, NH, C, V, VP, MAXT = 4, 4, 64, 500, 512, 64
B, T, STEPS, LR = 4, 64, 10, 1e-4
BAR = 1e-4  # the tolerance against llm.c's losses


def shapes():
    return {"wte": (VP, C), "wpe": (MAXT, C), "ln1w": (L, C), "ln1b": (L, C),
            "qkvw": (L, 3 * C, C), "qkvb": (L, 3 * C), "attprojw": (L, C, C),
            "attprojb": (L, C), "ln2w": (L, C), "ln2b": (L, C), "fcw": (L, 4 * C, C),
            "fcb": (L, 4 * C), "fcprojw": (L, C, 4 * C), "fcprojb": (L, C), "lnfw": (C,),
            "lnfb": (C,)}


@pytest.fixture(scope="module")
def files(tmp_path_factory, shards):
    d = tmp_path_factory.mktemp("llmc")
    rng = np.random.default_rng(11)
    header = np.zeros(256, "<i4")
    header[:8] = [20240326, 3, MAXT, V, L, NH, C, VP]
    params = {}
    for n, s in shapes().items():
        centre = 1.0 if n in ("ln1w", "ln2w", "lnfw") else 0.0
        params[n] = (centre + 0.05 * rng.standard_normal(s)).astype("<f4")
    params["wte"][V:] = 0.0  # llm.c's padded rows
    with open(d / "model.bin", "wb") as f:
        f.write(header.tobytes())
        for n in PARAM_NAMES:  # llm.c's tensor order
            f.write(params[n].tobytes())
    toks = np.fromfile(shards[0], dtype="<u2", offset=1024)[:6000] % V
    th = np.zeros(256, "<i4")
    th[:3] = [20240520, 1, len(toks)]
    (d / "tokens.bin").write_bytes(th.tobytes() + toks.astype("<u2").tobytes())
    return d, params, toks


def oracle_losses(params, toks):
    cfg = GPTConfig(max_seq_len=MAXT, vocab_size=V, padded_vocab_size=VP, num_layers=L,
                    num_heads=NH, channels=C)
    t = to_torch(params)
    opt = torch.optim.AdamW(list(t.values()), lr=LR, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=0.0)
    out = []
    for step in range(STEPS):  # windows of B*T+1 tokens in order, advancing B*T
        w = toks[step * B * T: step * B * T + B * T + 1].astype(np.int64)
        loss = gpt2_loss(t, w[:-1].reshape(B, T), w[1:].reshape(B, T), cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
        out.append(loss.item())
    return out


LAYOUTS = [
    (1, []),
    (4, ["--pp", "2", "--dp", "2", "--microbatches", "2", "--slice-tokens", "16",
         "--schedule", "1f1b"]),
    (3, ["--pp", "3", "--stage-layers", "2,1,1", "--microbatches", "4", "--slice-tokens", "8",
         "--schedule", "1f1b"]),
    (4, ["--dp", "2", "--pp", "2", "--stage-layers", "3,1", "--microbatches", "1",
         "--slice-tokens", "1", "--schedule", "gpipe", "--zero", "1"]),
    (4, ["--dp", "4", "--zero", "1"]),
    # the frontier schedules (issue 13), each with token slices
    (4, ["--pp", "2", "--dp", "2", "--microbatches", "2", "--slice-tokens", "16",
         "--schedule", "zb-h1"]),
    (2, ["--pp", "2", "--virtual-stages", "2", "--microbatches", "2", "--slice-tokens", "16",
         "--schedule", "interleaved-1f1b"]),
    (4, ["--pp", "2", "--dp", "2", "--microbatches", "1", "--slice-tokens", "8",
         "--schedule", "zb-v", "--zero", "1"]),
    (4, ["--pp", "4", "--microbatches", "2", "--slice-tokens", "16", "--schedule", "1f1b"]),
    (2, ["--pp", "2", "--virtual-stages", "2", "--microbatches", "4", "--slice-tokens",
         "24,16,12,12", "--schedule", "looped-bfs"]),
    (2, ["--pp", "2", "--microbatches", "1", "--slice-tokens", "40,24", "--schedule",
         "zb-h1"]),
]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("n,layout", LAYOUTS, ids=[f"n{n}-" + "-".join(x.strip("-") for x in l)
                                                    for n, l in LAYOUTS])
def test_losses_match_an_independent_reference(tmp_path, files, n, layout):
    d, params, toks = files
    out = tmp_path / "OUT"
    cmd = [PY, "-m", "mpigpt2.train", "--model", str(d / "model.bin"), "--train-data",
           str(d / "tokens.bin"), "--batch-size", str(B), "--seq-len", str(T), "--steps",
           str(STEPS), "--lr", str(LR), "--out-dir", str(out), *layout]
    r = run((mpiexec(n) if n > 1 else []) + cmd, timeout=240)
    assert r.returncode == 0, r.stderr
    got = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()
           if '"loss"' in x]
    want = oracle_losses(params, toks)
    assert len(got) == STEPS
    assert max(abs(a - b) for a, b in zip(got, want)) < BAR, (got, want)
