"""The fused loops that model/kernels.py hands out, compiled by numba (this module is imported
only when a loop is first needed: numba takes a moment to import).

Every loop is a module-level function and calls `dot` as a global, never through a closure:
numba keys its disk cache of a closure by the closure's contents, and a captured dispatcher
pickles differently in every process, so each start compiled the loops that call `dot` again
(about 1.4 s per process) and added one more entry to the cache (hundreds of files after a test
run). (docs/design.md#fused-elementwise-loops)
"""

import numpy as np
from numba import njit

# every loop: compiled on first use and cached on disk beside this file, like optim's AdamW loop
jit = njit(cache=True, nogil=True, error_model="numpy", boundscheck=False)

# the loops by name (kernels.compiled() hands them out)
NAMES = ("gelu_tanh_arg", "gelu_from_tanh", "gelu_grad", "layernorm", "layernorm_grad",
         "scores_shift", "scores_normalize", "scores_grad")


@jit
def dot(a, b, n, acc):
    """Σ a[j]·b[j] over j < n in 16 interleaved partial sums (acc: scratch of 16), added
    up in order at the end: a fixed order like numpy's pairwise sums, which vectorises."""
    acc[:] = 0
    m = n - n % 16
    for j in range(0, m, 16):
        for lane in range(16):
            acc[lane] += a[j + lane] * b[j + lane]
    t = acc[0]
    for lane in range(1, 16):
        t += acc[lane]
    for j in range(m, n):
        t += a[j] * b[j]
    return t


@jit
def gelu_tanh_arg(x, th, c, s, one):
    """th = ((x·x)·c + 1)·x·s, the argument of GELU's tanh."""
    for i in range(x.size):
        xi = x[i]
        th[i] = (((xi * xi) * c) + one) * xi * s


@jit
def gelu_from_tanh(x, th, out, one, half):
    """out = ((th + 1)·x)·0.5, GELU from its tanh."""
    for i in range(x.size):
        out[i] = ((th[i] + one) * x[i]) * half


@jit
def gelu_grad(dout, x, th, dx, k3, s, one, half):
    """dx = (((x·x)·k3 + s)·x·(1 − th²) + th + 1)·0.5·dout, k3 = 3·c·s."""
    for i in range(x.size):
        xi, ti = x[i], th[i]
        du = (((xi * xi) * k3) + s) * xi
        du = ((du * (one - ti * ti)) + ti) + one
        dx[i] = (du * half) * dout[i]


@jit
def layernorm(x, w, b, out, norm, rstd, ones, eps, one, acc):
    """Per row of x (N, C): mean, xc = x − mean, var = Σ xc²/C, rstd = 1/sqrt(var + eps),
    norm = xc·rstd, out = norm·w + b."""
    N, C = x.shape
    fc = one * C
    for n in range(N):
        mean = dot(x[n], ones, C, acc) / fc
        for j in range(C):
            norm[n, j] = x[n, j] - mean
        r = one / np.sqrt(dot(norm[n], norm[n], C, acc) / fc + eps)
        rstd[n, 0] = r
        for j in range(C):
            v = norm[n, j] * r
            norm[n, j] = v
            out[n, j] = v * w[j] + b[j]


@jit
def layernorm_grad(dout, norm, rstd, w, dx, residual, add, ones, one, acc, dn):
    """Per row: dnorm = dout·w; dx = (dnorm − mean(dnorm) − norm·mean(dnorm·norm))·rstd,
    plus residual (N, C) when add (dn: scratch row of C)."""
    N, C = dout.shape
    fc = one * C
    for n in range(N):
        for j in range(C):
            dn[j] = dout[n, j] * w[j]
        m1 = dot(dn, ones, C, acc) / fc
        m2 = dot(dn, norm[n], C, acc) / fc
        r = rstd[n, 0]
        for j in range(C):
            v = ((dn[j] - m1) - norm[n, j] * m2) * r
            dx[n, j] = residual[n, j] + v if add else v


@jit
def scores_shift(att, i, r0, r1, n, scale, acc):
    """Rows [r0, r1) of att[i] (NH, S, P+S) hold raw scores q·k in columns [0, n),
    n = P + r1; row s may see the first P+s+1 = n−r1+s+1 of them. Scale them, subtract
    each row's maximum over what it sees (in place); 0 where it sees nothing."""
    for h in range(att.shape[1]):
        for s in range(r0, r1):
            row = att[i, h, s]
            L = n - r1 + s + 1
            m = row[0] * scale
            acc[:] = m
            L16 = L - L % 16
            for j in range(0, L16, 16):  # 16 lanes of maxima: a vector max per step
                for lane in range(16):
                    v = row[j + lane] * scale
                    row[j + lane] = v
                    acc[lane] = max(acc[lane], v)
            for j in range(L16, L):
                v = row[j] * scale
                row[j] = v
                m = max(m, v)
            for lane in range(16):
                m = max(m, acc[lane])
            for j in range(L):
                row[j] = row[j] - m
            for j in range(L, n):
                row[j] = 0


@jit
def scores_normalize(att, i, r0, r1, n, ones, one, acc):
    """After exp of scores_shift's rows: each row times 1/its sum; the masked rest of the
    row (to the end, P+S) zero. ones: at least P+S ones."""
    for h in range(att.shape[1]):
        for s in range(r0, r1):
            row = att[i, h, s]
            L = n - r1 + s + 1
            inv = one / dot(row, ones, L, acc)
            for j in range(L):
                row[j] = row[j] * inv
            for j in range(L, row.size):
                row[j] = 0


@jit
def scores_grad(datt, att, i, r0, r1, n, scale, acc):
    """Softmax backward of rows [r0, r1) of att[i] in place over datt (NH, r1−r0, n):
    datt = (datt − Σ att·datt)·att·scale over what each row sees, 0 elsewhere."""
    for h in range(att.shape[1]):
        for s in range(r0, r1):
            a, d = att[i, h, s], datt[h, s - r0]
            L = n - r1 + s + 1
            t = dot(a, d, L, acc)
            for j in range(L):
                d[j] = ((d[j] - t) * a[j]) * scale
            for j in range(L, n):
                d[j] = 0
