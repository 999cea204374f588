"""Trust Region Policy Optimization (Schulman et al., 2015), single-path sampling."""

from typing import Any, ClassVar

import torch as th
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.policies import ActorCriticPolicy, BasePolicy
from stable_baselines3.common.type_aliases import GymEnv, Schedule

from sb3_trust.common.checks import check_integer, check_open_unit_interval
from sb3_trust.common.line_search import backtracking_line_search
from sb3_trust.common.natural_gradient import NaturalGradientAlgorithm, PolicyStep
from sb3_trust.common.surrogate import ImportanceSampledSurrogate
from sb3_trust.trpo.policies import CnnPolicy, MlpPolicy, MultiInputPolicy


class TRPO(NaturalGradientAlgorithm):
    """
    Trust Region Policy Optimization: the natural-gradient direction s = F⁻¹g, then a backtracking line search
    from the trust region's edge sqrt(2δ / sᵀFs) · s on the true surrogate and the true mean KL
    (Schulman et al., 2015, Sec. 6 and App. C), F damped to F + λI (``cg_damping``) in both, as in sb3-contrib.
    A step is kept only if the surrogate improves and the mean KL(π_old ‖ π_new) on the rollout is at most δ;
    otherwise the old parameters stay.

    Paper: https://arxiv.org/abs/1502.05477

    The parameters, their order and their defaults are sb3-contrib's TRPO's, with ``cg_tolerance`` added before
    ``_init_setup_model``. One difference of scale: ``target_kl`` bounds the KL of the joint action distribution,
    where sb3-contrib averages the KL over the d action dimensions (``Box`` and ``MultiBinary`` actions), so
    sb3-contrib's ``target_kl`` and ``cg_damping`` times d give its update here (the settings in ``zoo_configs/`` are
    scaled so).

    :param policy: The policy model to use (MlpPolicy, CnnPolicy, ...)
    :param env: The environment to learn from (if registered in Gym, can be str)
    :param learning_rate: The learning rate of the critic's optimizer (the actor's step is set by ``target_kl``);
        it can be a function of the current progress remaining (from 1 to 0)
    :param n_steps: The number of steps to run for each environment per update
        (i.e. rollout buffer size is n_steps * n_envs where n_envs is number of environment copies running in parallel)
    :param batch_size: Minibatch size of the critic's regression
    :param gamma: Discount factor
    :param cg_max_steps: Maximum number of conjugate-gradient iterations for F⁻¹ g
    :param cg_damping: Damping λ added to the Fisher matrix (F + λI) in the conjugate gradient
    :param line_search_shrinking_factor: ρ in (0, 1): each line-search step is ρ times the previous one
    :param line_search_max_iter: The maximum number of step sizes the line search tries
    :param n_critic_updates: Number of epochs of critic regression per rollout
    :param gae_lambda: Factor for trade-off of bias vs variance for Generalized Advantage Estimator
    :param use_sde: Whether to use generalized State Dependent Exploration (gSDE)
        instead of action noise exploration (default: False)
    :param sde_sample_freq: Sample a new noise matrix every n steps when using gSDE
        Default: -1 (only sample at the beginning of the rollout)
    :param rollout_buffer_class: Rollout buffer class to use. If ``None``, it will be automatically selected.
    :param rollout_buffer_kwargs: Keyword arguments to pass to the rollout buffer on creation
    :param normalize_advantage: Whether to normalize the advantages over the rollout
    :param target_kl: The trust region δ: the line search keeps a step only if the mean KL(π_old ‖ π_new) on the
        rollout (of the joint action distribution, summed over the action dimensions) is at most δ
    :param sub_sampling_factor: Compute the Fisher-vector products on a random 1/k of the rollout
        (k = 1 uses it all); the gradient and the KL checks always use the whole rollout
    :param stats_window_size: Window size for the rollout logging, specifying the number of episodes to average
        the reported success rate, mean episode length, and mean reward over
    :param tensorboard_log: the log location for tensorboard (if None, no logging)
    :param policy_kwargs: additional arguments to be passed to the policy on creation
    :param verbose: the verbosity level: 0 no output, 1 info, 2 debug
    :param seed: Seed for the pseudo random generators
    :param device: Device (cpu, cuda, ...) on which the code should be run.
        Setting it to auto, the code will be run on the GPU if possible.
    :param cg_tolerance: The conjugate gradient stops once the squared residual norm ‖g - (F + λI)s‖² is below
        this (an absolute tolerance, as sb3-contrib's); an update whose gradient has ‖g‖² at or below it is skipped
    :param _init_setup_model: Whether or not to build the network at the creation of the instance
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
        learning_rate: float | Schedule = 1e-3,
        n_steps: int = 2048,
        batch_size: int = 128,
        gamma: float = 0.99,
        cg_max_steps: int = 15,
        cg_damping: float = 0.1,
        line_search_shrinking_factor: float = 0.8,
        line_search_max_iter: int = 10,
        n_critic_updates: int = 10,
        gae_lambda: float = 0.95,
        use_sde: bool = False,
        sde_sample_freq: int = -1,
        rollout_buffer_class: type[RolloutBuffer] | None = None,
        rollout_buffer_kwargs: dict[str, Any] | None = None,
        normalize_advantage: bool = True,
        target_kl: float = 0.01,
        sub_sampling_factor: int = 1,
        stats_window_size: int = 100,
        tensorboard_log: str | None = None,
        policy_kwargs: dict[str, Any] | None = None,
        verbose: int = 0,
        seed: int | None = None,
        device: th.device | str = "auto",
        cg_tolerance: float = 1e-10,
        _init_setup_model: bool = True,
    ):
        self.line_search_shrinking_factor = line_search_shrinking_factor
        self.line_search_max_iter = line_search_max_iter
        super().__init__(
            policy,
            env,
            learning_rate=learning_rate,
            n_steps=n_steps,
            batch_size=batch_size,
            gamma=gamma,
            cg_max_steps=cg_max_steps,
            cg_damping=cg_damping,
            n_critic_updates=n_critic_updates,
            gae_lambda=gae_lambda,
            use_sde=use_sde,
            sde_sample_freq=sde_sample_freq,
            rollout_buffer_class=rollout_buffer_class,
            rollout_buffer_kwargs=rollout_buffer_kwargs,
            normalize_advantage=normalize_advantage,
            target_kl=target_kl,
            sub_sampling_factor=sub_sampling_factor,
            stats_window_size=stats_window_size,
            tensorboard_log=tensorboard_log,
            policy_kwargs=policy_kwargs,
            verbose=verbose,
            seed=seed,
            device=device,
            cg_tolerance=cg_tolerance,
            _init_setup_model=_init_setup_model,
        )

    def _check_hyperparameters(self) -> None:
        super()._check_hyperparameters()
        check_open_unit_interval(line_search_shrinking_factor=self.line_search_shrinking_factor)
        check_integer(1, line_search_max_iter=self.line_search_max_iter)

    def _take_step(
        self, surrogate: ImportanceSampledSurrogate, direction: th.Tensor, max_step_size: float, objective_before: float
    ) -> PolicyStep:
        """
        Line search along s from the step that the quadratic KL model puts at the trust region's edge.

        :param surrogate: the surrogate of this update, frozen at θ_old
        :param direction: s ≈ (F + λI)⁻¹ g
        :param max_step_size: α = sqrt(2δ / sᵀ(F + λI)s), the first step size tried
        :param objective_before: L(θ_old)
        :return: the accepted step, or a zero step when the line search failed
        """
        old_parameters = self._actor_parameters_vector()

        result = backtracking_line_search(
            lambda step_size: self._evaluate_trial(surrogate, old_parameters + step_size * direction),
            max_step_size,
            objective_before,
            self.target_kl,
            self.line_search_shrinking_factor,
            self.line_search_max_iter,
        )
        if not result.accepted:
            self._set_actor_parameters(old_parameters)
            return PolicyStep(0.0, 0.0, 0.0, result.n_evaluations, False)
        return PolicyStep(result.step_size, result.kl, result.objective - objective_before, result.n_evaluations, True)

    def _record_step(self, step: PolicyStep) -> None:
        """
        Log what the step rule did, with the line search's number of evaluations and its outcome.

        :param step: the step taken, or the zero step of a skipped update
        """
        super()._record_step(step)
        self.logger.record("train/line_search_steps", step.line_search_steps)
        self.logger.record("train/is_line_search_success", float(step.accepted))
