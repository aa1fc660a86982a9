"""Forward/backward pairs of GPT-2's layers in numpy, as llm.c's CPU reference defines them.

Activations are 2-D (rows, C) with rows = b*S in (sequence, token) order; S is the number of
tokens of the current slice and P the length of the cached key/value prefix before it.
Backward functions accumulate (+=) into parameter gradients and return input gradients;
with acc=False they assign instead (the first write of a step, docs/design.md#first-writes).
(docs/design.md#token-slices)
"""

import math

import numpy as np

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
    mean = x.mean(axis=1, keepdims=True)  # (N, 1)
    xc = x - mean  # (N, C)
    var = np.einsum("nc,nc->n", xc, xc)[:, None] / x.shape[1]  # (N, 1)
    rstd = 1.0 / np.sqrt(var + LN_EPS)  # (N, 1)
    norm = np.multiply(xc, rstd, out=xc)  # (N, C)
    out = norm * w  # (N, C)
    out += b
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


def layernorm_backward_input(dout, norm, rstd, w):
    """The input part (I) of LayerNorm's backward: dx (N, C)."""
    dnorm = dout * w  # (N, C)
    C = dout.shape[1]
    mean_dnorm = dnorm.mean(axis=1, keepdims=True)  # (N, 1)
    mean_dnorm_norm = np.einsum("nc,nc->n", dnorm, norm)[:, None] / C  # (N, 1)
    dnorm -= mean_dnorm
    dnorm -= norm * mean_dnorm_norm
    dnorm *= rstd
    return dnorm


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


def matmul_backward_weight(dout, x, dw, dbias, acc=True):
    """The weight part (W): dw (OUT, IN) += dout.T @ x and dbias (OUT,) += column sums of
    dout; acc=False assigns them instead (BLAS writes dw directly: no temporary, no add)."""
    if acc:
        dw += dout.T @ x
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
    th = x * x  # (N, H)
    th *= GELU_CUBE
    th += 1.0
    th *= x
    th *= GELU_SCALE
    np.tanh(th, out=th)
    out = th + 1.0  # (N, H)
    out *= x
    out *= 0.5
    return out, th


def gelu_recompute(x, th):
    """gelu(x) (N, H) from the saved tanh, for the weight gradient of the next matmul."""
    out = th + 1.0  # (N, H)
    out *= x
    out *= 0.5
    return out


def gelu_backward(dout, x, th):
    """Return dx (N, H) = dout * gelu'(x), with th from gelu_forward.

    d/dx 0.5 x (1 + th) = 0.5 (1 + th) + 0.5 x (1 - th^2) sqrt(2/pi) (1 + 3·0.044715 x^2)
    """
    du = x * x  # (N, H)
    du *= 3.0 * GELU_CUBE * GELU_SCALE
    du += GELU_SCALE
    du *= x
    sech2 = th * th  # (N, H)
    np.subtract(1.0, sech2, out=sech2)
    du *= sech2
    du += th
    du += 1.0
    du *= 0.5
    du *= dout
    return du


# ---------------------------------------------------------------------------------------------
# causal self-attention over a slice with a cached key/value prefix

def causal_mask(S, P):
    """Boolean (S, P+S): True where query i (at position P+i) must not see key j."""
    return np.arange(P + S)[None, :] > (P + np.arange(S))[:, None]


_MASKS = {}


def causal_bias(S, P, dtype):
    """Additive mask (S, P+S): 0 where query i may see key j, -inf where it must not."""
    key = (S, P, np.dtype(dtype).str)
    if key not in _MASKS:
        if len(_MASKS) > 256:
            _MASKS.clear()
        _MASKS[key] = np.where(causal_mask(S, P), -np.inf, 0.0).astype(dtype)
    return _MASKS[key]


def attention_forward(qkv, kcache, vcache, b, NH, P):
    """One slice of S tokens whose keys/values are appended to the cache at [P, P+S).

    qkv (b*S, 3C); kcache, vcache (b, NH, T, hs) hold positions [0, P) already.
    Returns out (b*S, C), q (b, NH, S, hs), att (b, NH, S, P+S).
    """
    C = qkv.shape[1] // 3
    S = qkv.shape[0] // b
    hs = C // NH
    qkv4 = qkv.reshape(b, S, 3, NH, hs)
    q = np.ascontiguousarray(qkv4[:, :, 0].transpose(0, 2, 1, 3))  # (b, NH, S, hs)
    kcache[:, :, P:P + S] = qkv4[:, :, 1].transpose(0, 2, 1, 3)
    vcache[:, :, P:P + S] = qkv4[:, :, 2].transpose(0, 2, 1, 3)
    K = kcache[:, :, :P + S]  # (b, NH, P+S, hs)
    V = vcache[:, :, :P + S]  # (b, NH, P+S, hs)
    att = q @ K.transpose(0, 1, 3, 2)  # (b, NH, S, P+S)
    att *= 1.0 / math.sqrt(hs)
    if S > 1:
        att += causal_bias(S, P, att.dtype)
    att -= att.max(axis=-1, keepdims=True)
    np.exp(att, out=att)
    att /= att.sum(axis=-1, keepdims=True)
    y = att @ V  # (b, NH, S, hs)
    out = np.ascontiguousarray(y.transpose(0, 2, 1, 3)).reshape(b * S, C)  # (b*S, C)
    return out, q, att


def attention_backward(dout, q, att, kcache, vcache, dkacc, dvacc, P):
    """Backward of one slice; slices must run in reverse order over the same accumulators.

    dout (b*S, C); dkacc, dvacc (b, NH, T, hs) collect every later slice's contribution, so
    after this call positions [P, P+S) are final. Returns dqkv (b*S, 3C).
    """
    b, NH, S, hs = q.shape
    C = NH * hs
    scale = 1.0 / math.sqrt(hs)
    K = kcache[:, :, :P + S]  # (b, NH, P+S, hs)
    V = vcache[:, :, :P + S]  # (b, NH, P+S, hs)
    dy = np.ascontiguousarray(dout.reshape(b, S, NH, hs).transpose(0, 2, 1, 3))  # (b, NH, S, hs)
    datt = dy @ V.transpose(0, 1, 3, 2)  # (b, NH, S, P+S)
    dvacc[:, :, :P + S] += att.transpose(0, 1, 3, 2) @ dy
    # softmax backward: dpre = att * (datt - sum(att * datt)); masked entries have att = 0
    datt -= np.einsum("bhsp,bhsp->bhs", att, datt)[..., None]
    datt *= att
    datt *= scale
    dq = datt @ K  # (b, NH, S, hs)
    dkacc[:, :, :P + S] += datt.transpose(0, 1, 3, 2) @ q
    dqkv = np.empty((b, S, 3, NH, hs), dtype=dout.dtype)  # (b, S, 3, NH, hs)
    dqkv[:, :, 0] = dq.transpose(0, 2, 1, 3)
    dqkv[:, :, 1] = dkacc[:, :, P:P + S].transpose(0, 2, 1, 3)
    dqkv[:, :, 2] = dvacc[:, :, P:P + S].transpose(0, 2, 1, 3)
    return dqkv.reshape(b * S, 3 * C)


# ---------------------------------------------------------------------------------------------
# logits softmax + cross-entropy, fused with its backward

def crossentropy_forward_backward(logits, targets, V, dloss):
    """Turn logits (N, Vp) into dlogits in place; return the per-token losses (N,) in float64.

    Only the first V columns enter the softmax; padded columns get zero gradient.
    dloss is d(total loss)/d(token loss), 1/(B*T) for llm.c's mean loss.
    """
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
