"""Backtracking line search on the true surrogate and the true KL (Schulman et al., 2015, App. C)."""

from collections.abc import Callable
from typing import NamedTuple

import numpy as np


class LineSearchResult(NamedTuple):
    """
    :param step_size: the accepted step size (the last one tried when nothing was accepted)
    :param objective: the surrogate at that step size
    :param kl: the mean KL at that step size
    :param n_evaluations: number of step sizes tried
    :param accepted: whether a step size met both conditions
    """

    step_size: float
    objective: float
    kl: float
    n_evaluations: int
    accepted: bool


def backtracking_line_search(
    evaluate: Callable[[float], tuple[float, float]],
    max_step_size: float,
    objective_before: float,
    max_kl: float,
    shrinking_factor: float,
    max_iterations: int,
) -> LineSearchResult:
    """
    Try α, ρα, ρ²α, ... and accept the first step size whose surrogate improves on ``objective_before`` while
    its mean KL stays within ``max_kl`` (the objective L(θ) - 𝟙[KL > δ]·∞ of the TRPO paper).

    :param evaluate: maps a step size to (surrogate objective, mean KL) at θ_old + step size · direction
    :param max_step_size: α, the first step size tried
    :param objective_before: the surrogate at θ_old
    :param max_kl: δ
    :param shrinking_factor: ρ in (0, 1)
    :param max_iterations: number of step sizes to try at most
    :return: the outcome
    """
    step_size = max_step_size
    objective, kl = objective_before, 0.0
    for evaluation in range(1, max_iterations + 1):
        objective, kl = evaluate(step_size)
        if np.isfinite(objective) and np.isfinite(kl) and kl <= max_kl and objective > objective_before:
            return LineSearchResult(step_size, objective, kl, evaluation, True)
        if evaluation < max_iterations:
            step_size *= shrinking_factor
    return LineSearchResult(step_size, objective, kl, max_iterations, False)
