"""PPO with an adaptive KL penalty (Schulman et al., 2017, Sec. 4)."""

import warnings
from typing import Any, ClassVar

import numpy as np
import torch as th
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.distributions import Distribution
from stable_baselines3.common.policies import ActorCriticPolicy, BasePolicy
from stable_baselines3.common.type_aliases import GymEnv, RolloutBufferSamples, Schedule, TensorDict
from stable_baselines3.common.utils import FloatSchedule, explained_variance
from torch.nn import functional as F

from sb3_trust.common.checks import check_integer, check_positive, check_positive_or_infinite
from sb3_trust.common.distributions import (
    can_concatenate,
    concatenate_distributions,
    detach_distribution,
    mean_kl,
    select_distribution,
)
from sb3_trust.common.on_policy import (
    SUPPORTED_ACTION_SPACES,
    TrustOnPolicyAlgorithm,
    distribution_actions,
    evaluation_chunks,
    index_observations,
    normalized_advantages,
)
from sb3_trust.common.policies import values_and_distribution
from sb3_trust.ppokl.policies import CnnPolicy, MlpPolicy, MultiInputPolicy


def adapt_kl_coef(
    kl_coef: float, kl: float, target_kl: float, tolerance: float, factor: float, kl_coef_min: float, kl_coef_max: float
) -> float:
    """
    The adaptive penalty rule of the PPO paper: after a policy update with mean KL d,
    β ← β·factor if d > tolerance·d_targ, β ← β/factor if d < d_targ/tolerance, else β; then clipped.

    :param kl_coef: β used for the update
    :param kl: d, the mean KL(π_old ‖ π_new) the update produced on its rollout
    :param target_kl: d_targ
    :param tolerance: width of the band around d_targ (paper: 1.5)
    :param factor: multiplicative change of β (paper: 2)
    :param kl_coef_min: lower bound of β
    :param kl_coef_max: upper bound of β
    :return: β for the next update
    """
    if kl > tolerance * target_kl:
        kl_coef *= factor
    elif kl < target_kl / tolerance:
        kl_coef /= factor
    return float(np.clip(kl_coef, kl_coef_min, kl_coef_max))


