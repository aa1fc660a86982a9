"""Forward/backward pairs of GPT-2's layers in numpy, as llm.c's CPU reference defines them.

Activations are 2-D (rows, C) with rows = b*S in (sequence, token) order; S is the number of
tokens of the current slice and P the length of the cached key/value prefix before it.
Backward functions accumulate (+=) into parameter gradients and return input gradients;
with acc=False they assign instead (the first write of a step, docs/design.md#first-writes).
(docs/design.md#token-slices)
"""

import math

import numpy as np

from mpigpt2.model import kernels

LN_EPS = 1e-5
GELU_SCALE = math.sqrt(2.0 / math.pi)
GELU_CUBE = 0.044715


# ---------------------------------------------------------------------------------------------
# token + position embedding

def encoder_forward(wte, wpe, tokens, pos0):
    """tokens (b, S) ints at positions pos0..pos0+S-1 -> x (b*S, C)."""
    b, S = tokens.shape
    C = wte.shape[1]
    x = wte[tokens.reshape(-1)]  # (b*S, C)
    x.reshape(b, S, C)[...] += wpe[pos0:pos0 + S]
    return x


def encoder_backward(dwte, dwpe, dx, tokens, pos0):
    """Scatter-add dx (b*S, C) into the rows of dwte used and into dwpe[pos0:pos0+S]."""
    b, S = tokens.shape
    C = dx.shape[1]
    np.add.at(dwte, tokens.reshape(-1), dx)
    dwpe[pos0:pos0 + S] += dx.reshape(b, S, C).sum(axis=0)


# ---------------------------------------------------------------------------------------------
# LayerNorm (biased variance, eps inside the sqrt, as llm.c)

def layernorm_forward(x, w, b):
    """x (N, C) -> out (N, C), norm (N, C) = (x-mean)*rstd, rstd (N, 1)."""
    N, C = x.shape
    dt = x.dtype.type
    out, norm = np.empty_like(x), np.empty_like(x)  # (N, C) each
    rstd = np.empty((N, 1), dtype=x.dtype)  # (N, 1)
    kernels.compiled()["layernorm"](x, w, b, out, norm, rstd, _ones(C, x.dtype), dt(LN_EPS),
                                    dt(1.0), np.empty(16, x.dtype))
    return out, norm, rstd


def layernorm_backward(dout, norm, rstd, w, dw, db):
    """Return dx (N, C); accumulate dw, db (C,)."""
    layernorm_backward_weight(dout, norm, dw, db)
    return layernorm_backward_input(dout, norm, rstd, w)


def layernorm_backward_weight(dout, norm, dw, db, acc=True):
    """The weight part (W) of LayerNorm's backward: accumulate (acc) or assign dw, db (C,)."""
    if acc:
        db += dout.sum(axis=0)
        dw += np.einsum("nc,nc->c", dout, norm)
    else:
        np.sum(dout, axis=0, out=db)
        np.einsum("nc,nc->c", dout, norm, out=dw)


def layernorm_backward_input(dout, norm, rstd, w, residual=None):
    """The input part (I) of LayerNorm's backward: dx (N, C), plus residual (N, C) if given
    (the gradient that reaches the same tensor through the skip connection)."""
    N, C = dout.shape
    dx = np.empty_like(dout)  # (N, C)
    add = residual is not None
    kernels.compiled()["layernorm_grad"](dout, norm, rstd, w, dx, residual if add else dx, add,
                                         _ones(C, dout.dtype), dout.dtype.type(1.0),
                                         np.empty(16, dout.dtype), np.empty(C, dout.dtype))
    return dx


_ONES = {}


def _ones(C, dtype):
    """A cached row of C ones (the kernels' plain sums are dot products with it)."""
    key = (C, np.dtype(dtype).str)
    if key not in _ONES:
        _ONES[key] = np.ones(C, dtype=dtype)
    return _ONES[key]


# ---------------------------------------------------------------------------------------------
# linear layer, weights stored (out, in) as in llm.c

def matmul_forward(x, w, bias):
    """x (N, IN) @ w.T (IN, OUT) + bias -> (N, OUT)."""
    out = x @ w.T  # (N, OUT)
    if bias is not None:
        out += bias
    return out


def matmul_backward(dout, x, w, dw, dbias):
    """Return dx (N, IN); accumulate dw (OUT, IN) and dbias (OUT,)."""
    matmul_backward_weight(dout, x, dw, dbias)
    return matmul_backward_input(dout, w)


ACC_BLOCK = 1 << 22  # elements of an accumulated weight gradient's product per block (16 MiB)


