"""The machinery NPG and TRPO share: the natural-gradient direction, the critic, checks and logging."""

import warnings
from abc import abstractmethod
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.distributions import Distribution
from stable_baselines3.common.policies import ActorCriticPolicy, BaseModel
from stable_baselines3.common.torch_layers import MlpExtractor
from stable_baselines3.common.type_aliases import GymEnv, RolloutBufferSamples, Schedule
from stable_baselines3.common.utils import explained_variance
from torch.nn import functional as F

from sb3_trust.common.checks import check_integer, check_non_negative, check_positive
from sb3_trust.common.conjugate_gradient import conjugate_gradient
from sb3_trust.common.critic import MLPValueRegression, value_head_layers
from sb3_trust.common.distributions import torch_distributions
from sb3_trust.common.fisher import FisherVectorProduct, flat_gradient, flat_parameters, set_flat_parameters
from sb3_trust.common.on_policy import SUPPORTED_ACTION_SPACES, TrustOnPolicyAlgorithm, index_observations
from sb3_trust.common.optim import LeanAdam
from sb3_trust.common.policies import overridden_methods, split_actor_critic_parameters
from sb3_trust.common.surrogate import ImportanceSampledSurrogate, Surrogate, SurrogateEvaluation


class PolicyStep(NamedTuple):
    """
    What a step rule did to the actor parameters.

    :param step_size: the coefficient α of the applied step θ ← θ_old + α s (0 when nothing was applied)
    :param kl: mean KL(π_old ‖ π_new) on the rollout after the step
    :param objective_gain: L(θ_new) - L(θ_old) of the surrogate
    :param line_search_steps: number of step sizes evaluated (0 without line search)
    :param accepted: whether the parameters moved
    """

    step_size: float
    kl: float
    objective_gain: float
    line_search_steps: int
    accepted: bool


