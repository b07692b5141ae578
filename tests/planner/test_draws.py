"""The planner's own normal draws, and the lazily imported numpy modules it keeps out of a run."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from perseus_operator.planner.draws import NormalStream
from perseus_operator.planner.model import sorted_unique


def test_same_seed_same_draws_and_calls_continue_the_stream() -> None:
    whole = NormalStream(7).standard_normal((10,))
    stream = NormalStream(7)
    parts = np.concatenate((stream.standard_normal((3,)), stream.standard_normal((7,))))
    # Box-Muller pairs the uniforms differently for other sizes: the continuation is a fresh
    # part of the stream, not the same numbers.
    assert not np.array_equal(whole[3:], parts[3:])
    np.testing.assert_array_equal(NormalStream(7).standard_normal((3,)), parts[:3])
    np.testing.assert_array_equal(NormalStream(7).standard_normal((2, 5)).ravel(), whole)
    assert not np.array_equal(NormalStream(8).standard_normal((10,)), whole)


def test_draws_are_standard_normal() -> None:
    x = NormalStream(20241104).standard_normal((200_000,))
    assert np.all(np.isfinite(x))
    assert abs(float(x.mean())) < 0.01
    assert abs(float(x.std()) - 1.0) < 0.01
    # Tails: P(|z| > 1.96) = 5%, P(z > 2.576) = 0.5%.
    assert abs(float((np.abs(x) > 1.96).mean()) - 0.05) < 0.003
    assert abs(float((x > 2.576).mean()) - 0.005) < 0.001
    # Consecutive draws are uncorrelated (a weak counter hash would show here).
    assert abs(float(np.corrcoef(x[:-1], x[1:])[0, 1])) < 0.01


@pytest.mark.parametrize("shape", [(0,), (1,), (3, 5), (2, 3, 4)])
def test_shapes(shape: tuple[int, ...]) -> None:
    out = NormalStream(1).standard_normal(shape)
    assert out.shape == shape
    assert out.size == math.prod(shape)


def test_sorted_unique() -> None:
    values = np.asarray([3.0, 1.0, 2.0, 1.0, 3.0, -0.5])
    np.testing.assert_array_equal(sorted_unique(values), np.unique(values))
    assert len(sorted_unique(np.zeros(0))) == 0


def test_planning_leaves_numpy_random_and_numpy_ma_unimported() -> None:
    """Their first use costs about 25 ms together, a tenth of planning 8 x 24."""
    code = (
        "import sys\n"
        "from perseus_operator.planner import PipelineShape, compute_frontier\n"
        "from perseus_profiles import EXAMPLES, load_example\n"
        "compute_frontier(load_example('bloom-176b-a40'), PipelineShape(8, 8),"
        " EXAMPLES['bloom-176b-a40'].blocking_power_w)\n"
        "print(sorted(m for m in sys.modules if m in ('numpy.random', 'numpy.ma')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
