"""Seeded standard-normal draws in plain numpy, for the jittered roundings.

`numpy.random` is imported lazily by numpy 2 and its first use costs about 17 ms (a dozen
extension modules, `secrets`, `hashlib`): a tenth of what planning 8 x 24 takes. The jitter only
needs reproducible, well-mixed normal variates, so they come from a counter hashed with
SplitMix64 (Steele, Lea & Flood, 2014) into 53-bit uniforms and turned normal by Box-Muller.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["NormalStream"]

FloatArray = npt.NDArray[np.float64]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_UNIT = 2.0**-53


class NormalStream:
    """Standard normal draws from `seed`: the same seed gives the same sequence, and each call
    goes on from where the last one stopped."""

    def __init__(self, seed: int) -> None:
        self._state = np.uint64(seed % 2**64)
        self._drawn = 0

    def standard_normal(self, shape: tuple[int, ...]) -> FloatArray:
        """An array of `shape` of independent standard normal draws."""
        size = int(np.prod(shape, dtype=np.int64))
        pairs = (size + 1) // 2
        u = self._uniforms(2 * pairs)
        radius = np.sqrt(-2.0 * np.log(u[:pairs]))
        angle = (2.0 * np.pi) * u[pairs:]
        out = np.concatenate((radius * np.cos(angle), radius * np.sin(angle)))[:size]
        return out.reshape(shape)

    def _uniforms(self, count: int) -> FloatArray:
        """`count` uniforms in (0, 1], never 0 (Box-Muller takes their log)."""
        counter = np.arange(self._drawn + 1, self._drawn + count + 1, dtype=np.uint64)
        self._drawn += count
        # uint64 arithmetic wraps modulo 2**64, which is what SplitMix64 relies on.
        z = self._state + counter * _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        z ^= z >> np.uint64(31)
        out: FloatArray = ((z >> np.uint64(11)).astype(np.float64) + 1.0) * _UNIT
        return out
