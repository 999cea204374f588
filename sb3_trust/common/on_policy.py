"""On-policy base shared by the sb3_trust algorithms: SB3's rollout loop with one forward pass per step."""

import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.distributions import CategoricalDistribution, DiagGaussianDistribution
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm
from stable_baselines3.common.policies import BaseModel, BasePolicy
from stable_baselines3.common.save_util import load_from_zip_file, recursive_getattr
from stable_baselines3.common.torch_layers import MlpExtractor
from stable_baselines3.common.type_aliases import MaybeCallback, TensorDict
from stable_baselines3.common.utils import obs_as_tensor
from stable_baselines3.common.vec_env import VecEnv

from sb3_trust.common.checks import check_integer, check_unit_interval
from sb3_trust.common.mlp import LinearStack
from sb3_trust.common.policies import check_policy_methods, overridden_methods, values_and_distribution

SelfTrustOnPolicyAlgorithm = TypeVar("SelfTrustOnPolicyAlgorithm", bound="TrustOnPolicyAlgorithm")

# The action spaces of the sb3_trust algorithms (every distribution SB3's on-policy policies build)
SUPPORTED_ACTION_SPACES = (spaces.Box, spaces.Discrete, spaces.MultiDiscrete, spaces.MultiBinary)
# Rollout states are re-evaluated in chunks of this many samples (bounds memory for image observations)
EVALUATION_CHUNK_SIZE = 2048
# The ActorCriticPolicy methods that define the law of a rollout's actions: a policy class that overrides any of them
# draws its actions through its own get_distribution() when it overrides that (the law the updates use), else through
# its own forward(), as in SB3's rollout
ACTION_LAW_METHODS = ("forward", "extract_features", "get_distribution", "_get_action_dist_from_latent")


def _optimizer_state_fits(optimizer: th.optim.Optimizer, state: dict[str, Any]) -> bool:
    """
    :param optimizer: an optimizer of the model
    :param state: a saved optimizer state dictionary
    :return: whether it has the optimizer's parameter groups, with as many parameters each (torch's own check;
        SB3 would run it after the policy's weights were loaded), and loads into a copy of the optimizer with every
        setting the optimizer's groups have (another optimizer's state, e.g. RMSprop's in an Adam, lacks some)
    """
    groups = state.get("param_groups")
    if not isinstance(groups, list) or [len(group["params"]) for group in groups] != [
        len(group["params"]) for group in optimizer.param_groups
    ]:
        return False
    # A copy (its defaults too: torch's __setstate__ adds to them) that load_state_dict gives new groups and state
    probe = object.__new__(type(optimizer))
    probe.__dict__.update(vars(optimizer))
    probe.defaults = dict(optimizer.defaults)
    try:
        probe.load_state_dict(state)
    except Exception:  # whatever the optimizer class refuses (e.g. Adam's __setstate__ on RMSprop's state)
        return False
    return not any(set(own) - set(loaded) for own, loaded in zip(optimizer.param_groups, probe.param_groups, strict=True))


def evaluation_chunks(n_samples: int) -> list[slice]:
    """
    Split a rollout's samples for evaluation without gradient.

    :param n_samples: the number of rollout samples
    :return: consecutive slices of at most ``EVALUATION_CHUNK_SIZE`` samples that cover them
    """
    return [slice(start, start + EVALUATION_CHUNK_SIZE) for start in range(0, n_samples, EVALUATION_CHUNK_SIZE)]


def index_observations(observations: th.Tensor | TensorDict, indices: th.Tensor | slice) -> th.Tensor | TensorDict:
    """
    :param observations: a batch of observations (a tensor, or a dict of tensors for Dict spaces)
    :param indices: the rows to keep (indices, or a slice for a view)
    :return: the selected rows
    """
    if isinstance(observations, dict):
        return {key: value[indices] for key, value in observations.items()}
    return observations[indices]


def distribution_actions(actions: th.Tensor, action_space: spaces.Space) -> th.Tensor:
    """
    :param actions: actions as SB3's rollout buffer gives them (float32 rows, one per sample)
    :param action_space: the space they come from
    :return: the actions in the form the policy's ``log_prob`` takes: a Categorical wants a flat integer index
    """
    return actions.long().flatten() if isinstance(action_space, spaces.Discrete) else actions


def env_actions(actions: np.ndarray, policy: BasePolicy) -> np.ndarray:
    """
    The actions drawn from the policy as SB3's rollout passes them to the environment: clipped to a ``Box`` action
    space's bounds, or mapped back to them from [-1, 1] by a policy that squashes its output.

    :param actions: actions drawn from the policy's distribution
    :param policy: the policy
    :return: the environment's actions
    """
    action_space = policy.action_space
    if not isinstance(action_space, spaces.Box):
        return actions
    if policy.squash_output:
        return policy.unscale_action(actions)
    return np.clip(actions, action_space.low, action_space.high)


