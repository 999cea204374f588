"""Trust Region Policy Optimization (Schulman et al., 2015), single-path and vine sampling."""

import math
from typing import Any, ClassVar

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.policies import ActorCriticPolicy, BasePolicy
from stable_baselines3.common.type_aliases import GymEnv, RolloutBufferSamples, Schedule
from stable_baselines3.common.utils import obs_as_tensor
from stable_baselines3.common.vec_env import VecEnv

from sb3_trust.common.checks import check_integer, check_open_unit_interval
from sb3_trust.common.distributions import COMMON_NOISE_DISTRIBUTIONS
from sb3_trust.common.line_search import backtracking_line_search
from sb3_trust.common.natural_gradient import NaturalGradientAlgorithm, PolicyStep
from sb3_trust.common.on_policy import index_observations
from sb3_trust.common.snapshots import EnvSnapshot, snapshot_env
from sb3_trust.common.surrogate import Surrogate, VineSurrogate
from sb3_trust.common.vine import (
    BranchEnvPool,
    VineBatch,
    branch_rollouts,
    branchable_envs,
    check_vine_env,
    stack_observations,
)
from sb3_trust.trpo.policies import CnnPolicy, MlpPolicy, MultiInputPolicy


class TRPO(NaturalGradientAlgorithm):
    """
    Trust Region Policy Optimization: the natural-gradient direction s = F⁻¹g, then a backtracking line search
    from the trust region's edge sqrt(2δ / sᵀFs) · s on the true surrogate and the true mean KL
    (Schulman et al., 2015, Sec. 6 and App. C), F damped to F + λI (``cg_damping``) in both, as in sb3-contrib.
    A step is kept only if the surrogate improves and the mean KL(π_old ‖ π_new) on the rollout is at most δ;
    otherwise the old parameters stay. The surrogate's samples are the rollout's (single path) or, with
    ``sampling="vine"``, Q-values of branch rollouts from saved environment states (Sec. 5.2 of the paper).

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
    :param sampling: Where the policy gradient's samples come from: ``"single_path"`` (the rollout's actions and GAE
        advantages) or ``"vine"`` (Sec. 5.2 of the paper: ``vine_n_states`` states of the rollout, the *rollout set*,
        are saved as the rollout passes them; from each, ``vine_n_actions`` branch rollouts of at most
        ``vine_horizon`` steps with common random numbers estimate Q of as many actions). Vine sampling needs the
        environments in this process (a ``DummyVecEnv``, optionally inside ``VecNormalize``, ``VecTransposeImage`` or
        ``VecMonitor``) whose states it can save (:mod:`sb3_trust.common.snapshots`); ``learn()``'s timesteps count
        the rollout's steps, not the branches' (``rollout/vine_env_steps``)
    :param vine_n_states: Size of the rollout set (vine sampling): states drawn uniformly without replacement from
        each rollout
    :param vine_n_actions: Number of actions K per state of the rollout set (vine sampling): drawn from the current
        policy, except for a ``Discrete`` space of at most K actions, whose every action is taken once (Eq. 32)
    :param vine_horizon: The most steps of a branch rollout (vine sampling), its first action included; one that has
        not terminated by then is completed by the critic's value of its last state
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
        sampling: str = "single_path",
        vine_n_states: int = 64,
        vine_n_actions: int = 4,
        vine_horizon: int = 100,
        _init_setup_model: bool = True,
    ):
        self.line_search_shrinking_factor = line_search_shrinking_factor
        self.line_search_max_iter = line_search_max_iter
        self.sampling = sampling
        self.vine_n_states = vine_n_states
        self.vine_n_actions = vine_n_actions
        self.vine_horizon = vine_horizon
        # The rollout set of the current rollout: the environments to save at each step, and (step, environment
        # index) ↦ the environment saved there with its observation as the rollout buffer holds it
        self._vine_schedule: dict[int, list[int]] = {}
        self._vine_snapshots: dict[tuple[int, int], tuple[EnvSnapshot, Any]] = {}
        self._vine_batch: VineBatch | None = None
        self._vine_pool = BranchEnvPool()
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
        if self.sampling not in ("single_path", "vine"):
            raise ValueError(f"`sampling` must be 'single_path' or 'vine', got {self.sampling!r}")
        if self.sampling == "vine":
            check_integer(1, vine_n_states=self.vine_n_states, vine_horizon=self.vine_horizon)
            # One action per state gives a zero gradient: Eq. 33's weights are then 1 whatever θ
            check_integer(2, vine_n_actions=self.vine_n_actions)
            if self.use_sde:
                raise ValueError("Vine sampling draws common random numbers, which gSDE's exploration matrix does not take")

    def _check_rollout_size(self) -> None:
        super()._check_rollout_size()
        if self.sampling == "vine" and self.env is not None:
            check_vine_env(self.env)
            if self.vine_n_states > self.n_steps * self.env.num_envs:
                raise ValueError(
                    f"`vine_n_states` ({self.vine_n_states}) exceeds the rollout size n_steps * n_envs "
                    f"= {self.n_steps * self.env.num_envs}: the rollout set is drawn from the rollout's states"
                )

    def _setup_model(self) -> None:
        super()._setup_model()
        if self.sampling == "vine" and not isinstance(self.policy.action_dist, COMMON_NOISE_DISTRIBUTIONS):
            raise ValueError(
                f"Vine sampling draws the branches' actions with common random numbers, for the distributions "
                f"{[cls.__name__ for cls in COMMON_NOISE_DISTRIBUTIONS]}; the policy's is "
                f"{type(self.policy.action_dist).__name__}"
            )

    def collect_rollouts(
        self, env: VecEnv, callback: BaseCallback, rollout_buffer: RolloutBuffer, n_rollout_steps: int
    ) -> bool:
        """
        SB3's rollout. With vine sampling, the rollout set is drawn first, its states are saved as the rollout
        passes them, and once the rollout is complete the branches estimate the Q-values of the update.

        :param env: the training environment
        :param callback: called at every step, and at the start and the end of the rollout, as in SB3
        :param rollout_buffer: the buffer to fill
        :param n_rollout_steps: the number of steps to collect per environment
        :return: whether the rollout is complete (False when a callback stopped it)
        """
        self._vine_schedule, self._vine_snapshots, self._vine_batch = {}, {}, None
        if self.sampling != "vine":
            return super().collect_rollouts(env, callback, rollout_buffer, n_rollout_steps)
        # From NumPy's generator (seeded by SB3 as torch's is): the rollout draws its actions from torch's, which the
        # rollout set leaves as single-path sampling would
        chosen = np.random.choice(n_rollout_steps * env.num_envs, self.vine_n_states, replace=False).tolist()
        for step, env_index in sorted(divmod(index, env.num_envs) for index in chosen):
            self._vine_schedule.setdefault(step, []).append(env_index)
        complete = super().collect_rollouts(env, callback, rollout_buffer, n_rollout_steps)
        if complete:
            self._vine_batch = self._run_branches(env)
        self._vine_snapshots = {}
        return complete

    def _before_env_step(self, n_steps: int) -> None:
        if n_steps not in self._vine_schedule:
            return
        assert self.env is not None and self._last_obs is not None
        vec_env, _ = branchable_envs(self.env)
        obs = self._last_obs
        for env_index in self._vine_schedule[n_steps]:
            # The state's observation as the rollout buffer holds it (normalized by VecNormalize)
            row = {key: value[env_index] for key, value in obs.items()} if isinstance(obs, dict) else obs[env_index]
            self._vine_snapshots[(n_steps, env_index)] = (snapshot_env(vec_env.envs[env_index]), row)

    def _run_branches(self, env: VecEnv) -> VineBatch:
        """
        The branch rollouts from the rollout set's saved states (Sec. 5.2 of the paper): K first actions per state,
        from the current policy, or every action once for a ``Discrete`` space of at most K actions (Eq. 32).

        :param env: the training environment
        :return: the rollout set's states, actions and Q-value estimates
        """
        vec_env, transforms = branchable_envs(env)
        saved = list(self._vine_snapshots.items())
        states = obs_as_tensor(stack_observations([row for _, (_, row) in saved]), self.device)
        n_states = len(saved)
        action_space = self.action_space
        with th.no_grad():
            if isinstance(action_space, spaces.Discrete) and action_space.n <= self.vine_n_actions:
                n_actions = int(action_space.n)
                actions = th.arange(n_actions, device=self.device).repeat(n_states)
                proposal_log_prob = th.full((n_states, n_actions), -math.log(n_actions), device=self.device)
            else:
                n_actions = self.vine_n_actions
                branch_states = index_observations(states, th.arange(n_states).repeat_interleave(n_actions))
                distribution = self.policy.get_distribution(branch_states)
                actions = distribution.sample()
                proposal_log_prob = distribution.log_prob(actions).view(n_states, n_actions)
        branch_envs = self._vine_pool.restored(
            vec_env, [(env_index, snapshot) for (_, env_index), (snapshot, _) in saved], n_actions
        )
        generator = th.Generator(device=self.device).manual_seed(int(th.randint(2**62, (1,)).item()))
        result = branch_rollouts(
            self.policy, branch_envs, actions, n_actions, self.vine_horizon, self.gamma, transforms, generator
        )
        self.logger.record("rollout/vine_env_steps", result.env_steps)
        return VineBatch(states, actions, proposal_log_prob, result.q_values)

    def _build_surrogate(self, samples: RolloutBufferSamples) -> Surrogate:
        """
        The single-path surrogate, or with vine sampling the surrogate of Eq. 33 (Eq. 32) on the rollout set.

        :param samples: the whole rollout
        :return: the surrogate, frozen at the current policy
        """
        if self.sampling != "vine":
            return super()._build_surrogate(samples)
        batch = self._vine_batch
        assert batch is not None, "vine sampling: train() needs the branches of a complete rollout"
        return VineSurrogate(
            self.policy,
            samples.observations,
            batch.states,
            batch.actions,
            batch.q_values,
            batch.proposal_log_prob,
            self.normalize_advantage,
        )

    def _take_step(
        self, surrogate: Surrogate, direction: th.Tensor, max_step_size: float, objective_before: float
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

    def _excluded_save_params(self) -> list[str]:
        return [*super()._excluded_save_params(), "_vine_schedule", "_vine_snapshots", "_vine_batch", "_vine_pool"]

    def _record_step(self, step: PolicyStep) -> None:
        """
        Log what the step rule did, with the line search's number of evaluations and its outcome.

        :param step: the step taken, or the zero step of a skipped update
        """
        super()._record_step(step)
        self.logger.record("train/line_search_steps", step.line_search_steps)
        self.logger.record("train/is_line_search_success", float(step.accepted))