class PPOKL(TrustOnPolicyAlgorithm):
    """
    Proximal Policy Optimization with an adaptive KL penalty (the paper's second variant).

    Each minibatch minimises ``-mean(r_t(θ) Â_t) + β·mean KL(π_old(·|s_t) ‖ π_θ(·|s_t))`` plus the value and entropy
    terms, with ``r_t(θ) = π_θ(a_t|s_t) / π_old(a_t|s_t)``. After all epochs of a rollout, the mean KL d over the whole
    rollout moves β: doubled when d > 1.5·d_targ, halved when d < d_targ/1.5 (``kl_tolerance``,
    ``kl_coef_factor``). The KL is the distributions' analytic one; a distribution without a closed form falls
    back to the sample estimate mean((r - 1) - log r). ``clip_range`` is off by default (the pure penalty
    method); giving one adds PPO's clipped objective on top.

    Paper: https://arxiv.org/abs/1707.06347

    :param policy: The policy model to use (MlpPolicy, CnnPolicy, ...)
    :param env: The environment to learn from (if registered in Gym, can be str)
    :param learning_rate: The learning rate, it can be a function
        of the current progress remaining (from 1 to 0)
    :param n_steps: The number of steps to run for each environment per update
        (i.e. rollout buffer size is n_steps * n_envs where n_envs is number of environment copies running in parallel)
    :param batch_size: Minibatch size
    :param n_epochs: Number of epochs when optimizing the surrogate loss
    :param gamma: Discount factor
    :param gae_lambda: Factor for trade-off of bias vs variance for Generalized Advantage Estimator
    :param clip_range: Clipping parameter of the probability ratio, it can be a function of the current progress
        remaining (from 1 to 0); None (default) for no clipping
    :param clip_range_vf: Clipping parameter for the value function,
        it can be a function of the current progress remaining (from 1 to 0).
        This is a parameter specific to the OpenAI implementation. If None is passed (default),
        no clipping will be done on the value function.
    :param normalize_advantage: Whether to normalize or not the advantage (per minibatch, as SB3's PPO)
    :param ent_coef: Entropy coefficient for the loss calculation
    :param vf_coef: Value function coefficient for the loss calculation
    :param max_grad_norm: The maximum value for the gradient clipping
    :param use_sde: Whether to use generalized State Dependent Exploration (gSDE)
        instead of action noise exploration (default: False)
    :param sde_sample_freq: Sample a new noise matrix every n steps when using gSDE
        Default: -1 (only sample at the beginning of the rollout)
    :param rollout_buffer_class: Rollout buffer class to use. If ``None``, it will be automatically selected.
    :param rollout_buffer_kwargs: Keyword arguments to pass to the rollout buffer on creation
    :param target_kl: d_targ, the mean KL per update that β is adapted towards (unlike SB3's PPO, where
        ``target_kl`` stops the epochs early)
    :param kl_coef: The initial penalty coefficient β; ``model.kl_coef`` always holds the current one
    :param kl_tolerance: β changes only when the KL leaves [d_targ / kl_tolerance, d_targ · kl_tolerance]
    :param kl_coef_factor: The factor β is multiplied or divided by
    :param kl_coef_min: Lower bound of β
    :param kl_coef_max: Upper bound of β
    :param stats_window_size: Window size for the rollout logging, specifying the number of episodes to average
        the reported success rate, mean episode length, and mean reward over
    :param tensorboard_log: the log location for tensorboard (if None, no logging)
    :param policy_kwargs: additional arguments to be passed to the policy on creation
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
        learning_rate: float | Schedule = 3e-4,
        n_steps: int = 2048,
        batch_size: int = 64,
        n_epochs: int = 10,
        gamma: float = 0.99,
        gae_lambda: float = 0.95,
        clip_range: float | Schedule | None = None,
        clip_range_vf: float | Schedule | None = None,
        normalize_advantage: bool = True,
        ent_coef: float = 0.0,
        vf_coef: float = 0.5,
        max_grad_norm: float = 0.5,
        use_sde: bool = False,
        sde_sample_freq: int = -1,
        rollout_buffer_class: type[RolloutBuffer] | None = None,
        rollout_buffer_kwargs: dict[str, Any] | None = None,
        target_kl: float = 0.01,
        kl_coef: float = 1.0,
        kl_tolerance: float = 1.5,
        kl_coef_factor: float = 2.0,
        kl_coef_min: float = 1e-4,
        kl_coef_max: float = 1e4,
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
        self.batch_size = batch_size
        self.n_epochs = n_epochs
        self.clip_range = clip_range
        self.clip_range_vf = clip_range_vf
        self.normalize_advantage = normalize_advantage
        self.target_kl = target_kl
        self.kl_coef = kl_coef
        self.kl_tolerance = kl_tolerance
        self.kl_coef_factor = kl_coef_factor
        self.kl_coef_min = kl_coef_min
        self.kl_coef_max = kl_coef_max
        self._check_hyperparameters()
        self.kl_coef = float(kl_coef)
        if normalize_advantage and batch_size == 1:
            # At construction only, as in SB3's PPO: a model saved with it still loads (its one-row minibatches are
            # trained without normalization)
            raise ValueError("`batch_size` must be greater than 1 to normalize the advantages per minibatch (as in SB3's PPO)")
        self._check_advantages_can_be_normalized()
        self._warn_of_a_short_minibatch()
        if _init_setup_model:
            self._setup_model()

    def _check_hyperparameters(self) -> None:
        super()._check_hyperparameters()
        if self.target_kl is None:
            raise ValueError(
                "`target_kl` is the mean KL per update that PPOKL adapts its penalty towards; it cannot be None (in "
                "SB3's PPO, None turns off early stopping, which PPOKL does not do; to load a PPO save, pass one: "
                "PPOKL.load(path, target_kl=0.01))"
            )
        check_positive(target_kl=self.target_kl, kl_coef=self.kl_coef)
        check_positive_or_infinite(max_grad_norm=self.max_grad_norm)
        check_integer(1, batch_size=self.batch_size, n_epochs=self.n_epochs)
        for name, factor in (("kl_tolerance", self.kl_tolerance), ("kl_coef_factor", self.kl_coef_factor)):
            check_positive(**{name: factor})
            if not factor > 1:
                raise ValueError(f"`{name}` must be a finite number > 1, got {factor}")
        check_positive(kl_coef_min=self.kl_coef_min)
        check_positive_or_infinite(kl_coef_max=self.kl_coef_max)  # inf: β has no upper bound
        if not self.kl_coef_min <= self.kl_coef_max:
            raise ValueError(f"Need 0 < `kl_coef_min` <= `kl_coef_max`, got {self.kl_coef_min} and {self.kl_coef_max}")
        if not self.kl_coef_min <= self.kl_coef <= self.kl_coef_max:
            raise ValueError(
                f"`kl_coef` ({self.kl_coef}) must lie in [kl_coef_min, kl_coef_max] = [{self.kl_coef_min}, {self.kl_coef_max}]"
            )
        for name, value in (("clip_range", self.clip_range), ("clip_range_vf", self.clip_range_vf)):
            if isinstance(value, (float, int)):
                check_positive(**{name: value})

    def _warn_of_a_short_minibatch(self) -> None:
        """
        Warn, as SB3's PPO does at construction, when ``batch_size`` does not divide the rollout: each epoch then ends
        with a shorter minibatch, or is one minibatch of the whole rollout when ``batch_size`` is larger.
        """
        if self.env is None:
            return
        rollout_size = self.env.num_envs * self.n_steps
        if rollout_size % self.batch_size != 0:
            consequence = (
                f"each epoch's last minibatch has {rollout_size % self.batch_size} transitions"
                if self.batch_size < rollout_size
                else "each epoch is one minibatch of the whole rollout"
            )
            warnings.warn(
                f"`batch_size` ({self.batch_size}) does not divide the rollout size n_steps * n_envs = {self.n_steps} * "
                f"{self.env.num_envs} = {rollout_size}: {consequence}. We recommend a `batch_size` that is a factor of "
                "`n_steps * n_envs`.",
                UserWarning,
                stacklevel=3,
            )

    def _setup_model(self) -> None:
        super()._setup_model()
        # β is set in the constructor, never here: load() calls _setup_model() after restoring the saved β
        self.clip_range = None if self.clip_range is None else FloatSchedule(self.clip_range)
        self.clip_range_vf = None if self.clip_range_vf is None else FloatSchedule(self.clip_range_vf)

    def train(self) -> None:
        """
        Minimise the KL-penalised surrogate over ``n_epochs`` passes of minibatches, then adapt β from the
        mean KL of the whole update.
        """
        self._update_learning_rate(self.policy.optimizer)
        progress = self._current_progress_remaining
        clip_range = None if self.clip_range is None else self.clip_range(progress)  # type: ignore[operator]
        clip_range_vf = None if self.clip_range_vf is None else self.clip_range_vf(progress)  # type: ignore[operator]

        samples = next(self.rollout_buffer.get(batch_size=None))
        actions = distribution_actions(samples.actions, self.action_space)
        n_samples = len(actions)
        # π_old over the whole rollout, frozen: each minibatch's KL term compares against its rows
        old_distribution, chunks = self._frozen_rollout_distribution(samples.observations, n_samples)
        self.policy.set_training_mode(True)
        stats: dict[str, list[float]] = {key: [] for key in ("pg", "kl_penalty", "value", "entropy", "clip", "approx_kl")}
        loss = th.zeros(())
        n_skipped = n_applied = 0
        for _ in range(self.n_epochs):
            stats["approx_kl"] = []  # logged over the last epoch, as SB3's PPO does
            permutation = th.randperm(n_samples, device=self.device)
            for start in range(0, n_samples, self.batch_size):
                indices = permutation[start : start + self.batch_size]
                loss, terms = self._minibatch_loss(samples, actions, old_distribution, indices, clip_range, clip_range_vf)
                if not bool(th.isfinite(loss)):
                    n_skipped += 1
                    continue
                self.policy.optimizer.zero_grad()
                loss.backward()
                gradient_norm = th.nn.utils.clip_grad_norm_(self.policy.parameters(), self.max_grad_norm)
                if not bool(th.isfinite(gradient_norm)):
                    n_skipped += 1
                    continue
                self.policy.optimizer.step()
                n_applied += 1

                for key, value in terms.items():
                    stats[key].append(value)
            self._n_updates += 1
        if n_skipped:
            warnings.warn(
                f"PPOKL: {n_skipped} minibatches skipped, their loss or gradient was not finite", RuntimeWarning, stacklevel=2
            )

        # d: the KL this whole update moved the policy by, on its rollout; it drives β
        rollout_kl = self._rollout_kl(samples, actions, old_distribution, chunks)
        kl_coef_used = self.kl_coef
        if n_applied > 0:
            # (A policy that did not move says nothing about β: halving it would only weaken the next penalty)
            self.kl_coef = adapt_kl_coef(
                self.kl_coef,
                rollout_kl,
                self.target_kl,
                self.kl_tolerance,
                self.kl_coef_factor,
                self.kl_coef_min,
                self.kl_coef_max,
            )

        self.logger.record("train/kl_divergence", rollout_kl)
        self.logger.record("train/kl_coef", self.kl_coef)
        self.logger.record("train/kl_coef_used", kl_coef_used)
        self.logger.record("train/kl_penalty", _mean(stats["kl_penalty"]))
        self.logger.record("train/policy_gradient_loss", _mean(stats["pg"]))
        self.logger.record("train/value_loss", _mean(stats["value"]))
        self.logger.record("train/entropy_loss", _mean(stats["entropy"]))
        self.logger.record("train/approx_kl", _mean(stats["approx_kl"]))
        self.logger.record("train/loss", loss.item())
        self.logger.record(
            "train/explained_variance",
            explained_variance(self.rollout_buffer.values.flatten(), self.rollout_buffer.returns.flatten()),
        )
        if hasattr(self.policy, "log_std"):
            self.logger.record("train/std", th.exp(self.policy.log_std).mean().item())
        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")
        if clip_range is not None:
            self.logger.record("train/clip_fraction", _mean(stats["clip"]))
            self.logger.record("train/clip_range", clip_range)
        if clip_range_vf is not None:
            self.logger.record("train/clip_range_vf", clip_range_vf)

    def _rollout_kl(
        self, samples: RolloutBufferSamples, actions: th.Tensor, old_distribution: Distribution, chunks: list[slice]
    ) -> float:
        """
        The mean KL(π_old ‖ π_new) over the whole rollout, in evaluation mode as π_old was evaluated.

        :param samples: the whole rollout
        :param actions: its actions, in the form the policy's log-probability takes
        :param old_distribution: π_old on the whole rollout, detached
        :param chunks: the rows π_old was evaluated in, which cover the rollout
        :return: d
        """
        self.policy.set_training_mode(False)
        kl_sum = 0.0
        with th.no_grad():
            for chunk in chunks:
                distribution = self.policy.get_distribution(index_observations(samples.observations, chunk))
                log_ratio = distribution.log_prob(actions[chunk]) - samples.old_log_prob[chunk]
                kl_sum += self._mean_kl(old_distribution, chunk, distribution, log_ratio).item() * len(log_ratio)
        return kl_sum / len(actions)

    def _frozen_rollout_distribution(
        self, observations: th.Tensor | TensorDict, n_samples: int
    ) -> tuple[Distribution, list[slice]]:
        """
        The policy's distribution over the rollout, detached, in evaluation mode as the rollout's log-probabilities
        were computed (dropout or batch norm would otherwise shift it). Evaluated in chunks of rows, which bound the
        memory of image observations, when the distribution's kind can be concatenated; in one pass otherwise.

        :param observations: the rollout's observations
        :param n_samples: their number
        :return: the distribution, and the chunks of rows it was evaluated in (for later passes over the rollout)
        """
        self.policy.set_training_mode(False)
        chunks = evaluation_chunks(n_samples)
        with th.no_grad():
            parts = [detach_distribution(self.policy.get_distribution(index_observations(observations, chunks[0])))]
            if len(chunks) > 1 and not can_concatenate(parts[0]):
                chunks = [slice(0, n_samples)]
                parts = [detach_distribution(self.policy.get_distribution(observations))]
            parts += [
                detach_distribution(self.policy.get_distribution(index_observations(observations, chunk)))
                for chunk in chunks[1:]
            ]
        return concatenate_distributions(parts), chunks

    def _minibatch_loss(
        self,
        samples: RolloutBufferSamples,
        actions: th.Tensor,
        old_distribution: Distribution,
        indices: th.Tensor,
        clip_range: float | None,
        clip_range_vf: float | None,
    ) -> tuple[th.Tensor, dict[str, float]]:
        """
        The KL-penalised PPO loss of one minibatch.

        :param samples: the whole rollout
        :param actions: its actions, in the form the policy's log-probability takes
        :param old_distribution: π_old on the whole rollout, detached
        :param indices: the minibatch's rows
        :param clip_range: ratio clipping (None: the pure penalty objective)
        :param clip_range_vf: value clipping (None: none)
        :return: the loss and the values of its terms for logging
        """
        values, distribution = values_and_distribution(self.policy, index_observations(samples.observations, indices))
        log_prob, entropy = distribution.log_prob(actions[indices]), distribution.entropy()
        advantages = samples.advantages[indices]
        if self.normalize_advantage:
            advantages = normalized_advantages(advantages)
        log_ratio = log_prob - samples.old_log_prob[indices]
        ratio = th.exp(log_ratio)
        # L = -mean(r Â) + β mean KL(π_old ‖ π_θ)  (PPO paper, Eq. 8; seed 002 "KL Penalty Version")
        surrogate = ratio * advantages
        terms: dict[str, float] = {}
        if clip_range is not None:
            surrogate = th.min(surrogate, th.clamp(ratio, 1 - clip_range, 1 + clip_range) * advantages)
            terms["clip"] = th.mean((th.abs(ratio - 1) > clip_range).float()).item()
        policy_loss = -surrogate.mean()
        kl = self._mean_kl(old_distribution, indices, distribution, log_ratio)
        values = values.flatten()
        if clip_range_vf is not None:
            old_values = samples.old_values[indices]
            values = old_values + th.clamp(values - old_values, -clip_range_vf, clip_range_vf)
        value_loss = F.mse_loss(samples.returns[indices], values)
        entropy_loss = -th.mean(-log_prob) if entropy is None else -th.mean(entropy)
        loss = policy_loss + self.kl_coef * kl + self.ent_coef * entropy_loss + self.vf_coef * value_loss
        terms.update(
            pg=policy_loss.item(),
            kl_penalty=self.kl_coef * kl.item(),
            value=value_loss.item(),
            entropy=entropy_loss.item(),
            approx_kl=th.mean((ratio - 1) - log_ratio).item(),
        )
        return loss, terms

    @staticmethod
    def _mean_kl(old: Distribution, rows: th.Tensor | slice, new: Distribution, log_ratio: th.Tensor) -> th.Tensor:
        """
        Mean KL(π_old ‖ π_θ): analytic where the distributions have it (and rows of π_old can be selected), else the
        sample estimate mean((r - 1) - log r) with r = π_θ / π_old on actions drawn from π_old.

        :param old: the frozen old distribution over the whole rollout
        :param rows: the rollout's rows that ``new`` and ``log_ratio`` are on
        :param new: the current distribution
        :param log_ratio: log π_θ(a) - log π_old(a) of the rollout's actions
        :return: a scalar
        """
        try:
            old_rows: Distribution | None = select_distribution(old, rows)
        except TypeError:  # rows of this kind of distribution are not selected here
            old_rows = None
        if old_rows is not None:
            try:
                return mean_kl(old_rows, new)
            except NotImplementedError:  # torch has no closed form for this pair
                pass
        return th.mean(th.exp(log_ratio) - 1 - log_ratio)


def _mean(values: list[float]) -> float:
    """
    :param values: the per-minibatch values of one statistic
    :return: their mean, NaN when every minibatch was skipped
    """
    return float(np.mean(values)) if values else float("nan")