def matmul_backward_weight(dout, x, dw, dbias, acc=True):
    """The weight part (W): dw (OUT, IN) += dout.T @ x and dbias (OUT,) += column sums of
    dout; acc=False assigns them instead (BLAS writes dw directly: no temporary, no add)."""
    if acc:  # the product in row blocks of ≤ ACC_BLOCK elements: a small temporary, in cache
        rows = max(1, ACC_BLOCK // dw.shape[1])
        for r0 in range(0, dw.shape[0], rows):
            dw[r0:r0 + rows] += dout[:, r0:r0 + rows].T @ x  # (rows, IN)
        if dbias is not None:
            dbias += dout.sum(axis=0)
        return
    np.matmul(dout.T, x, out=dw)
    if dbias is not None:
        np.sum(dout, axis=0, out=dbias)


def matmul_backward_input(dout, w):
    """The input part (I): dx (N, IN) = dout (N, OUT) @ w (OUT, IN)."""
    return dout @ w  # (N, IN)


# ---------------------------------------------------------------------------------------------
# GELU, tanh approximation

def gelu_forward(x):
    """x (N, H) -> gelu(x) (N, H), th (N, H) = tanh(sqrt(2/pi) (x + 0.044715 x^3)).

    th is what backward needs (it saves recomputing the tanh); gelu(x) = 0.5 x (1 + th).
    """
    k, dt = kernels.compiled(), x.dtype.type
    th = np.empty_like(x)  # (N, H)
    k["gelu_tanh_arg"](x.reshape(-1), th.reshape(-1), dt(GELU_CUBE), dt(GELU_SCALE), dt(1.0))
    np.tanh(th, out=th)
    return gelu_recompute(x, th), th


def gelu_recompute(x, th):
    """gelu(x) (N, H) from the saved tanh, for the weight gradient of the next matmul."""
    dt = x.dtype.type
    out = np.empty_like(x)  # (N, H)
    kernels.compiled()["gelu_from_tanh"](x.reshape(-1), th.reshape(-1), out.reshape(-1),
                                         dt(1.0), dt(0.5))
    return out


def gelu_backward(dout, x, th):
    """Return dx (N, H) = dout * gelu'(x), with th from gelu_forward.

    d/dx 0.5 x (1 + th) = 0.5 (1 + th) + 0.5 x (1 - th^2) sqrt(2/pi) (1 + 3·0.044715 x^2)
    """
    dt = x.dtype.type
    dx = np.empty_like(x)  # (N, H)
    kernels.compiled()["gelu_grad"](dout.reshape(-1), x.reshape(-1), th.reshape(-1),
                                    dx.reshape(-1), dt(3.0 * GELU_CUBE * GELU_SCALE),
                                    dt(GELU_SCALE), dt(1.0), dt(0.5))
    return dx


# ---------------------------------------------------------------------------------------------
# causal self-attention over a slice with a cached key/value prefix

# queries per block: a block of rows [r0, r1) needs only the keys [0, P+r1) (causal), so
# blocking skips most of the masked upper triangle (docs/design.md#blocked-causal-attention)
ATT_BLOCK = 64


def query_blocks(S, block):
    """Row ranges [r0, r1) of a slice of S queries, block rows each (the last may be short)."""
    return [(r0, min(S, r0 + block)) for r0 in range(0, S, block)]


def attention_forward(qkv, kcache, vcache, b, NH, P, block=ATT_BLOCK):
    """One slice of S tokens whose keys/values are appended to the cache at [P, P+S).

    qkv (b*S, 3C); kcache, vcache (b, NH, T, hs) hold positions [0, P) already.
    Returns out (b*S, C), q (b, NH, S, hs), att (b, NH, S, P+S) (zero where masked).
    """
    C = qkv.shape[1] // 3
    S = qkv.shape[0] // b
    hs = C // NH
    k, dt = kernels.compiled(), qkv.dtype.type
    qkv4 = qkv.reshape(b, S, 3, NH, hs)
    q = np.ascontiguousarray(qkv4[:, :, 0].transpose(0, 2, 1, 3))  # (b, NH, S, hs)
    kcache[:, :, P:P + S] = qkv4[:, :, 1].transpose(0, 2, 1, 3)
    vcache[:, :, P:P + S] = qkv4[:, :, 2].transpose(0, 2, 1, 3)
    att = np.empty((b, NH, S, P + S), dtype=qkv.dtype)  # (b, NH, S, P+S)
    out = np.empty((b, S, NH, hs), dtype=qkv.dtype)  # (b, S, NH, hs) = (b*S, C)
    y = out.transpose(0, 2, 1, 3)  # (b, NH, S, hs) view: each (S, hs) matrix BLAS-writable
    ones, acc = _ones(P + S, qkv.dtype), np.empty(16, qkv.dtype)
    for i in range(b):  # one sequence's block of scores stays in cache through the softmax
        for r0, r1 in query_blocks(S, block):
            n = P + r1  # keys the block's rows may see
            a = att[i, :, r0:r1, :n]  # (NH, R, n)
            np.matmul(q[i, :, r0:r1], kcache[i, :, :n].transpose(0, 2, 1), out=a)
            k["scores_shift"](att, i, r0, r1, n, dt(1.0 / math.sqrt(hs)), acc)
            np.exp(a, out=a)
            k["scores_normalize"](att, i, r0, r1, n, ones, dt(1.0), acc)
            np.matmul(a, vcache[i, :, :n], out=y[i, :, r0:r1])  # (NH, R, hs)
    return out.reshape(b * S, C), q, att


def attention_backward(dout, q, att, kcache, vcache, dkacc, dvacc, P, block=ATT_BLOCK):
    """Backward of one slice; slices must run in reverse order over the same accumulators.

    dout (b*S, C); dkacc, dvacc (b, NH, T, hs) collect every later slice's contribution, so
    after this call positions [P, P+S) are final. Returns dqkv (b*S, 3C).
    """
    b, NH, S, hs = q.shape
    C = NH * hs
    k, dt = kernels.compiled(), q.dtype.type
    acc = np.empty(16, q.dtype)
    dy = np.ascontiguousarray(dout.reshape(b, S, NH, hs).transpose(0, 2, 1, 3))  # (b, NH, S, hs)
    dqkv = np.empty((b, S, 3, NH, hs), dtype=dout.dtype)  # (b, S, 3, NH, hs)
    dq = dqkv[:, :, 0].transpose(0, 2, 1, 3)  # (b, NH, S, hs) view, BLAS-writable
    for i in range(b):
        for r0, r1 in query_blocks(S, block):
            n = P + r1
            a = att[i, :, r0:r1, :n]  # (NH, R, n)
            dyb = dy[i, :, r0:r1]  # (NH, R, hs)
            datt = dyb @ vcache[i, :, :n].transpose(0, 2, 1)  # (NH, R, n)
            dvacc[i, :, :n] += a.transpose(0, 2, 1) @ dyb
            # softmax backward: dpre = att * (datt - sum(att * datt)), scaled
            k["scores_grad"](datt, att, i, r0, r1, n, dt(1.0 / math.sqrt(hs)), acc)
            np.matmul(datt, kcache[i, :, :n], out=dq[i, :, r0:r1])  # (NH, R, hs)
            dkacc[i, :, :n] += datt.transpose(0, 2, 1) @ q[i, :, r0:r1]
    dqkv[:, :, 1] = dkacc[:, :, P:P + S].transpose(0, 2, 1, 3)
    dqkv[:, :, 2] = dvacc[:, :, P:P + S].transpose(0, 2, 1, 3)
    return dqkv.reshape(b * S, 3 * C)


# ---------------------------------------------------------------------------------------------
# logits softmax + cross-entropy, fused with its backward

CE_ROWS = 8  # logits rows per block of the loss: 8 x 50304 floats stay in L2 through the passes


def crossentropy_forward_backward(logits, targets, V, dloss):
    """Turn logits (N, Vp) into dlogits in place; return the per-token losses (N,) in float64.

    Only the first V columns enter the softmax; padded columns get zero gradient.
    dloss is d(total loss)/d(token loss), 1/(B*T) for llm.c's mean loss. Rows are
    independent: done CE_ROWS at a time, each block's passes run in cache.
    """
    N = logits.shape[0]
    return np.concatenate([_crossentropy_rows(logits[r0:r0 + CE_ROWS], targets[r0:r0 + CE_ROWS],
                                              V, dloss) for r0 in range(0, N, CE_ROWS)])


def _crossentropy_rows(logits, targets, V, dloss):
    """crossentropy_forward_backward of a block of rows (n, Vp)."""
    N = logits.shape[0]
    lv = logits[:, :V]  # (N, V) view
    lv -= lv.max(axis=1, keepdims=True)
    rows = np.arange(N)
    target_logit = lv[rows, targets].astype(np.float64)  # (N,)
    np.exp(lv, out=lv)
    sums = lv.sum(axis=1, keepdims=True, dtype=np.float64)  # (N, 1)
    losses = np.log(sums[:, 0]) - target_logit  # (N,)
    lv *= (dloss / sums).astype(logits.dtype)
    lv[rows, targets] -= logits.dtype.type(dloss)
    logits[:, V:] = 0.0
    return losses


def softmax_logits(logits, V):
    """Probabilities over the first V columns of logits (N, Vp), for sampling."""
    lv = logits[:, :V].astype(np.float64)  # (N, V)
    lv -= lv.max(axis=1, keepdims=True)
    np.exp(lv, out=lv)
    lv /= lv.sum(axis=1, keepdims=True)
    return lv
