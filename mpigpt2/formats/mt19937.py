"""MT19937 (Matsumoto & Nishimura, 1998) and the Fisher–Yates permutation llm.c shuffles with.

Written from the published algorithm: seeding is init_genrand (state[0] = seed, state[j] =
1812433253 * (state[j-1] ^ (state[j-1] >> 30)) + j mod 2^32), the 624-word state is refilled
by the standard twist (vectorized with numpy in four dependency-free blocks) and each output is
the standard tempering of one state word. The stream is the one of C++'s std::mt19937 and of
numpy's legacy np.random.RandomState(int seed) (raw 32-bit words).

llm.c's `random_permutation(data, n, rng)` (llmc/rand.h) shuffles data in place: for i from n-1
down to 1 it swaps data[i] with data[randint32() % (i+1)], drawing n-1 words (none for n ≤ 1).
Its loader resets a shard's window order to the identity before each shuffle, but shuffles the
shard order of the previous epoch again at every epoch.
"""

import numpy as np

N, M = 624, 397
MATRIX_A = np.uint32(0x9908B0DF)
UPPER, LOWER = np.uint32(0x80000000), np.uint32(0x7FFFFFFF)


def _init_genrand(seed):
    mt = [0] * N
    mt[0] = seed & 0xFFFFFFFF
    for j in range(1, N):
        prev = mt[j - 1]
        mt[j] = (1812433253 * (prev ^ (prev >> 30)) + j) & 0xFFFFFFFF
    return np.array(mt, dtype=np.uint32)


def _twist(mt):
    """Refill the state in place. Word i needs old words i+1 and i+M, or the new word i+M-N:
    blocks [0, N-M), [N-M, 2(N-M)), [2(N-M), N) only read words that are final when they run."""
    K = N - M  # 227
    for lo, hi in ((0, K), (K, 2 * K), (2 * K, N)):
        nxt = mt[(np.arange(lo, hi) + 1) % N] if hi == N else mt[lo + 1:hi + 1]
        y = (mt[lo:hi] & UPPER) | (nxt & LOWER)
        far = mt[lo + M:hi + M] if hi + M <= N else mt[lo + M - N:hi + M - N]
        mt[lo:hi] = far ^ (y >> np.uint32(1)) ^ ((y & np.uint32(1)) * MATRIX_A)


def _temper(y):
    y = y ^ (y >> np.uint32(11))
    y = y ^ ((y << np.uint32(7)) & np.uint32(0x9D2C5680))
    y = y ^ ((y << np.uint32(15)) & np.uint32(0xEFC60000))
    return y ^ (y >> np.uint32(18))


class MT19937:
    """The 32-bit Mersenne Twister. `position` counts the words drawn since seeding."""

    def __init__(self, seed):
        if not 0 <= int(seed) < 2 ** 32:
            raise ValueError(f"MT19937 seed must be a 32-bit unsigned int, got {seed}")
        self.seed = int(seed)
        self._mt = _init_genrand(self.seed)
        self._out = None  # tempered words of the current state (made on first use)
        self._next = N  # index of the next word of the current state; N = refill first
        self.position = 0

    def _refill(self):
        _twist(self._mt)
        self._out, self._next = None, 0

    def randint32(self):
        """The next 32-bit output, as a Python int."""
        return int(self.draw(1)[0])

    def draw(self, n):
        """The next n outputs, uint32 array."""
        n = int(n)
        parts = []
        while n > 0:
            if self._next == N:
                self._refill()
            if self._out is None:
                self._out = _temper(self._mt)
            take = min(n, N - self._next)
            parts.append(self._out[self._next:self._next + take])
            self._next += take
            self.position += take
            n -= take
        return np.concatenate(parts) if parts else np.zeros(0, np.uint32)

    def skip(self, n):
        """Discard the next n outputs (refills only, no tempering)."""
        n = int(n)
        if n < 0:
            raise ValueError(f"cannot skip {n} outputs backwards")
        left = N - self._next
        if n <= left:
            self._next += n
        else:
            n2 = n - left
            for _ in range((n2 - 1) // N + 1):
                self._refill()
            self._next = n2 - N * ((n2 - 1) // N)
        self.position += n


def random_permutation(n, rng, start=None):
    """llm.c's random_permutation with rng, as an int64 array; draws n-1 words. It shuffles the
    array it is given: range(n) (llm.c's init_identity_permutation first), or `start`."""
    n = int(n)
    data = list(range(n)) if start is None else [int(x) for x in start]
    assert len(data) == n
    if n > 1:
        # j for i = n-1, n-2, ..., 1 is draw % (i+1); all draws are known up front
        js = (rng.draw(n - 1).astype(np.int64) % np.arange(n, 1, -1, dtype=np.int64)).tolist()
        i = n - 1
        for j in js:
            data[i], data[j] = data[j], data[i]
            i -= 1
    return np.array(data, dtype=np.int64)
