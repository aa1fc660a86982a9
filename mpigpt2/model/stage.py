"""A pipeline stage: forward/backward of one (micro-batch, slice) through a contiguous layer range.

Slice j of a micro-batch covers token positions [P, P+S). Forward appends the slice's keys and
values to the micro-batch's KV prefix cache; backward must visit slices in reverse order, adding
each slice's dK/dV over its whole prefix into per-layer accumulators (docs/design.md#token-slices). The whole
model on one process is simply the stage that owns every layer, with one slice of T tokens.
"""

import numpy as np

from mpigpt2.model import ops
from mpigpt2.model.params import LAYER_NAMES, ParamLayout


class _MicroBatch:
    """Per-micro-batch state: KV prefix caches, dK/dV accumulators, saved slice activations."""

    def __init__(self, k, v):
        self.k = k  # (nl, b, NH, T, hs)
        self.v = v  # (nl, b, NH, T, hs)
        self.dk = None  # taken by the first backward slice
        self.dv = None
        self.saved = {}  # slice start -> activations of that slice


class _Pool:
    """Reuses the large per-micro-batch buffers across steps: a fresh allocation of this
    size is mmap-ed and page-faulted again every step."""

    def __init__(self, dtype):
        self.dtype, self.free = dtype, {}

    def take(self, shape, zero=False):
        bufs = self.free.get(shape)
        a = bufs.pop() if bufs else np.empty(shape, dtype=self.dtype)
        if zero:
            a.fill(0.0)
        return a

    def give(self, *arrays):
        for a in arrays:
            if a is not None:
                self.free.setdefault(a.shape, []).append(a)


