"""The schedule interpreter: runs one rank's action list for a training or evaluation step.
(docs/design.md#schedules-as-data)"""

import sys
import time

import numpy as np

from mpigpt2.parallel import schedule
from mpigpt2.parallel.collectives import GradReducer
from mpigpt2.parallel.p2p import PipeP2P


class Runner:
    """Executes this stage's program each step, on preallocated message buffers."""

    def __init__(self, grid, stage, layout, T, rows_per_mb, tracer=None, reducer=None,
                 overlap=True):
        self.grid, self.stage, self.layout = grid, stage, layout
        self.T, self.b = T, rows_per_mb
        # slice j covers tokens [start[j], start[j] + length[j]) (docs/design.md#token-slices)
        self.length = layout.lengths(T)
        self.start = np.cumsum((0,) + self.length[:-1]).tolist()
        self.M, self.n = layout.microbatches, len(self.length)
        self.pipe = schedule.make_pipe(grid.pp, self.M, self.n, layout.ranks_of_stages)
        self.program = layout.programs(T)[grid.stage]
        self.eval_program = schedule.build_eval(grid.pp, self.M, self.n,
                                                layout.ranks_of_stages)[grid.stage]
        # this rank's stages -> its chunks (virtual stages: docs/design.md#virtual-stages)
        self.chunk = {s: c for c, s in enumerate(layout.stages_of(grid.stage))}
        # per stage, the last action writing weight gradients: its layers' reductions start
        # inside it
        self.final_b = {a.s: a for a in self.program if a.kind in ("B", "W")}
        self.p2p = PipeP2P(grid.pipe, grid.stage, self.pipe, rows_per_mb, self.length,
                           stage.cfg.channels, stage.dtype, grid.waiter)
        self.handoff = {}  # results passed between two stages of this rank, in memory
        self.reducer = reducer if reducer is not None else GradReducer(grid, stage)
        self.overlap = overlap  # start a layer's gradient reduction inside the last backward
        self.times = {}
        self.action_seconds = {}  # compute Action -> seconds, this step
        self.pipeline_seconds = 0.0  # run() start to the end of the last compute action
        self.tracer = tracer

    _CATS = {"forward": "forward", "backward": "backward", "p2p_wait": "wait",
             "allreduce": "allreduce"}

    def _tick(self, kind, t0, name, action=None):
        t1 = time.perf_counter()
        self.times[kind] = self.times.get(kind, 0.0) + t1 - t0
        if action is not None:  # per compute action: the simulator's measured costs
            self.action_seconds[action] = t1 - t0
            self.last_compute = t1
        if self.tracer is not None and (kind in ("forward", "backward") or t1 - t0 > 2e-5):
            self.tracer.span(name, self._CATS[kind], t0, t1)

    def run(self, tokens, targets, dloss, train=True):
        """One step over M micro-batches; tokens/targets (M, b, T) on the first/last stage.

        Returns the sum of per-token losses on the last stage (0.0 elsewhere). With train,
        gradients are accumulated into stage.g and reduced over the data group at REDUCE.
        """
        st, p2p = self.stage, self.p2p
        program = self.program if train else self.eval_program
        outputs = {}
        loss = 0.0
        tr = self.tracer
        t_begin = self.last_compute = time.perf_counter()
        for i, a in enumerate(program):
            try:
                if a.kind in ("RECV_F", "RECV_B"):
                    p2p.post_recv(a.kind, a.s, a.mb, a.j)
                    if tr is not None:
                        tr.instant(f"post {a}", "recv_post")
                elif a.kind == "F":
                    loss += self._forward(a, tokens, targets, dloss, train, outputs)
                elif a.kind == "SEND_F" or a.kind == "SEND_B":
                    p2p.send(a.kind, a.s, a.mb, a.j, outputs.pop((a.kind, a.s, a.mb, a.j)))
                    if tr is not None:
                        tr.instant(str(a), "send")
                elif a.kind in ("B", "I"):
                    self._backward(a, outputs)
                elif a.kind == "W":
                    t0 = time.perf_counter()
                    st.backward_weight(a.mb, self.start[a.j], layer_done=self._hook(a),
                                       c=self.chunk[a.s])
                    self._tick("backward", t0, str(a), a)
                elif a.kind == "REDUCE":
                    t0 = time.perf_counter()
                    self.reducer.start_rest()
                    self.reducer.wait()
                    self._tick("allreduce", t0, "allreduce wait")
            except Exception:
                print(f"[rank {self.grid.rank}] failed at action {i} ({a}) of:\n"
                      + " ".join(str(x) for x in program), file=sys.stderr, flush=True)
                raise
            if tr is not None and a.kind in schedule.COMPUTE:
                for name in p2p.sends_done():
                    tr.instant(f"done {name}", "send_done")
        # the pipelined part of the step on this rank: to the end of its last compute action
        self.pipeline_seconds = self.last_compute - t_begin
        t0 = time.perf_counter()
        late = p2p.finish()
        self._tick("p2p_wait", t0, "send completion")
        if tr is not None:
            for name in late:
                tr.instant(f"done {name}", "send_done")
        return loss

    def _forward(self, a, tokens, targets, dloss, train, outputs):
        """F of stage a.s: its input from the tokens, a hand-off or a message; its output to a
        hand-off or a send block. Returns the slice's loss sum on the last stage, else 0."""
        st, c = self.stage, self.chunk[a.s]
        spec, pos0, k = st.chunks[c], self.start[a.j], self.length[a.j]
        if spec.first:
            x = np.ascontiguousarray(tokens[a.mb, :, pos0:pos0 + k])
        elif self.pipe.local(a.s - 1, a.s):
            x = self.handoff.pop(("F", a.s, a.mb, a.j))
        else:
            x = self._receive("RECV_F", a)
        tgt = targets[a.mb, :, pos0:pos0 + k] if spec.last else None
        t0 = time.perf_counter()
        if a.j == 0:
            st.begin(a.mb, self.b, self.T, c)
        out = st.forward(a.mb, pos0, x, tgt, dloss, train=train, c=c)
        if not train and a.j == self.n - 1:
            st.drop(a.mb, c)
        self._tick("forward", t0, str(a), a)
        if spec.last:
            return float(out.sum())
        if self.pipe.local(a.s, a.s + 1):
            self.handoff[("F", a.s + 1, a.mb, a.j)] = out
        else:
            outputs[("SEND_F", a.s, a.mb, a.j)] = out
        return 0.0

    def _backward(self, a, outputs):
        """B or I of stage a.s: the output gradient from a hand-off or a message, the input
        gradient to a hand-off or a send block (none on the first stage)."""
        st, c, pos0 = self.stage, self.chunk[a.s], self.start[a.j]
        if st.chunks[c].last:
            dout = None
        elif self.pipe.local(a.s, a.s + 1):
            dout = self.handoff.pop(("B", a.s, a.mb, a.j))
        else:
            dout = self._receive("RECV_B", a)
        t0 = time.perf_counter()
        if a.kind == "I":
            dx = st.backward_input(a.mb, pos0, dout, c=c)
        else:
            dx = st.backward(a.mb, pos0, dout, layer_done=self._hook(a), c=c)
        self._tick("backward", t0, str(a), a)
        if dx is None:
            return
        if self.pipe.local(a.s - 1, a.s):
            self.handoff[("B", a.s - 1, a.mb, a.j)] = dx
        else:
            outputs[("SEND_B", a.s, a.mb, a.j)] = dx

    def _hook(self, a):
        """Start each layer's gradient reduction inside its stage's last B or W."""
        return self.reducer.start_layer if a == self.final_b[a.s] and self.overlap else None

    def _receive(self, kind, a):
        """Wait (polling) for the message a compute action needs; the wait is timed."""
        t0 = time.perf_counter()
        buf = self.p2p.wait_recv(kind, a.s, a.mb, a.j)
        self._tick("p2p_wait", t0, f"wait {a.s}{kind}{a.mb}.{a.j}")
        if self.tracer is not None:
            self.tracer.instant(f"done {a.s}{kind}{a.mb}.{a.j}", "recv_done")
        return buf

    def take_times(self):
        t, self.times = self.times, {}
        return t

    def take_action_seconds(self):
        """This step's seconds of every compute action of the program, in program order."""
        out = [self.action_seconds.get(a, 0.0) for a in self.program
               if a.kind in schedule.COMPUTE]
        self.action_seconds = {}
        return out