class NaturalGradientAlgorithm(TrustOnPolicyAlgorithm):
    """
    Base of the natural-gradient algorithms (NPG, TRPO).

    ``train()`` runs the update in three separate pieces, so each can be replaced on its own:

    1. the samples and the surrogate objective L(θ) they define (``_build_surrogate``);
    2. the natural-gradient direction s = F⁻¹ g by conjugate gradient, g = ∇L(θ_old), F the Fisher matrix
       (``_natural_gradient_direction``);
    3. the step rule that turns s into new parameters (``_take_step``: closed form for NPG, line search for TRPO).

    Then the critic is fitted by regression on the GAE returns with its own optimizer.

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
    :param n_critic_updates: Number of epochs of critic regression per rollout
    :param gae_lambda: Factor for trade-off of bias vs variance for Generalized Advantage Estimator
    :param use_sde: Whether to use generalized State Dependent Exploration (gSDE)
        instead of action noise exploration (default: False)
    :param sde_sample_freq: Sample a new noise matrix every n steps when using gSDE
        Default: -1 (only sample at the beginning of the rollout)
    :param rollout_buffer_class: Rollout buffer class to use. If ``None``, it will be automatically selected.
    :param rollout_buffer_kwargs: Keyword arguments to pass to the rollout buffer on creation
    :param normalize_advantage: Whether to normalize the advantages over the rollout
    :param target_kl: The trust region δ on the mean KL(π_old ‖ π_new) of one update (of the joint action
        distribution, summed over the action dimensions): a bound that TRPO's line search enforces, the KL that NPG's
        closed-form step reaches under the quadratic model
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

    policy: ActorCriticPolicy

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
        super().__init__(
            policy,
            env,
            learning_rate=learning_rate,
            n_steps=n_steps,
            gamma=gamma,
            gae_lambda=gae_lambda,
            ent_coef=0.0,
            vf_coef=0.0,
            max_grad_norm=0.0,
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
        self.cg_max_steps = cg_max_steps
        self.cg_damping = cg_damping
        self.cg_tolerance = cg_tolerance
        self.n_critic_updates = n_critic_updates
        self.normalize_advantage = normalize_advantage
        self.target_kl = target_kl
        self.sub_sampling_factor = sub_sampling_factor

        self._check_hyperparameters()
        self._check_rollout_size()
        if _init_setup_model:
            self._setup_model()

    def _check_hyperparameters(self) -> None:
        super()._check_hyperparameters()
        check_positive(target_kl=self.target_kl)
        check_integer(1, cg_max_steps=self.cg_max_steps, batch_size=self.batch_size)
        check_integer(1, n_critic_updates=self.n_critic_updates, sub_sampling_factor=self.sub_sampling_factor)
        check_non_negative(cg_damping=self.cg_damping, cg_tolerance=self.cg_tolerance)

    def _check_rollout_size(self) -> None:
        """
        :raises ValueError: when ``batch_size`` does not divide the rollout, ``sub_sampling_factor`` exceeds it
            (the Fisher sub-sample would have less than one state), or the advantages of a one-step rollout are to be
            normalized (as sb3-contrib's TRPO refuses)
        """
        if self.env is not None and (self.env.num_envs * self.n_steps) % self.batch_size != 0:
            raise ValueError(
                f"`batch_size` ({self.batch_size}) must divide the rollout size n_steps * n_envs "
                f"= {self.n_steps} * {self.env.num_envs} = {self.env.num_envs * self.n_steps} "
                "(a loaded model takes another one with load(path, env, batch_size=...))"
            )
        self._check_advantages_can_be_normalized()
        if self.env is not None and self.sub_sampling_factor > self.env.num_envs * self.n_steps:
            raise ValueError(
                f"`sub_sampling_factor` ({self.sub_sampling_factor}) exceeds the rollout size n_steps * n_envs "
                f"= {self.env.num_envs * self.n_steps}: the Fisher sub-sample would have less than one state"
            )

    def _setup_model(self) -> None:
        super()._setup_model()
        self._split_key: tuple[int, ...] | None = None
        self._split_parameters()
        if not self.actor_parameters and all(param.requires_grad for param in self.policy.parameters()):
            # (With frozen parameters, the actor may be frozen on purpose: train() then fits the critic alone)
            raise ValueError("The policy's action distribution does not depend on any trainable parameter")

    def _split_parameters(self) -> None:
        """
        Tell the actor's trainable parameters from the critic's (:func:`split_actor_critic_parameters`), and give the
        critic its own optimizer when the policy's does not fit. Run at every update, not only at construction, so that
        parameters frozen later (``requires_grad_(False)``) stay where they are and a policy assigned to
        ``model.policy`` trains, as with SB3's algorithms; but the split is made again only when the policy or its
        trainable parameters changed: it draws an observation from the observation space, which may be the
        environment's, and so its random stream.
        """
        split_key = (id(self.policy), *(id(param) for param in self.policy.parameters() if param.requires_grad))
        if split_key == self._split_key:
            return
        self._split_key = split_key
        self.actor_parameters, self.critic_parameters = split_actor_critic_parameters(self.policy)
        if not self.critic_parameters:
            # Nothing to regress (the value prediction has no trainable parameter of its own): SB3's optimizer stays
            return
        optimized = {id(param) for group in self.policy.optimizer.param_groups for param in group["params"]}
        if {id(param) for param in self.critic_parameters} <= optimized and not any(
            id(param) in optimized for param in self.actor_parameters
        ):
            return  # the critic's optimizer already (built here, or loaded): it keeps its state
        # The critic's own optimizer replaces the policy's, so it is saved and loaded as `policy.optimizer`.
        # Its hundreds of small steps per update are dominated by per-step overhead: plain Adam becomes LeanAdam
        # (torch's fused kernel, called directly), unless the user chose an implementation.
        optimizer_class = self.policy.optimizer_class
        optimizer_kwargs = dict(self.policy.optimizer_kwargs)
        user_chose = {"fused", "foreach", "capturable", "differentiable"} & set(optimizer_kwargs)
        if optimizer_class is th.optim.Adam and not user_chose and self.device.type in ("cpu", "cuda"):
            optimizer_class = LeanAdam
        self.policy.optimizer = optimizer_class(
            self.critic_parameters, lr=self.lr_schedule(1), **optimizer_kwargs  # type: ignore[call-arg]
        )

    def train(self) -> None:
        """
        One natural-gradient update of the actor, then the critic's regression, on the collected rollout.
        """
        self._split_parameters()
        self.policy.set_training_mode(True)
        self._update_learning_rate(self.policy.optimizer)
        samples = next(self.rollout_buffer.get(batch_size=None))
        self._record_step(self._update_actor(samples))

        value_loss = self._update_critic(samples)
        self._n_updates += 1

        self.logger.record("train/value_loss", value_loss)
        self.logger.record(
            "train/explained_variance",
            explained_variance(self.rollout_buffer.values.flatten(), self.rollout_buffer.returns.flatten()),
        )
        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")

    def _update_actor(self, samples: RolloutBufferSamples) -> PolicyStep:
        """
        The natural-gradient step of the actor.

        :param samples: the whole rollout
        :return: the step taken (the zero step when the update is skipped)
        """
        # 1. Samples and surrogate L(θ) (seed 004, Eq. 31)
        surrogate = self._build_surrogate(samples)
        evaluation = surrogate.evaluate()
        objective_before = evaluation.objective.item()
        self._record_distribution_stats(evaluation.distribution)
        if not self.actor_parameters:
            # Every actor parameter frozen (requires_grad_(False)): a skipped update, g and s are empty
            self.logger.record("train/cg_iterations", 0)
            self.logger.record("train/cg_residual", 0.0)
            self._skip_update("every actor parameter is frozen: only the critic learns")
            return PolicyStep(0.0, 0.0, 0.0, 0, False)
        gradient = flat_gradient(evaluation.objective, self.actor_parameters, retain_graph=True)

        # 2. Natural-gradient direction s = (F + λI)⁻¹ g, and sᵀ(F + λI)s for the step size
        fisher = self._fisher_vector_product(surrogate, evaluation)
        direction, quadratic_form = self._natural_gradient_direction(gradient, fisher)
        # Frees the graphs kept for the Fisher products before the step rule evaluates trial points
        del fisher, evaluation

        # 3. Step rule, from the step α = sqrt(2δ / sᵀFs) that the quadratic KL model puts at the trust region's edge
        step = PolicyStep(0.0, 0.0, 0.0, 0, False)
        if direction is not None:
            max_step_size = self._max_step_size(quadratic_form)
            if not bool(th.isfinite(self._actor_parameters_vector() + max_step_size * direction).all()):
                self._skip_update("the natural-gradient step is not finite")
            else:
                step = self._interruptible_step(surrogate, direction, max_step_size, objective_before)
        return step

    def _build_surrogate(self, samples: RolloutBufferSamples) -> Surrogate:
        """
        The samples and the surrogate objective of this update (single path: the rollout itself).

        :param samples: the whole rollout
        :return: the surrogate, frozen at the current policy
        """
        return ImportanceSampledSurrogate(self.policy, samples, self.normalize_advantage)

    def _fisher_vector_product(self, surrogate: Surrogate, evaluation: SurrogateEvaluation) -> FisherVectorProduct:
        """
        The damped Fisher-vector product on the rollout, or on a random 1/``sub_sampling_factor`` of it.

        :param surrogate: the surrogate of this update
        :param evaluation: its evaluation at θ_old, whose graph is reused when no sub-sampling is asked for
        :return: the product function
        """
        if self.sub_sampling_factor == 1:
            distribution = evaluation.distribution
        else:
            n_states = max(1, len(surrogate) // self.sub_sampling_factor)
            indices = th.randperm(len(surrogate), device=self.device)[:n_states]
            distribution = surrogate.distribution_on(indices)
        return FisherVectorProduct(distribution, self.actor_parameters, self.cg_damping)

    def _natural_gradient_direction(self, gradient: th.Tensor, fisher: FisherVectorProduct) -> tuple[th.Tensor | None, float]:
        """
        Solve (F + λI) s = g by conjugate gradient (Schulman et al., 2015, App. C).

        :param gradient: g, the flat gradient of the surrogate at θ_old
        :param fisher: the damped Fisher-vector product
        :return: the direction s and sᵀ(F + λI)s, or (None, 0) when the update must be skipped
        """
        gradient_norm_sq = th.dot(gradient, gradient).item()
        # Skipped updates log the residual of s = 0, which is g itself
        self.logger.record("train/cg_iterations", 0)
        self.logger.record("train/cg_residual", float(np.sqrt(gradient_norm_sq)))
        if not bool(th.isfinite(gradient).all()):
            self._skip_update("the policy gradient is not finite")
            return None, 0.0
        if not gradient_norm_sq > self.cg_tolerance:
            self._skip_update(f"the policy gradient's squared norm {gradient_norm_sq:.3g} is not above `cg_tolerance`")
            return None, 0.0
        result = conjugate_gradient(fisher, gradient, self.cg_max_steps, self.cg_tolerance)
        self.logger.record("train/cg_iterations", result.iterations)
        self.logger.record("train/cg_residual", result.residual_norm)
        direction = result.solution
        quadratic_form = th.dot(direction, fisher(direction)).item()
        if not (bool(th.isfinite(direction).all()) and np.isfinite(quadratic_form) and quadratic_form > 0):
            self._skip_update("the natural-gradient direction is not finite or the Fisher matrix is not positive along it")
            return None, 0.0
        return direction, quadratic_form

    def _max_step_size(self, quadratic_form: float) -> float:
        """
        The largest α with ½ α² sᵀ(F + λI)s ≤ δ: the step that reaches the trust region's edge under the quadratic
        model of the KL (Schulman et al., 2015, App. C: α = sqrt(2δ / sᵀFs)).

        The step is sized with the damped sᵀ(F + λI)s, as the peers do: the damping makes the quadratic model
        of the KL pessimistic, which keeps the closed-form step on the safe side of δ. It is not a small effect:
        with the RL Zoo's MuJoCo settings, λ‖s‖² is about half of sᵀ(F + λI)s and a step realises about 0.5δ
        (HalfCheetah; 0.6-0.7δ on Hopper), see docs/benchmarks.md.

        :param quadratic_form: sᵀ(F + λI)s
        :return: α
        """
        return float(np.sqrt(2.0 * self.target_kl / quadratic_form))

    def _interruptible_step(
        self, surrogate: Surrogate, direction: th.Tensor, max_step_size: float, objective_before: float
    ) -> PolicyStep:
        """
        :meth:`_take_step`, with θ_old put back when it is interrupted (Ctrl-C, an exception in the surrogate):
        the actor must not keep a trial point that the step rule did not accept.

        :param surrogate: the surrogate of this update, frozen at θ_old
        :param direction: s ≈ (F + λI)⁻¹ g
        :param max_step_size: α = sqrt(2δ / sᵀ(F + λI)s)
        :param objective_before: L(θ_old)
        :return: the step taken
        """
        old_parameters = self._actor_parameters_vector()
        try:
            return self._take_step(surrogate, direction, max_step_size, objective_before)
        except BaseException:
            self._set_actor_parameters(old_parameters)
            raise

    def _set_actor_parameters(self, flat: th.Tensor) -> None:
        set_flat_parameters(self.actor_parameters, flat)

    def _evaluate_trial(self, surrogate: Surrogate, parameters: th.Tensor) -> tuple[float, float]:
        """
        Move the actor to trial parameters and evaluate the surrogate there.

        :param surrogate: the surrogate of this update, frozen at θ_old
        :param parameters: the trial actor parameters (finite)
        :return: L(θ) and the mean KL(π_old ‖ π_θ); (NaN, inf) when torch refuses the distribution at θ (its argument
            checks reject, e.g., a standard deviation that underflowed to 0): θ is then no policy, and no step
        """
        self._set_actor_parameters(parameters)
        with th.no_grad():
            try:
                evaluation = surrogate.evaluate()
            except ValueError:
                return float("nan"), float("inf")
        return evaluation.objective.item(), evaluation.kl.item()

    def _actor_parameters_vector(self) -> th.Tensor:
        return flat_parameters(self.actor_parameters)

    def _skip_update(self, reason: str) -> None:
        warnings.warn(f"{type(self).__name__}: policy update skipped, {reason}", RuntimeWarning, stacklevel=3)

    @abstractmethod
    def _take_step(
        self, surrogate: Surrogate, direction: th.Tensor, max_step_size: float, objective_before: float
    ) -> PolicyStep:
        """
        Move the actor parameters along the natural-gradient direction.

        :param surrogate: the surrogate of this update, frozen at θ_old
        :param direction: s ≈ (F + λI)⁻¹ g
        :param max_step_size: α = sqrt(2δ / sᵀ(F + λI)s), with which θ_old + α s is known to be finite
        :param objective_before: L(θ_old)
        :return: what was done
        """

    def _record_step(self, step: PolicyStep) -> None:
        """
        Log what the step rule did (also when the update was skipped, so every update logs the same keys).

        :param step: the step taken, or the zero step of a skipped update
        """
        self.logger.record("train/kl_divergence", step.kl)
        self.logger.record("train/policy_objective", step.objective_gain)
        self.logger.record("train/step_size", step.step_size)

    def _record_distribution_stats(self, distribution: Distribution) -> None:
        """
        Log the policy's mean entropy (when it has a closed form) and, for continuous actions, its mean standard
        deviation.

        :param distribution: the policy's distribution on the rollout, at θ_old
        """
        with th.no_grad():
            entropy = distribution.entropy()
            if entropy is not None:
                self.logger.record("train/entropy", entropy.mean().item())
            if isinstance(self.action_space, spaces.Box):
                scale = th.cat([part.stddev.reshape(-1) for part in torch_distributions(distribution)])
                self.logger.record("train/std", scale.mean().item())

    def _update_critic(self, samples: RolloutBufferSamples) -> float:
        """
        Fit the critic to the GAE returns: ``n_critic_updates`` epochs of minibatch regression.

        With a feature extractor shared with the actor, its features are computed once and held fixed here, and
        SB3's MLP value head gets its gradients from :class:`~sb3_trust.common.critic.MLPValueRegression`. A policy
        that overrides ``predict_values`` is regressed through it, on the observations.

        :param samples: the whole rollout
        :return: the mean squared error of the last epoch
        """
        if not self.critic_parameters:
            return float("nan")
        policy = self.policy
        returns = samples.returns.flatten()
        regression_step = self._critic_regression_step()
        if self._critic_on_fixed_features():
            with th.no_grad():
                # As ActorCriticPolicy.predict_values extracts them
                inputs: Any = BaseModel.extract_features(policy, samples.observations, policy.vf_features_extractor)
        else:
            inputs = samples.observations

        optimizer = policy.optimizer
        optimizer_step = optimizer.lean_step if isinstance(optimizer, LeanAdam) else optimizer.step
        n_samples = len(returns)
        initial_parameters = flat_parameters(self.critic_parameters)
        epoch_losses: list[th.Tensor] = []
        n_skipped = 0
        for _ in range(self.n_critic_updates):
            epoch_losses = []
            permutation = th.randperm(n_samples, device=self.device)
            # One gather per epoch, then contiguous minibatch views
            epoch_inputs, epoch_returns = index_observations(inputs, permutation), returns[permutation]
            for start in range(0, n_samples, self.batch_size):
                batch = slice(start, start + self.batch_size)
                loss = regression_step(index_observations(epoch_inputs, batch), epoch_returns[batch])
                if not bool(th.isfinite(loss)):
                    n_skipped += 1
                    continue
                optimizer_step()
                epoch_losses.append(loss)
        if not bool(th.isfinite(flat_parameters(self.critic_parameters)).all()):
            # An overflow inside the optimizer: undo this update and restart its moment estimates
            set_flat_parameters(self.critic_parameters, initial_parameters)
            optimizer.state.clear()
            warnings.warn("Critic update undone: it produced non-finite parameters", RuntimeWarning, stacklevel=2)
        if n_skipped > 0:
            warnings.warn(f"{n_skipped} critic minibatches skipped: non-finite value loss", RuntimeWarning, stacklevel=2)
        return th.stack(epoch_losses).mean().item() if epoch_losses else float("nan")

    def _critic_on_fixed_features(self) -> bool:
        """
        :return: whether the critic regresses on the shared feature extractor's output, held fixed: a shared
            extractor, and SB3's ``predict_values`` (value_net ∘ forward_critic ∘ features)
        """
        return self.policy.share_features_extractor and not overridden_methods(self.policy, ("predict_values",))

    def _critic_regression_step(self) -> Callable[[Any, th.Tensor], th.Tensor]:
        """
        The function that computes one minibatch's value loss and leaves its gradients in the critic's ``.grad``.

        :return: (critic inputs, returns) ↦ detached loss; the inputs are the shared features when
            ``_critic_on_fixed_features()``, the observations otherwise
        """
        policy = self.policy
        on_fixed_features = self._critic_on_fixed_features()
        if on_fixed_features and type(policy.mlp_extractor).forward_critic is MlpExtractor.forward_critic:
            head = value_head_layers(policy)
            head_parameters = {id(param) for module in head for param in module.parameters()}
            regression = MLPValueRegression.build(head)
            if regression is not None and head_parameters == {id(param) for param in self.critic_parameters}:
                return regression.loss_and_gradients

        def autograd_step(inputs: Any, targets: th.Tensor) -> th.Tensor:
            if on_fixed_features:
                values = policy.value_net(policy.mlp_extractor.forward_critic(inputs))
            else:
                values = policy.predict_values(inputs)
            loss = F.mse_loss(values.flatten(), targets)
            policy.optimizer.zero_grad(set_to_none=True)
            # Only into the critic's .grad: through predict_values the loss also reaches a shared extractor
            loss.backward(inputs=self.critic_parameters)
            return loss.detach()

        return autograd_step

    def _excluded_save_params(self) -> list[str]:
        return [*super()._excluded_save_params(), "actor_parameters", "critic_parameters", "_split_key"]
