"""Natural Policy Gradient (Kakade, 2001) with a KL-sized step."""

import math
from typing import ClassVar

import torch as th
from stable_baselines3.common.policies import BasePolicy

from sb3_trust.common.natural_gradient import NaturalGradientAlgorithm, PolicyStep
from sb3_trust.common.surrogate import Surrogate
from sb3_trust.npg.policies import CnnPolicy, MlpPolicy, MultiInputPolicy


class NPG(NaturalGradientAlgorithm):
    """
    Natural Policy Gradient: θ ← θ + sqrt(2δ / sᵀFs) · s with s = F⁻¹g solved by conjugate gradient, F damped
    to F + λI (``cg_damping``) in both, as in sb3-contrib's TRPO.

    The step is the closed-form solution of the linear-quadratic trust-region problem (Kakade, 2001; Schulman,
    "Advanced Policy Gradient Methods", 2017). Unlike TRPO there is no line search, so nothing enforces the realised
    KL. The step is sized with the damped quadratic form, which over-estimates the KL, so in practice the realised KL
    is below δ (about 0.5-0.7δ with the RL Zoo's MuJoCo settings, docs/benchmarks.md); it can exceed δ where the
    quadratic model is poor.

    The constructor's parameters are those of :class:`~sb3_trust.common.natural_gradient.NaturalGradientAlgorithm`;
    ``target_kl`` is the δ the quadratic model of the mean KL(π_old ‖ π_new) is sized to.
    """

    policy_aliases: ClassVar[dict[str, type[BasePolicy]]] = {
        "MlpPolicy": MlpPolicy,
        "CnnPolicy": CnnPolicy,
        "MultiInputPolicy": MultiInputPolicy,
    }

    def _take_step(
        self, surrogate: Surrogate, direction: th.Tensor, max_step_size: float, objective_before: float
    ) -> PolicyStep:
        """
        The closed-form natural-gradient step θ ← θ_old + sqrt(2δ / sᵀFs) · s.

        :param surrogate: the surrogate of this update, frozen at θ_old
        :param direction: s ≈ (F + λI)⁻¹ g
        :param max_step_size: α = sqrt(2δ / sᵀ(F + λI)s)
        :param objective_before: L(θ_old)
        :return: the step taken, with its realised KL and surrogate gain; the zero step when the new policy's KL
            or surrogate is not finite (e.g. a standard deviation that overflowed or underflowed), which is undone
        """
        old_parameters = self._actor_parameters_vector()
        objective, kl = self._evaluate_trial(surrogate, old_parameters + max_step_size * direction)
        if not (math.isfinite(kl) and math.isfinite(objective)):
            self._set_actor_parameters(old_parameters)
            self._skip_update("the new policy's KL or surrogate is not finite")
            return PolicyStep(0.0, 0.0, 0.0, 0, False)
        return PolicyStep(max_step_size, kl, objective - objective_before, 0, True)