class Stage:
    """Parameters, gradients and activation bookkeeping of one pipeline stage."""

    def __init__(self, cfg, spec, dtype=np.float32):
        self.cfg, self.spec, self.dtype = cfg, spec, np.dtype(dtype)
        self.layout = ParamLayout(cfg, spec)
        self.flat, self.p = self.layout.alloc(self.dtype)
        self._grad_flat, self._g = self.layout.alloc(self.dtype)
        self.nl = len(spec.layers)
        self._groups = self._grad_groups()
        self._fresh = set()  # groups not written since zero_grad: their first write assigns
        # chunk c (a virtual stage; one chunk without them) runs local layers layers[c]
        self.chunks = spec.chunks
        starts = np.cumsum([0] + [len(c.layers) for c in self.chunks]).tolist()
        self.local = [range(a, b) for a, b in zip(starts, starts[1:])]
        self.mbs = {}  # (chunk, mb) -> _MicroBatch
        self.pending = {}  # (chunk, mb, pos0) -> the weight parts (W) kept by backward_input
        self.pool = _Pool(self.dtype)
        self.before_use = None  # ZeRO: before_use(layer or tensor name) waits for its params

    # -----------------------------------------------------------------------------------------
    def zero_grad(self):
        """Start a step's gradients at zero without a memset: every group (a layer's tensors,
        wte, wpe, lnf) is marked unwritten and its first write of the step assigns
        (docs/design.md#first-writes); whatever is still unwritten reads zero."""
        self._fresh = set(self._groups)

    def _grad_groups(self):
        """Gradient groups: key -> views written together by one weight part."""
        g = self._g
        groups = {i: [g[n][i] for n in LAYER_NAMES] for i in range(self.nl)}
        for key, names in (("wte", ("wte",)), ("wpe", ("wpe",)), ("lnf", ("lnfw", "lnfb"))):
            if names[0] in g:
                groups[key] = [g[n] for n in names]
        return groups

    def _accumulate(self, key):
        """For a weight part about to write group key in full: False the first time in a step
        (assign), True after (accumulate)."""
        if key in self._fresh:
            self._fresh.discard(key)
            return False
        return True

    def _zero_unwritten(self, keys=None):
        """Zero groups (all by default) not written yet this step, for writes that cover only
        part of a tensor (the embeddings' scatter-add) and for readers of the gradients."""
        for key in list(self._fresh if keys is None else keys):
            if key in self._fresh:
                self._fresh.discard(key)
                for v in self._groups[key]:
                    v.fill(0.0)

    def finish_grads(self):
        """The step's backward is over: zero the groups it never wrote, so that a reader
        holding the buffer (a gradient reducer) sees the whole step's gradient."""
        self._zero_unwritten()

    @property
    def grad_flat(self):
        """The flat gradient buffer (every tensor of the stage, in layout order)."""
        self._zero_unwritten()
        return self._grad_flat

    @property
    def g(self):
        """Named gradient views into grad_flat."""
        self._zero_unwritten()
        return self._g

    def rebind(self, flat=None, grad_flat=None):
        """Keep the parameters (or gradients) in another (size,) buffer from now on, e.g.
        memory shared between processes; the named views follow."""
        if flat is not None:
            self.flat, self.p = flat, self.layout.views(flat)
        if grad_flat is not None:
            self._grad_flat, self._g = grad_flat, self.layout.views(grad_flat)
            self._groups = self._grad_groups()
            self._fresh = set(self._groups)

    def begin(self, mb, b, T, c=0):
        """Start micro-batch mb of b sequences of T tokens in chunk c (allocates its KV cache)."""
        NH = self.cfg.num_heads
        shape = (len(self.local[c]), b, NH, T, self.cfg.channels // NH)
        self.drop(mb, c)
        self.mbs[c, mb] = _MicroBatch(self.pool.take(shape), self.pool.take(shape))

    def forward(self, mb, pos0, x_in, targets=None, dloss=0.0, train=True, c=0):
        """Forward one slice at positions [pos0, pos0+S).

        x_in: tokens (b, S) on the first stage, else activations (b*S, C).
        Returns activations (b*S, C) for the next stage; on the last stage the per-token
        losses (b*S,) float64 when targets (b, S) are given, else the logits (b*S, Vp).
        With train=True the slice's activations are kept for backward and, on the last stage,
        the logits are turned into their gradient at once (dloss per token). c: the chunk.
        """
        cfg, p, st, spec = self.cfg, self.p, self.mbs[c, mb], self.chunks[c]
        NH = cfg.num_heads
        saved = {}
        wait = self.before_use or (lambda key: None)
        if spec.first:
            b, S = x_in.shape
            saved["tokens"] = x_in
            wait("wte")
            wait("wpe")
            x = ops.encoder_forward(p["wte"], p["wpe"], x_in, pos0)  # (b*S, C)
        else:
            b = st.k.shape[1]
            x = x_in  # (b*S, C)
        for i in self.local[c]:
            wait(i)
            kv = i - self.local[c].start  # the layer's index in this chunk's KV cache
            ln1, norm1, rstd1 = ops.layernorm_forward(x, p["ln1w"][i], p["ln1b"][i])  # (b*S, C)
            qkv = ops.matmul_forward(ln1, p["qkvw"][i], p["qkvb"][i])  # (b*S, 3C)
            atty, q, att = ops.attention_forward(qkv, st.k[kv], st.v[kv], b, NH, pos0)  # (b*S, C)
            attproj = ops.matmul_forward(atty, p["attprojw"][i], p["attprojb"][i])  # (b*S, C)
            x2 = x + attproj  # (b*S, C)
            ln2, norm2, rstd2 = ops.layernorm_forward(x2, p["ln2w"][i], p["ln2b"][i])  # (b*S, C)
            fch = ops.matmul_forward(ln2, p["fcw"][i], p["fcb"][i])  # (b*S, 4C)
            fch_gelu, fch_tanh = ops.gelu_forward(fch)  # (b*S, 4C) each
            fcproj = ops.matmul_forward(fch_gelu, p["fcprojw"][i], p["fcprojb"][i])  # (b*S, C)
            x = x2 + fcproj  # (b*S, C)
            if train:
                saved[i] = (ln1, norm1, rstd1, q, att, atty, ln2, norm2, rstd2, fch, fch_tanh)
        if spec.last:
            for key in ("lnfw", "lnfb", "wte"):
                wait(key)
            lnf, normf, rstdf = ops.layernorm_forward(x, p["lnfw"], p["lnfb"])  # (b*S, C)
            logits = ops.matmul_forward(lnf, p["wte"], None)  # (b*S, Vp)
            if targets is None:
                return logits
            losses = ops.crossentropy_forward_backward(logits, targets.reshape(-1),
                                                       cfg.vocab_size, dloss)  # (b*S,)
            if train:
                saved["head"] = (lnf, normf, rstdf, logits)  # logits now hold dlogits
            out = losses
        else:
            out = x
        if train:
            saved["pos0"] = pos0
            st.saved[pos0] = saved
        return out

    def backward(self, mb, pos0, dx_out=None, layer_done=None, c=0):
        """Backward one slice (B): its input part and, layer by layer, its weight part.

        dx_out: gradient (b*S, C) of this stage's output; None on the last stage (the loss
        gradient was fused into forward). Returns the input gradient (b*S, C), or None on
        the first stage (it ends in the embedding tables). layer_done(i) is called once layer
        i's backward is done (the runtime starts that layer's gradient reduction). c: the chunk.
        """
        return self._backward(mb, pos0, dx_out, layer_done, False, c)

    def backward_input(self, mb, pos0, dx_out=None, c=0):
        """The input part (I) of backward: the input gradient and the dK/dV contributions
        (slices of a micro-batch in reverse order, as for B); what the weight part needs is
        kept until backward_weight(mb, pos0, c=c)."""
        return self._backward(mb, pos0, dx_out, None, True, c)

    def backward_weight(self, mb, pos0, layer_done=None, c=0):
        """The weight part (W) of slice pos0 of micro-batch mb, any time after its I and in
        any order among the other Ws: accumulates the weight and bias gradients (matmuls,
        LayerNorm gains and biases, embeddings) and frees what I kept."""
        for key, fn in self.pending.pop((c, mb, pos0)):
            fn()
            if layer_done is not None and isinstance(key, int):
                layer_done(key)

    def _backward(self, mb, pos0, dx_out, layer_done, split, c):
        """I for every piece, in reverse order; each piece's W runs at once (B) or is kept
        (split). Docs: docs/design.md#token-slices (order), #schedules-as-data (I and W)."""
        p, g, st, spec = self.p, self._g, self.mbs[c, mb], self.chunks[c]
        saved = st.saved.pop(pos0)
        kept = self.pending.setdefault((c, mb, pos0), []) if split else None

        def weight(key, fn):  # the W of one piece (a layer, the head, the embeddings)
            if split:
                kept.append((key, fn))
                return
            fn()
            if layer_done is not None and isinstance(key, int):
                layer_done(key)
        if st.dk is None:
            st.dk = self.pool.take(st.k.shape, zero=True)
            st.dv = self.pool.take(st.v.shape, zero=True)
        if spec.last:
            lnf, normf, rstdf, dlogits = saved["head"]
            dlnf = ops.matmul_backward_input(dlogits, p["wte"])  # (b*S, C)
            dx = ops.layernorm_backward_input(dlnf, normf, rstdf, p["lnfw"])  # (b*S, C)

            def head_w():
                ops.matmul_backward_weight(dlogits, lnf, g["wte"], None, self._accumulate("wte"))
                ops.layernorm_backward_weight(dlnf, normf, g["lnfw"], g["lnfb"],
                                              self._accumulate("lnf"))
            weight("head", head_w)
        else:
            dx = dx_out  # (b*S, C)
        for i in reversed(self.local[c]):
            dx = self._layer_input(i, i - self.local[c].start, dx, saved[i], st, pos0, weight)
        if pos0 == 0:
            self.drop(mb, c)  # slice 0 is the last backward of the micro-batch
        if spec.first:
            tokens = saved["tokens"]

            def embed_w():  # a scatter-add and a row range: zero first if not written yet
                self._zero_unwritten(("wte", "wpe"))
                ops.encoder_backward(g["wte"], g["wpe"], dx, tokens, pos0)
            weight("embed", embed_w)
            return None
        return dx

    def _layer_input(self, i, kv, dx, saved_i, st, pos0, weight):
        """Layer i's input gradient (kv: its index in the chunk's caches); hands its weight
        part to weight(i, fn)."""
        p, g = self.p, self._g
        ln1, norm1, rstd1, q, att, atty, ln2, norm2, rstd2, fch, fch_tanh = saved_i
        dout = dx  # (b*S, C) the layer's output gradient: residual and fcproj
        dfch = ops.gelu_backward(ops.matmul_backward_input(dout, p["fcprojw"][i]), fch,
                                 fch_tanh)  # (b*S, 4C)
        dln2 = ops.matmul_backward_input(dfch, p["fcw"][i])  # (b*S, C)
        dx2 = ops.layernorm_backward_input(dln2, norm2, rstd2, p["ln2w"][i], dout)  # (b*S, C)
        datty = ops.matmul_backward_input(dx2, p["attprojw"][i])  # (b*S, C)
        dqkv = ops.attention_backward(datty, q, att, st.k[kv], st.v[kv], st.dk[kv], st.dv[kv],
                                      pos0)  # (b*S, 3C)
        dln1 = ops.matmul_backward_input(dqkv, p["qkvw"][i])  # (b*S, C)
        dx_in = ops.layernorm_backward_input(dln1, norm1, rstd1, p["ln1w"][i], dx2)

        def w():  # in backward order: fcproj, fc, ln2, attproj, qkv, ln1
            acc = self._accumulate(i)  # decided when W runs: split backward defers it
            fch_gelu = ops.gelu_recompute(fch, fch_tanh)  # (b*S, 4C)
            ops.matmul_backward_weight(dout, fch_gelu, g["fcprojw"][i], g["fcprojb"][i], acc)
            del fch_gelu
            ops.matmul_backward_weight(dfch, ln2, g["fcw"][i], g["fcb"][i], acc)
            ops.layernorm_backward_weight(dln2, norm2, g["ln2w"][i], g["ln2b"][i], acc)
            ops.matmul_backward_weight(dx2, atty, g["attprojw"][i], g["attprojb"][i], acc)
            ops.matmul_backward_weight(dqkv, ln1, g["qkvw"][i], g["qkvb"][i], acc)
            ops.layernorm_backward_weight(dln1, norm1, g["ln1w"][i], g["ln1b"][i], acc)
        weight(i, w)
        return dx_in  # (b*S, C)

    def drop(self, mb, c=0):
        """Forget a micro-batch of chunk c (end of its backward, inference, an aborted step)."""
        st = self.mbs.pop((c, mb), None)
        if st is not None:
            self.pool.give(st.k, st.v, st.dk, st.dv)