def normalized_advantages(advantages: th.Tensor) -> th.Tensor:
    """
    :param advantages: the advantages of a batch
    :return: them standardised over the batch, as SB3 does (a single row has no spread and is left as it is)
    """
    if len(advantages) > 1:
        return (advantages - advantages.mean()) / (advantages.std() + 1e-8)
    return advantages


class TrustOnPolicyAlgorithm(OnPolicyAlgorithm):
    """
    SB3's ``OnPolicyAlgorithm`` with a leaner ``collect_rollouts``.

    SB3 runs the actor *and* the critic, and builds the action's log-probability, at every environment step.
    Only the action is needed to step the environment: the policy does not change during a rollout, so the
    values and log-probabilities of all collected states are computed here in one batched pass when the rollout
    ends. The buffer contents and the callbacks' calls are the same as SB3's; each step runs only the actor,
    and draws its action without SB3's distribution objects where the law allows (``_action_sampler``).
    """

    normalize_advantage: bool

    def learn(
        self: SelfTrustOnPolicyAlgorithm,
        total_timesteps: int,
        callback: MaybeCallback = None,
        log_interval: int = 1,
        tb_log_name: str = "",
        reset_num_timesteps: bool = True,
        progress_bar: bool = False,
    ) -> SelfTrustOnPolicyAlgorithm:
        """
        Train the model; the arguments are SB3's ``learn()``'s, and ``tb_log_name`` defaults to the class name.

        :param total_timesteps: number of environment steps to train for (a lower bound: the last rollout is
            completed)
        :param callback: callback(s) called at every step, as in SB3
        :param log_interval: number of updates (rollouts) between two dumps of the logger
        :param tb_log_name: the run's name in TensorBoard (default: the class name)
        :param reset_num_timesteps: whether to count steps from 0 again (False continues an earlier ``learn()``)
        :param progress_bar: show a progress bar (tqdm and rich)
        :return: the trained model
        """
        # Checked here too, not only at construction: load() may have been given an env with another n_envs
        self._check_rollout_size()
        return super().learn(
            total_timesteps=total_timesteps,
            callback=callback,
            log_interval=log_interval,
            tb_log_name=tb_log_name or type(self).__name__,
            reset_num_timesteps=reset_num_timesteps,
            progress_bar=progress_bar,
        )

    def _setup_model(self) -> None:
        # Also where load() builds the model, after its saved data and load()'s keyword arguments replaced the
        # constructor's values
        self._check_hyperparameters()
        super()._setup_model()
        check_policy_methods(self.policy)

    def _check_hyperparameters(self) -> None:
        """
        Check the hyperparameters' values, at construction and on ``load()``; algorithms add their own.

        :raises ValueError: naming the first that is not allowed
        """
        check_integer(1, n_steps=self.n_steps)
        check_unit_interval(gamma=self.gamma, gae_lambda=self.gae_lambda)

    def set_parameters(
        self,
        load_path_or_dict: str | TensorDict,
        exact_match: bool = True,
        device: th.device | str = "auto",
    ) -> None:
        """
        SB3's ``set_parameters`` (and so ``load()``), except for an optimizer state that does not fit this model's
        optimizer: one saved by another algorithm, e.g. PPO's or sb3-contrib's Adam over the whole policy where
        NPG's and TRPO's optimizer holds the critic only. Its weights are loaded and the optimizer keeps its state,
        with a warning; SB3 would raise once the weights were loaded, or load moments of the wrong shapes.

        :param load_path_or_dict: a saved model's path (or file), or the dictionary of state dictionaries that
            ``get_parameters()`` returns
        :param exact_match: whether every module and parameter of the model must be in the given parameters
        :param device: where to load them
        """
        params: dict[str, Any]
        if isinstance(load_path_or_dict, dict):
            params = dict(load_path_or_dict)
        else:
            params = dict(load_from_zip_file(load_path_or_dict, device=device, load_data=False)[1] or {})
        for name, state in params.items():
            try:
                optimizer = recursive_getattr(self, name)
            except AttributeError:
                continue  # SB3 names it an invalid object name
            if isinstance(optimizer, th.optim.Optimizer) and not _optimizer_state_fits(optimizer, state):
                warnings.warn(
                    f"The saved {name} state does not fit {type(self).__name__}'s {type(optimizer).__name__} (saved by "
                    "another algorithm?): the weights are loaded, the optimizer keeps its own state",
                    UserWarning,
                    stacklevel=2,
                )
                params[name] = optimizer.state_dict()
        super().set_parameters(params, exact_match=exact_match, device=device)

    def _check_rollout_size(self) -> None:
        """
        Check the parameters that must fit the rollout (n_steps * n_envs): at construction and before training.
        Nothing to check here; NPG and TRPO override it (PPOKL, as SB3's PPO, checks its minibatches at construction
        only).

        :raises ValueError: when one does not fit
        """

    def _check_advantages_can_be_normalized(self) -> None:
        """
        :raises ValueError: when advantages are to be normalized over a rollout of one step (SB3's PPO and
            sb3-contrib's TRPO refuse it too)
        """
        if self.env is not None and self.normalize_advantage and self.env.num_envs * self.n_steps == 1:
            raise ValueError(
                "A rollout of n_steps * n_envs = 1 step has no advantages to normalize: collect more steps, or pass "
                "normalize_advantage=False"
            )

    def collect_rollouts(
        self,
        env: VecEnv,
        callback: BaseCallback,
        rollout_buffer: RolloutBuffer,
        n_rollout_steps: int,
    ) -> bool:
        """
        Collect experiences using the current policy and fill a ``RolloutBuffer``.

        :param env: The training environment
        :param callback: Callback that will be called at each step
            (and at the beginning and end of the rollout)
        :param rollout_buffer: Buffer to fill with rollouts
        :param n_rollout_steps: Number of experiences to collect per environment
        :return: True if function returned with at least `n_rollout_steps`
            collected, False if callback terminated rollout prematurely.
        """
        assert self._last_obs is not None, "No previous observation was provided"
        self.policy.set_training_mode(False)
        n_steps = 0
        rollout_buffer.reset()
        if self.use_sde:
            self.policy.reset_noise(env.num_envs)
        # Values and log-probabilities are filled in after the rollout, in one batched pass
        placeholder = th.zeros(env.num_envs)
        truncated_episodes: list[tuple[int, int, np.ndarray | dict[str, np.ndarray]]] = []
        continuous_actions = isinstance(self.action_space, spaces.Box)
        sample_actions = self._action_sampler()
        # Not computed per step (see the class docstring): None, rather than what the previous rollout's end left there
        callback.update_locals(dict(values=None, log_probs=None))
        callback.on_rollout_start()

        while n_steps < n_rollout_steps:
            if self.use_sde and self.sde_sample_freq > 0 and n_steps % self.sde_sample_freq == 0:
                self.policy.reset_noise(env.num_envs)
            with th.no_grad():
                obs_tensor = obs_as_tensor(self._last_obs, self.device)  # type: ignore[arg-type]
                action_tensor = sample_actions(obs_tensor)
            actions = action_tensor.reshape((-1, *self.action_space.shape)).cpu().numpy()  # type: ignore[misc]
            if continuous_actions and not np.isfinite(actions).all():
                # Where torch's argument checks stop SB3's rollout (the direct sampler has none): an environment must
                # not be stepped with NaN actions
                raise ValueError("The policy drew non-finite actions: are the observations finite?")
            clipped_actions = env_actions(actions, self.policy)

            self._before_env_step(n_steps)
            new_obs, rewards, dones, infos = env.step(clipped_actions)
            self.num_timesteps += env.num_envs
            callback.update_locals(locals())
            if not callback.on_step():
                return False
            self._update_info_buffer(infos, dones)

            if isinstance(self.action_space, spaces.Discrete):
                actions = actions.reshape(-1, 1)
            for done_index in np.flatnonzero(dones):
                info = infos[done_index]
                if info.get("terminal_observation") is not None and info.get("TimeLimit.truncated", False):
                    truncated_episodes.append((n_steps, int(done_index), info["terminal_observation"]))
            rollout_buffer.add(
                self._last_obs,  # type: ignore[arg-type]
                actions,
                rewards,
                self._last_episode_starts,  # type: ignore[arg-type]
                placeholder,
                placeholder,
            )
            n_steps += 1
            self._last_obs = new_obs  # type: ignore[assignment]
            self._last_episode_starts = dones

        with th.no_grad():
            self._evaluate_rollout(rollout_buffer)
            # Bootstrap episodes cut by a time limit with the value of their last state (SB3 issue #633)
            for step_index, env_index, terminal_obs in truncated_episodes:
                terminal_value = self.policy.predict_values(self.policy.obs_to_tensor(terminal_obs)[0])
                rollout_buffer.rewards[step_index, env_index] += self.gamma * terminal_value.item()
            values = self.policy.predict_values(obs_as_tensor(new_obs, self.device))  # type: ignore[arg-type]
        rollout_buffer.compute_returns_and_advantage(last_values=values, dones=dones)

        callback.update_locals(locals())
        callback.on_rollout_end()
        return True

    def _before_env_step(self, n_steps: int) -> None:
        """
        Called in the rollout before each step of the environments (TRPO's vine sampling saves their states here).

        :param n_steps: the index of the step in the rollout
        """

    def _action_sampler(self) -> Callable[[th.Tensor | TensorDict], th.Tensor]:
        """
        How this rollout draws actions from the current policy.

        For SB3's own policy classes with a diagonal Gaussian or a categorical, SB3's ``Distribution`` wrappers
        (and torch's argument validation) cost more than the network itself at the batch sizes of a rollout, so
        the action is drawn from the actor's output directly, with the same law. Other distributions (gSDE,
        multi-categorical, Bernoulli) go through ``get_distribution``. A policy class that overrides
        ``get_distribution`` draws from it: the rollout's log-probabilities and every update read that law
        (``values_and_distribution``). One that overrides another method defining the action law
        (``ACTION_LAW_METHODS``) is called as SB3's rollout calls it, ``policy(obs)``.

        :return: observations of the vectorized environment ↦ sampled actions
        """
        policy = self.policy
        overridden = overridden_methods(policy, ACTION_LAW_METHODS)
        if "get_distribution" in overridden:
            return lambda obs_tensor: policy.get_distribution(obs_tensor).get_actions()
        if overridden:
            return lambda obs_tensor: policy(obs_tensor)[0]
        if type(policy.action_dist) not in (DiagGaussianDistribution, CategoricalDistribution):
            return lambda obs_tensor: policy.get_distribution(obs_tensor).get_actions()
        # SB3's MLP actor, from the features to the action parameters, as plain tensor functions (see LinearStack)
        actor = None
        if getattr(type(policy.mlp_extractor), "forward_actor", None) is MlpExtractor.forward_actor:
            actor = LinearStack.build([policy.mlp_extractor.policy_net, policy.action_net])
        return lambda obs_tensor: self._sample_actions_directly(obs_tensor, actor)

    def _sample_actions_directly(self, obs_tensor: th.Tensor | TensorDict, actor: LinearStack | None) -> th.Tensor:
        """
        Draw from a stock policy's diagonal Gaussian or categorical without building a distribution object.

        :param obs_tensor: observations of the vectorized environment
        :param actor: the actor's MLP and action head as a :class:`~sb3_trust.common.mlp.LinearStack`, or None to
            call the modules
        :return: the sampled actions
        """
        policy = self.policy
        features = BaseModel.extract_features(policy, obs_tensor, policy.pi_features_extractor)
        if actor is not None and features.dim() == 2:  # (nn.Linear also maps the last axis of higher-rank features)
            action_params = actor.forward(features)
        else:
            action_params = policy.action_net(policy.mlp_extractor.forward_actor(features))
        if isinstance(policy.action_dist, DiagGaussianDistribution):
            return action_params + th.randn_like(action_params) * policy.log_std.exp()
        return th.multinomial(th.softmax(action_params, dim=-1), 1).squeeze(-1)

    def _evaluate_rollout(self, rollout_buffer: RolloutBuffer) -> None:
        """
        Fill the buffer's values and log-probabilities with one batched pass over the rollout.

        :param rollout_buffer: a buffer whose observations and actions are collected
        """
        n_samples = rollout_buffer.buffer_size * rollout_buffer.n_envs
        observations = rollout_buffer.observations
        if isinstance(observations, dict):
            flat_obs: np.ndarray | dict[str, np.ndarray] = {
                key: value.reshape(n_samples, *value.shape[2:]) for key, value in observations.items()
            }
        else:
            flat_obs = observations.reshape(n_samples, *observations.shape[2:])
        # Cast to float32 as SB3's buffer does when it samples (integer actions break the Bernoulli log-prob)
        flat_actions = th.as_tensor(rollout_buffer.actions.reshape(n_samples, -1).astype(np.float32), device=self.device)
        flat_actions = distribution_actions(flat_actions, self.action_space)
        values = np.empty(n_samples, dtype=np.float32)
        log_probs = np.empty(n_samples, dtype=np.float32)
        for chunk in evaluation_chunks(n_samples):
            obs_chunk: np.ndarray | dict[str, np.ndarray]
            if isinstance(flat_obs, dict):
                obs_chunk = {key: value[chunk] for key, value in flat_obs.items()}
            else:
                obs_chunk = flat_obs[chunk]
            obs_tensor: th.Tensor | TensorDict = obs_as_tensor(obs_chunk, self.device)  # type: ignore[arg-type]
            # The values and the law that the updates use (values_and_distribution), not SB3's forward()
            chunk_values, distribution = values_and_distribution(self.policy, obs_tensor)
            values[chunk] = chunk_values.flatten().cpu().numpy()
            log_probs[chunk] = distribution.log_prob(flat_actions[chunk]).flatten().cpu().numpy()
        rollout_buffer.values[:] = values.reshape(rollout_buffer.values.shape)
        rollout_buffer.log_probs[:] = log_probs.reshape(rollout_buffer.log_probs.shape)
