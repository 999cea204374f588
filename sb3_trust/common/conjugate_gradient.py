"""Conjugate gradient for the natural-gradient system F s = g (Schulman et al., 2015, App. C)."""

from collections.abc import Callable
from typing import NamedTuple

import torch as th


class ConjugateGradientResult(NamedTuple):
    """
    Outcome of a conjugate-gradient solve.

    :param solution: the approximate solution x of A x = b
    :param iterations: number of completed iterations (one matrix-vector product each)
    :param residual_norm: Euclidean norm of the final residual b - A x
    """

    solution: th.Tensor
    iterations: int
    residual_norm: float


def conjugate_gradient(
    matrix_vector_product: Callable[[th.Tensor], th.Tensor],
    b: th.Tensor,
    max_iterations: int,
    residual_tol: float = 1e-10,
) -> ConjugateGradientResult:
    """
    Solve A x = b for a symmetric positive definite A known only through products A v.

    The loop stops when the squared residual norm falls below ``residual_tol`` or after ``max_iterations``
    products, whichever comes first (Hestenes-Stiefel, starting from x = 0).

    :param matrix_vector_product: function returning A v for a flat vector v
    :param b: right-hand side, a flat vector
    :param max_iterations: maximum number of iterations (matrix-vector products)
    :param residual_tol: tolerance on the squared residual norm
    :return: the solution with the iteration count and the final residual norm
    """
    if max_iterations < 1:
        raise ValueError(f"max_iterations must be positive, got {max_iterations}")
    x = th.zeros_like(b)
    residual = b.clone()
    direction = b.clone()
    residual_sq = th.dot(residual, residual)
    iterations = 0
    while iterations < max_iterations and residual_sq.item() > residual_tol:
        a_direction = matrix_vector_product(direction)
        curvature = th.dot(direction, a_direction)
        if not curvature.item() > 0.0:
            # A is not positive definite along this direction (or the product is non-finite): stop here
            break
        alpha = residual_sq / curvature
        x += alpha * direction
        residual -= alpha * a_direction
        new_residual_sq = th.dot(residual, residual)
        direction = residual + (new_residual_sq / residual_sq) * direction
        residual_sq = new_residual_sq
        iterations += 1
    return ConjugateGradientResult(x, iterations, float(residual_sq.sqrt().item()))
