import numpy as np
import pytest
import torch as th
from hypothesis import given, settings
from hypothesis import strategies as st

from sb3_trust.common.conjugate_gradient import conjugate_gradient


def random_spd(n: int, seed: int, condition: float = 10.0) -> th.Tensor:
    generator = th.Generator().manual_seed(seed)
    q, _ = th.linalg.qr(th.randn(n, n, generator=generator, dtype=th.float64))
    eigenvalues = th.logspace(0, np.log10(condition), n, dtype=th.float64)
    return q @ th.diag(eigenvalues) @ q.T


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 30), seed=st.integers(0, 10_000))
def test_solves_random_spd_systems(n: int, seed: int) -> None:
    matrix = random_spd(n, seed)
    b = th.randn(n, generator=th.Generator().manual_seed(seed + 1), dtype=th.float64)
    result = conjugate_gradient(lambda v: matrix @ v, b, max_iterations=10 * n, residual_tol=1e-20)
    expected = th.linalg.solve(matrix, b)
    assert th.allclose(result.solution, expected, rtol=1e-6, atol=1e-8)
    # In exact arithmetic CG converges in at most n iterations
    assert result.iterations <= n + 2
    assert result.residual_norm == pytest.approx(th.linalg.norm(b - matrix @ result.solution).item(), abs=1e-8)


def test_stops_at_max_iterations_and_reports_residual() -> None:
    matrix = random_spd(50, 0, condition=1e4)
    b = th.ones(50, dtype=th.float64)
    result = conjugate_gradient(lambda v: matrix @ v, b, max_iterations=3)
    assert result.iterations == 3
    assert result.residual_norm == pytest.approx(th.linalg.norm(b - matrix @ result.solution).item(), rel=1e-6)
    assert result.residual_norm > 1e-3


def test_stops_on_tolerance() -> None:
    matrix = th.eye(5, dtype=th.float64) * 2.0
    result = conjugate_gradient(lambda v: matrix @ v, th.ones(5, dtype=th.float64), max_iterations=100)
    assert result.iterations == 1
    assert th.allclose(result.solution, th.full((5,), 0.5, dtype=th.float64))


def test_zero_right_hand_side_returns_zero() -> None:
    result = conjugate_gradient(lambda v: v, th.zeros(4), max_iterations=10)
    assert result.iterations == 0 and not result.solution.any()


@pytest.mark.parametrize("scale", [-1.0, 0.0, float("nan")])
def test_non_positive_curvature_stops_without_non_finite_values(scale: float) -> None:
    # Negative, zero (a singular Fisher matrix with cg_damping=0) or non-finite curvature along the first direction
    result = conjugate_gradient(lambda v: scale * v, th.ones(3), max_iterations=10)
    assert result.iterations == 0
    assert th.isfinite(result.solution).all() and result.residual_norm == pytest.approx(3**0.5)


def test_rejects_non_positive_iterations() -> None:
    with pytest.raises(ValueError, match="max_iterations"):
        conjugate_gradient(lambda v: v, th.ones(3), max_iterations=0)
