"""Trust Region Policy Optimization (Schulman et al., 2015), single-path sampling."""

from typing import Any, ClassVar

import numpy as np
import torch as th
from stable_baselines3.common.policies import ActorCriticPolicy, BasePolicy
from stable_baselines3.common.type_aliases import GymEnv

from sb3_trust.common.line_search import backtracking_line_search
from sb3_trust.common.natural_gradient import NaturalGradientAlgorithm, PolicyStep
from sb3_trust.common.surrogate import ImportanceSampledSurrogate
from sb3_trust.trpo.policies import CnnPolicy, MlpPolicy, MultiInputPolicy


class TRPO(NaturalGradientAlgorithm):
    """
    Trust Region Policy Optimization: the natural-gradient direction s = F⁻¹g, then a backtracking line search
    from the trust region's edge sqrt(2δ / sᵀFs) · s on the true surrogate and the true mean KL
    (Schulman et al., 2015, Sec. 6 and App. C).
    A step is kept only if the surrogate improves and the mean KL(π_old ‖ π_new) on the rollout is at most δ;
    otherwise the old parameters stay.

    Paper: https://arxiv.org/abs/1502.05477

    :param policy: The policy model to use (MlpPolicy, CnnPolicy, ...)
    :param env: The environment to learn from (if registered in Gym, can be str)
    :param line_search_shrinking_factor: ρ in (0, 1): each line-search step is ρ times the previous one
    :param line_search_max_iter: The maximum number of step sizes the line search tries
    :param kwargs: every other parameter is that of
        :class:`~sb3_trust.common.natural_gradient.NaturalGradientAlgorithm` (``learning_rate``, ``n_steps``,
        ``batch_size``, ``target_kl``, ``cg_max_steps``, ...), with the same defaults as sb3-contrib's TRPO
    """

    policy_aliases: ClassVar[dict[str, type[BasePolicy]]] = {
        "MlpPolicy": MlpPolicy,
        "CnnPolicy": CnnPolicy,
        "MultiInputPolicy": MultiInputPolicy,
    }

    def __init__(
        self,
        policy: str | type[ActorCriticPolicy],
        env: GymEnv | str,
        line_search_shrinking_factor: float = 0.8,
        line_search_max_iter: int = 10,
        **kwargs: Any,
    ):
        if not 0.0 < line_search_shrinking_factor < 1.0:
            raise ValueError(f"`line_search_shrinking_factor` must be in (0, 1), got {line_search_shrinking_factor}")
        if line_search_max_iter < 1:
            raise ValueError(f"`line_search_max_iter` must be at least 1, got {line_search_max_iter}")
        self.line_search_shrinking_factor = line_search_shrinking_factor
        self.line_search_max_iter = line_search_max_iter
        super().__init__(policy, env, **kwargs)

    def _take_step(
        self, surrogate: ImportanceSampledSurrogate, direction: th.Tensor, quadratic_form: float, objective_before: float
    ) -> PolicyStep:
        """
        Line search along s from the step that the quadratic KL model puts at the trust region's edge.

        :param surrogate: the surrogate of this update, frozen at θ_old
        :param direction: s ≈ (F + λI)⁻¹ g
        :param quadratic_form: sᵀ(F + λI)s
        :param objective_before: L(θ_old)
        :return: the accepted step, or a zero step when the line search failed
        """
        old_parameters = self._actor_parameters_vector()

        def evaluate(step_size: float) -> tuple[float, float]:
            candidate = old_parameters + step_size * direction
            if not bool(th.isfinite(candidate).all()):
                return float("nan"), float("nan")
            self._set_actor_parameters(candidate)
            with th.no_grad():
                evaluation = surrogate.evaluate()
            return evaluation.objective.item(), evaluation.kl.item()

        result = backtracking_line_search(
            evaluate,
            self._max_step_size(quadratic_form),
            objective_before,
            self.target_kl,
            self.line_search_shrinking_factor,
            self.line_search_max_iter,
        )
        self.logger.record("train/line_search_steps", result.n_evaluations)
        self.logger.record("train/is_line_search_success", float(result.accepted))
        if not result.accepted:
            self._set_actor_parameters(old_parameters)
            return PolicyStep(0.0, 0.0, 0.0, result.n_evaluations, False)
        gain = result.objective - objective_before
        return PolicyStep(result.step_size, result.kl, float(np.float64(gain)), result.n_evaluations, True)
