"""Training batches: windows of B*T+1 tokens walked through llm.c shards, resumable."""

import os

import numpy as np

from mpigpt2.base.errors import UserError
from mpigpt2.formats.manifest import check_shard
from mpigpt2.formats.mt19937 import MT19937, random_permutation
from mpigpt2.formats.shards import read_shard, shard_paths

LLMC_SEED = 42  # llm.c seeds its shuffle RNG with 42 + process_rank; rank 0's is reproduced


class DataLoader:
    """Yields (inputs, targets) int32 arrays of shape (B, T) from llm.c token shards.

    Each step reads one window of B*T+1 consecutive tokens; inputs are window[:-1] and targets
    window[1:], both reshaped to (B, T). Windows start at multiples of B*T inside a shard, so a
    shard of n tokens holds (n - 1) // (B*T) of them; a leftover tail shorter than a window is
    skipped, as in llm.c.

    Order without shuffle (llm.c's): shard 0 from position 0, advancing B*T tokens per step; when
    the next window would run past the shard's end, move to position 0 of the next shard,
    wrapping from the last shard to shard 0 (which starts a new epoch).

    Order with shuffle="seeded" (or True; `--shuffle`): epoch e visits the shards in the order
    np.random.default_rng([seed, e]).permutation(num_shards), and inside shard s the windows in
    the order np.random.default_rng([seed, e, s]).permutation(windows in s). Every window is
    seen exactly once per epoch, and the order depends only on (seed, epoch), never on history.

    Order with shuffle="llmc" (`--shuffle llmc`): the order of llm.c's shuffled training loader
    (llmc/dataloader.h, should_shuffle=1) for a single process. One MT19937 stream seeded with
    42 (`seed` is ignored) and never reseeded; at the start of every epoch it draws a
    random_permutation of the previous epoch's shard order (the identity before epoch 0; no draw
    with one shard), then each shard, in that order, draws a random_permutation of its windows
    (from the identity) when it is entered. The global batch order
    equals llm.c's with one process; llm.c with N processes seeds 42 + rank per process and
    gives each process its own windows, which is not reproduced here — our data-parallel
    replicas read their rows of the same global window, as in the other orders. The stream
    position at the start of (epoch, shard) follows from the window counts alone, so resuming
    replays the stream from the seed (cheap: refills without tempering).
    """

    def __init__(self, paths_or_glob, B, T, *, vocab_size, flag="--train-data", shuffle=False,
                 seed=0):
        if isinstance(paths_or_glob, (str, os.PathLike)):
            paths = shard_paths(paths_or_glob, flag)
        else:
            paths = [os.fspath(p) for p in paths_or_glob]
            if not paths:
                raise UserError(f"{flag}: no token shards given")
        if B < 1 or T < 1:
            raise UserError(f"--batch-size ({B}) and --seq-len ({T}) must both be ≥ 1")
        if seed < 0:
            raise UserError(f"the data seed must be ≥ 0, got {seed}")
        self.paths, self.B, self.T = paths, int(B), int(T)
        if shuffle in (False, None, "", "sequential"):
            self.order = "sequential"
        elif shuffle is True or shuffle == "seeded":
            self.order = "seeded"
        elif shuffle == "llmc":
            self.order = "llmc"
        else:
            raise UserError(f"--shuffle must be one of seeded, llmc (or absent), got {shuffle!r}")
        self.shuffle = False if self.order == "sequential" else self.order  # truthy iff shuffled
        self.seed, self.flag = int(seed), flag
        BT = self.B * self.T
        self.ntok = []
        manifests = {}
        for p in paths:  # validate every shard now, not hours into training
            try:
                n = len(read_shard(p, vocab_size))
                check_shard(p, manifests)  # against prepare's manifest.json, if beside it
            except UserError as e:
                raise UserError(f"{flag}: {e}") from None
            if n < BT + 1:
                raise UserError(f"{flag}: {p} has {n} tokens but one batch needs B×T+1 = "
                                f"{self.B}×{self.T}+1 = {BT + 1}; lower --batch-size/--seq-len "
                                "or use more text")
            self.ntok.append(n)
        self.nwin = [(n - 1) // BT for n in self.ntok]
        self._mapped = (None, None)  # (shard, memmap): only the current shard stays mapped
        self._perm = {}  # small cache of the permutations of the current epoch
        self._rng = None  # llmc: the MT19937 stream, and its last two draws:
        self._llmc_shards = None  # (epoch, shard order)
        self._llmc_wins = None  # (epoch, i, window order of the i-th shard visited)
        self.reset()

    @property
    def batches_per_epoch(self):
        """Windows in one pass over all shards (e.g. for a full validation sweep)."""
        return sum(self.nwin)

    def reset(self):
        """Go back to the first batch of epoch 0 (used before each validation pass)."""
        self.epoch, self._i, self._j = 0, 0, 0

    # -- order ------------------------------------------------------------------------------

    def _shard_order(self, epoch):
        if self.order == "sequential":
            return None
        if self.order == "llmc":
            return self._llmc_shard_order(epoch)
        key = ("shards", epoch)
        if key not in self._perm:
            self._perm = {k: v for k, v in self._perm.items() if k[1] == epoch}
            self._perm[key] = np.random.default_rng([self.seed, epoch]).permutation(
                len(self.paths))
        return self._perm[key]

    def _window_order(self, epoch, shard, i):
        """Window order of `shard`, the i-th shard visited in `epoch`."""
        if self.order == "sequential":
            return None
        if self.order == "llmc":
            return self._llmc_window_order(epoch, i)
        key = ("windows", epoch, shard)
        if key not in self._perm:
            # keep one shard's windows at a time: a 100M-token shard has ~10^5 of them
            self._perm = {k: v for k, v in self._perm.items()
                          if k[0] == "shards" and k[1] == epoch}
            self._perm[key] = np.random.default_rng([self.seed, epoch, shard]).permutation(
                self.nwin[shard])
        return self._perm[key]

    # llm.c's stream: per epoch len(paths)-1 draws for the shard order, then nwin[s]-1 for each
    # shard s in that order (random_permutation of n draws n-1 words).

    def _llmc_seek(self, pos):
        """Put the stream at word `pos` (skipping forward, or replaying from the seed)."""
        if self._rng is None or self._rng.position > pos:
            self._rng = MT19937(LLMC_SEED)
        self._rng.skip(pos - self._rng.position)

    def _llmc_epoch_start(self, epoch):
        return epoch * (len(self.paths) - 1 + sum(n - 1 for n in self.nwin))

    def _llmc_shard_order(self, epoch):
        """llm.c shuffles last epoch's shard order again (its shard_indices start as the
        identity once, at init), so epoch e's order needs the shuffles of epochs 0..e."""
        c = self._llmc_shards
        if c is None or c[0] != epoch:
            e, order = (c[0] + 1, c[1]) if c is not None and c[0] < epoch else (0, None)
            for k in range(e, epoch + 1):
                self._llmc_seek(self._llmc_epoch_start(k))
                order = random_permutation(len(self.paths), self._rng, order)
            self._llmc_shards = c = (epoch, order)
        return c[1]

    def _llmc_window_order(self, epoch, i):
        c = self._llmc_wins
        if c is None or c[:2] != (epoch, i):
            order = self._llmc_shard_order(epoch)
            pos = self._llmc_epoch_start(epoch) + len(self.paths) - 1 + sum(
                self.nwin[int(s)] - 1 for s in order[:i])
            self._llmc_seek(pos)
            self._llmc_wins = c = (epoch, i, random_permutation(self.nwin[int(order[i])],
                                                                self._rng))
        return c[2]

    def _where(self):
        """(shard, token position) of the next batch."""
        order = self._shard_order(self.epoch)
        shard = self._i if order is None else int(order[self._i])
        wins = self._window_order(self.epoch, shard, self._i)
        win = self._j if wins is None else int(wins[self._j])
        return shard, win * self.B * self.T

    def _advance(self):
        shard, _ = self._where()
        self._j += 1
        if self._j == self.nwin[shard]:
            self._j, self._i = 0, self._i + 1
            if self._i == len(self.paths):
                self._i, self.epoch = 0, self.epoch + 1

    # -- reading ----------------------------------------------------------------------------

    def _tokens(self, shard):
        if self._mapped[0] != shard:
            self._mapped = (shard, read_shard(self.paths[shard]))  # header recheck is cheap
        return self._mapped[1]

    def next_batch(self, rows=None):
        """(inputs, targets), each int32 (r1-r0, T), for rows r0:r1 of this step's (B, T) batch.

        Data-parallel replicas pass their own slice of the B rows so each reads only its share
        of the window (tokens[pos + r0*T : pos + r1*T + 1]); rows=None means all B rows. Every
        call, whatever the rows, advances the loader by one full step.
        """
        r0, r1 = self._rows(rows)
        shard, pos = self._where()
        T = self.T
        w = np.array(self._tokens(shard)[pos + r0 * T:pos + r1 * T + 1], dtype=np.int32)
        self._advance()
        return w[:-1].reshape(r1 - r0, T), w[1:].reshape(r1 - r0, T).copy()

    def _rows(self, rows):
        if rows is None:
            return 0, self.B
        if not isinstance(rows, slice):
            raise TypeError(f"rows must be a slice of the {self.B} batch rows, got {rows!r}")
        r0, r1, step = rows.indices(self.B)
        if step != 1 or r1 <= r0:
            raise ValueError(f"rows {rows} must be a non-empty, step-1 slice of 0..{self.B}")
        return r0, r1

    # -- checkpointing ----------------------------------------------------------------------

    def state(self):
        """JSON-able position of the next batch, for checkpoints (the llmc order's RNG position
        follows from it, so nothing of the RNG is stored)."""
        shard, pos = self._where()
        return {"epoch": self.epoch, "shard": shard, "position": pos,
                "num_shards": len(self.paths), "order": self.order}

    def set_state(self, state):
        """Resume from state(): the next batch is the one that followed when it was saved."""
        epoch, shard, pos = int(state["epoch"]), int(state["shard"]), int(state["position"])
        n = int(state.get("num_shards", len(self.paths)))
        BT = self.B * self.T
        where = f"{self.flag}: checkpoint data state {dict(state)}"
        if n != len(self.paths):
            raise UserError(f"{where} was saved with {n} shards but {len(self.paths)} match now; "
                            "resume with the same data")
        if epoch < 0 or not 0 <= shard < n or pos % BT or not 0 <= pos // BT < self.nwin[shard]:
            raise UserError(f"{where} does not fit these shards with B×T = {BT}; resume with "
                            "the same data, --batch-size and --seq-len")
        saved = state.get("order", self.order)  # checkpoints before --shuffle llmc had none
        if saved != self.order:
            flag = {"sequential": "no --shuffle", "seeded": "--shuffle",
                    "llmc": "--shuffle llmc"}
            said = flag.get(saved) if isinstance(saved, str) else None
            raise UserError(f"{where} was saved with {said or repr(saved)} but this run has "
                            f"{flag[self.order]}; resume with the same --shuffle")
        order = self._shard_order(epoch)
        i = shard if order is None else int(np.flatnonzero(order == shard)[0])
        wins = self._window_order(epoch, shard, i)
        self.epoch, self._i = epoch, i
        self._j = pos // BT if wins is None else int(np.flatnonzero(wins == pos // BT)[0])
