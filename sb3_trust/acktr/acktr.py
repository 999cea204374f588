"""ACKTR: actor-critic with a Kronecker-factored trust region (Wu et al., 2017)."""

from typing import Any, ClassVar, TypeVar

import torch as th
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.policies import ActorCriticPolicy, BasePolicy
from stable_baselines3.common.type_aliases import GymEnv, MaybeCallback, Schedule
from stable_baselines3.common.utils import explained_variance
from torch.nn import functional as F

from sb3_trust.acktr.policies import CnnPolicy, MlpPolicy, MultiInputPolicy
from sb3_trust.common.checks import (
    check_integer,
    check_momentum,
    check_non_negative,
    check_open_unit_interval,
    check_positive,
    check_positive_or_infinite,
)
from sb3_trust.common.distributions import sample_independently
from sb3_trust.common.kfac import KFAC
from sb3_trust.common.on_policy import (
    SUPPORTED_ACTION_SPACES,
    TrustOnPolicyAlgorithm,
    distribution_actions,
    normalized_advantages,
)
from sb3_trust.common.policies import values_and_distribution

SelfACKTR = TypeVar("SelfACKTR", bound="ACKTR")


class ACKTR(TrustOnPolicyAlgorithm):
    """
    Actor Critic using Kronecker-Factored Trust Region: A2C's loss minimised with K-FAC instead of RMSprop.

    Each rollout gives one update of ``policy_loss + vf_coef·value_loss + ent_coef·entropy_loss`` (A2C's loss) by
    ``sb3_trust.common.kfac.KFAC``: a natural-gradient step preconditioned by a Kronecker-factored Fisher of the
    joint model (the policy and a Gaussian around the value prediction), scaled so its quadratic KL stays below
    ``kfac_kl_clip``. The Fisher statistics come from the *sampled* Fisher loss
    ``-mean log π(â|s) + vf_fisher_coef·mean((v(s) - ŷ)²)`` with ``â ~ π(·|s)`` and ŷ = stopgrad(v(s) + N(0, 1)),
    backpropagated to the layers' outputs only (``KFAC.backward``).
    As in baselines, the value term's per-sample score is 2·vf_fisher_coef·ε (ε ~ N(0, 1)): the value head's
    Fisher is that of a unit-variance Gaussian weighted by (2·vf_fisher_coef)².

    Paper: https://arxiv.org/abs/1708.05144

    :param policy: The policy model to use (MlpPolicy, CnnPolicy, ...)
    :param env: The environment to learn from (if registered in Gym, can be str)
    :param learning_rate: K-FAC's learning rate (the step length before the trust-region scale); it can be a
        function of the current progress remaining (from 1 to 0). Paper/baselines: 0.25
    :param n_steps: The number of steps to run for each environment per update
        (i.e. rollout buffer size is n_steps * n_envs where n_envs is number of environment copies running in parallel)
    :param gamma: Discount factor
    :param gae_lambda: Factor for trade-off of bias vs variance for Generalized Advantage Estimator;
        1.0 (default) gives the n-step returns of A2C and the paper
    :param ent_coef: Entropy coefficient for the loss calculation
    :param vf_coef: Value function coefficient for the loss calculation (stable-baselines 2's 0.25; baselines: 0.5)
    :param max_grad_norm: The maximum global norm of the gradient (weight decay included), clipped by K-FAC before
        preconditioning
    :param vf_fisher_coef: Weight of the value head's term in the Fisher loss
    :param normalize_advantage: Whether to normalize or not the advantage (off by default, as A2C)
    :param kfac_kl_clip: Trust region radius: bound on the quadratic KL ½·lr²·ν²·ΔᵀF̂Δ of each step (ν ≤ 1: the
        trust-region scale)
    :param kfac_damping: λ, Tikhonov damping of the Fisher blocks (split between the two factors by π)
    :param kfac_stat_decay: Decay of the running averages of the Kronecker factors, in (0, 1)
    :param kfac_inverse_update_freq: The factors are eigendecomposed every this many updates
    :param kfac_cold_iters: Number of first updates done with the raw gradient (lr/3, same momentum, no trust
        region) while the statistics warm up.
        Default 0: the running averages are debiased (the first ones are plain means of the updates so far), so
        K-FAC's curvature is usable from the first update; baselines uses 10 with zero-initialised statistics.
    :param kfac_momentum: Momentum of the scaled K-FAC step (baselines: 0.9)
    :param kfac_weight_decay: L2 coefficient added to the gradient before preconditioning
    :param use_sde: Whether to use generalized State Dependent Exploration (gSDE)
        instead of action noise exploration (default: False)
    :param sde_sample_freq: Sample a new noise matrix every n steps when using gSDE
        Default: -1 (only sample at the beginning of the rollout)
    :param rollout_buffer_class: Rollout buffer class to use. If ``None``, it will be automatically selected.
    :param rollout_buffer_kwargs: Keyword arguments to pass to the rollout buffer on creation.
    :param stats_window_size: Window size for the rollout logging, specifying the number of episodes to average
        the reported success rate, mean episode length, and mean reward over
    :param tensorboard_log: the log location for tensorboard (if None, no logging)
    :param policy_kwargs: additional arguments to be passed to the policy on creation (the policy's own optimizer is
        replaced by K-FAC)
    :param verbose: the verbosity level: 0 no output, 1 info, 2 debug
    :param seed: Seed for the pseudo random generators
    :param device: Device (cpu, cuda, ...) on which the code should be run.
        Setting it to auto, the code will be run on the GPU if possible.
    :param _init_setup_model: Whether or not to build the network at the creation of the instance
    """

    policy_aliases: ClassVar[dict[str, type[BasePolicy]]] = {
        "MlpPolicy": MlpPolicy,
        "CnnPolicy": CnnPolicy,
        "MultiInputPolicy": MultiInputPolicy,
    }
    policy: ActorCriticPolicy

    def __init__(
        self,
        policy: str | type[ActorCriticPolicy],
        env: GymEnv | str,
        learning_rate: float | Schedule = 0.25,
        n_steps: int = 20,
        gamma: float = 0.99,
        gae_lambda: float = 1.0,
        ent_coef: float = 0.01,
        vf_coef: float = 0.25,
        max_grad_norm: float = 0.5,
        vf_fisher_coef: float = 1.0,
        normalize_advantage: bool = False,
        kfac_kl_clip: float = 0.001,
        kfac_damping: float = 0.01,
        kfac_stat_decay: float = 0.99,
        kfac_inverse_update_freq: int = 10,
        kfac_cold_iters: int = 0,
        kfac_momentum: float = 0.9,
        kfac_weight_decay: float = 0.0,
        use_sde: bool = False,
        sde_sample_freq: int = -1,
        rollout_buffer_class: type[RolloutBuffer] | None = None,
        rollout_buffer_kwargs: dict[str, Any] | None = None,
        stats_window_size: int = 100,
        tensorboard_log: str | None = None,
        policy_kwargs: dict[str, Any] | None = None,
        verbose: int = 0,
        seed: int | None = None,
        device: th.device | str = "auto",
        _init_setup_model: bool = True,
    ):
        super().__init__(
            policy,
            env,
            learning_rate=learning_rate,
            n_steps=n_steps,
            gamma=gamma,
            gae_lambda=gae_lambda,
            ent_coef=ent_coef,
            vf_coef=vf_coef,
            max_grad_norm=max_grad_norm,
            use_sde=use_sde,
            sde_sample_freq=sde_sample_freq,
            rollout_buffer_class=rollout_buffer_class,
            rollout_buffer_kwargs=rollout_buffer_kwargs,
            stats_window_size=stats_window_size,
            tensorboard_log=tensorboard_log,
            policy_kwargs=policy_kwargs,
            verbose=verbose,
            device=device,
            seed=seed,
            _init_setup_model=False,
            supported_action_spaces=SUPPORTED_ACTION_SPACES,
        )
        self.vf_fisher_coef = vf_fisher_coef
        self.normalize_advantage = normalize_advantage
        self.kfac_kl_clip = kfac_kl_clip
        self.kfac_damping = kfac_damping
        self.kfac_stat_decay = kfac_stat_decay
        self.kfac_inverse_update_freq = kfac_inverse_update_freq
        self.kfac_cold_iters = kfac_cold_iters
        self.kfac_momentum = kfac_momentum
        self.kfac_weight_decay = kfac_weight_decay

        self._check_hyperparameters()
        if _init_setup_model:
            self._setup_model()

    def _check_hyperparameters(self) -> None:
        super()._check_hyperparameters()
        check_positive(kfac_kl_clip=self.kfac_kl_clip, kfac_damping=self.kfac_damping, vf_fisher_coef=self.vf_fisher_coef)
        check_positive_or_infinite(max_grad_norm=self.max_grad_norm)
        if not callable(self.learning_rate):
            # 0 is allowed, as in SB3 (rl-zoo3's enjoy loads every model with it)
            check_non_negative(learning_rate=self.learning_rate)
        check_open_unit_interval(kfac_stat_decay=self.kfac_stat_decay)
        check_momentum(kfac_momentum=self.kfac_momentum)
        check_integer(1, kfac_inverse_update_freq=self.kfac_inverse_update_freq)
        check_integer(0, kfac_cold_iters=self.kfac_cold_iters)
        check_non_negative(kfac_weight_decay=self.kfac_weight_decay)

    def _setup_model(self) -> None:
        super()._setup_model()
        self._build_kfac()

    def _build_kfac(self) -> None:
        """
        K-FAC replaces the policy's optimizer, so SB3 saves its statistics (policy.optimizer.pth) and restores them.
        """
        self.policy.optimizer = KFAC(
            self.policy,
            lr=self.lr_schedule(1),
            momentum=self.kfac_momentum,
            damping=self.kfac_damping,
            kl_clip=self.kfac_kl_clip,
            stat_decay=self.kfac_stat_decay,
            inverse_update_freq=self.kfac_inverse_update_freq,
            cold_iters=self.kfac_cold_iters,
            weight_decay=self.kfac_weight_decay,
            max_grad_norm=self.max_grad_norm,
        )

    def _synced_kfac(self) -> KFAC:
        """
        The policy's K-FAC, with the model's current settings.

        :return: the optimizer; a new one when the policy's is not a K-FAC over its parameters (a policy assigned to
            ``model.policy`` trains, as with SB3's algorithms)
        """
        optimizer = self.policy.optimizer
        policy_parameters = {id(param) for param in self.policy.parameters()}
        if not isinstance(optimizer, KFAC) or any(
            id(param) not in policy_parameters for param in optimizer.param_groups[0]["params"]
        ):
            self._build_kfac()
            optimizer = self.policy.optimizer
            assert isinstance(optimizer, KFAC)
        # The model's settings win over those a loaded optimizer state brought back (load(..., custom_objects=...)),
        # and a setting changed on the model applies from the next update, as in SB3's A2C
        optimizer.param_groups[0].update(
            damping=self.kfac_damping,
            kl_clip=self.kfac_kl_clip,
            momentum=self.kfac_momentum,
            weight_decay=self.kfac_weight_decay,
        )
        optimizer.stat_decay = self.kfac_stat_decay
        optimizer.inverse_update_freq = self.kfac_inverse_update_freq
        optimizer.cold_iters = self.kfac_cold_iters
        optimizer.max_grad_norm = self.max_grad_norm
        return optimizer

    def learn(
        self: SelfACKTR,
        total_timesteps: int,
        callback: MaybeCallback = None,
        log_interval: int = 100,
        tb_log_name: str = "ACKTR",
        reset_num_timesteps: bool = True,
        progress_bar: bool = False,
    ) -> SelfACKTR:
        """
        Train the model; the arguments are SB3's ``learn()``'s, with A2C's ``log_interval`` of 100: an update is
        one short rollout, as in A2C, so logging every one would flood the output.

        :param total_timesteps: number of environment steps to train for (a lower bound: the last rollout is
            completed)
        :param callback: callback(s) called at every step, as in SB3
        :param log_interval: number of updates (rollouts) between two dumps of the logger
        :param tb_log_name: the run's name in TensorBoard
        :param reset_num_timesteps: whether to count steps from 0 again (False continues an earlier ``learn()``)
        :param progress_bar: show a progress bar (tqdm and rich)
        :return: the trained model
        """
        return super().learn(
            total_timesteps=total_timesteps,
            callback=callback,
            log_interval=log_interval,
            tb_log_name=tb_log_name,
            reset_num_timesteps=reset_num_timesteps,
            progress_bar=progress_bar,
        )

    def train(self) -> None:
        """
        One K-FAC update of A2C's loss on the whole rollout.
        """
        self.policy.set_training_mode(True)
        optimizer = self._synced_kfac()
        self._update_learning_rate(optimizer)

        samples = next(self.rollout_buffer.get(batch_size=None))
        actions = distribution_actions(samples.actions, self.action_space)
        with optimizer.capture():
            values, distribution = values_and_distribution(self.policy, samples.observations)
        values = values.flatten()
        log_prob = distribution.log_prob(actions)
        entropy = distribution.entropy()

        advantages = normalized_advantages(samples.advantages) if self.normalize_advantage else samples.advantages

        # A2C's loss: -mean(log π(a|s) Â) + vf_coef·mean((R - v)²) - ent_coef·mean(entropy)
        policy_loss = -(advantages * log_prob).mean()
        value_loss = F.mse_loss(samples.returns, values)
        entropy_loss = -th.mean(-log_prob) if entropy is None else -th.mean(entropy)
        loss = policy_loss + self.ent_coef * entropy_loss + self.vf_coef * value_loss

        # Sampled Fisher of the joint model π(a|s)·N(y; v(s), σ²): a negative log-likelihood of targets drawn from
        # the model itself, -log π(â|s) + c·(v - ŷ)² (c = vf_fisher_coef). K-FAC uses outer products, so the overall
        # sign is irrelevant, and so is the value term's own sign in expectation: flipping it is the same as drawing
        # -ε for ŷ = v + ε, which has the same law, independent of the sampled action. (Baselines writes the
        # log-likelihood, mean log π - mean (v - ŷ)²; the PyTorch port negates only the policy term.) One negative
        # log-likelihood is written here for clarity.
        with th.no_grad():
            sampled_actions = sample_independently(distribution)
            value_targets = values + th.randn_like(values)
        fisher_loss = -distribution.log_prob(sampled_actions).mean()
        fisher_loss = fisher_loss + self.vf_fisher_coef * th.mean((values - value_targets) ** 2)

        optimizer.zero_grad()
        optimizer.backward(loss, fisher_loss, batch_size=len(values))
        optimizer.step()
        self._n_updates += 1

        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")
        self.logger.record(
            "train/explained_variance",
            explained_variance(self.rollout_buffer.values.flatten(), self.rollout_buffer.returns.flatten()),
        )
        self.logger.record("train/entropy_loss", entropy_loss.item())
        self.logger.record("train/policy_loss", policy_loss.item())
        self.logger.record("train/value_loss", value_loss.item())
        self.logger.record("train/kfac_step_scale", optimizer.step_scale)
        self.logger.record("train/kl_estimate", optimizer.kl_estimate)
        self.logger.record("train/kfac_damping", optimizer.param_groups[0]["damping"])
        if hasattr(self.policy, "log_std"):
            self.logger.record("train/std", th.exp(self.policy.log_std).mean().item())
