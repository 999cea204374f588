"""
Vine sampling (Schulman et al., 2015, Sec. 5.2; seed 004, Sec. 1.4.2): the environment states saved along the
trunk rollout, and the branch rollouts that estimate Q(s_n, a_{n,k}) from them with common random numbers.
"""

from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch as th
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.utils import obs_as_tensor
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv, VecEnvWrapper, VecMonitor, VecNormalize, VecTransposeImage

from sb3_trust.common.distributions import sample_with_common_noise
from sb3_trust.common.on_policy import env_actions
from sb3_trust.common.snapshots import EnvSnapshot, check_snapshots, make_branch_env, restore_env

# The VecEnv wrappers a vine rollout can see through: statistics only (VecMonitor), or transformations of observations
# and rewards without state of their own, applied to the branches as they are (VecTransposeImage) or with frozen
# statistics (VecNormalize)
TRANSPARENT_VEC_WRAPPERS = (VecMonitor, VecNormalize, VecTransposeImage)


@dataclass
class VecEnvTransforms:
    """
    What the training environment's VecEnv wrappers do to observations and rewards, done to the branches' without
    updating any statistics.

    :param layers: the transforming wrappers (``VecTransposeImage``, ``VecNormalize``), innermost first
    """

    layers: list[VecEnvWrapper]

    @property
    def vec_normalize(self) -> VecNormalize | None:
        """The ``VecNormalize`` among them, if any."""
        return next((layer for layer in self.layers if isinstance(layer, VecNormalize)), None)

    def observations(self, batch: np.ndarray | dict[str, np.ndarray]) -> np.ndarray | dict[str, np.ndarray]:
        """
        :param batch: observations as the environments return them
        :return: as the policy sees them
        """
        for layer in self.layers:
            if isinstance(layer, VecTransposeImage):
                batch = layer.transpose_observations(batch)
            elif isinstance(layer, VecNormalize):
                batch = layer.normalize_obs(batch)
        return batch

    def reward(self, reward: float) -> float:
        """
        :param reward: a reward as an environment returns it
        :return: as the critic learns it
        """
        for layer in self.layers:
            if isinstance(layer, VecNormalize):
                reward = float(layer.normalize_reward(np.array([reward]))[0])
        return reward


def branchable_envs(env: VecEnv) -> tuple[DummyVecEnv, VecEnvTransforms]:
    """
    The ``DummyVecEnv`` whose environments vine sampling copies, below the training environment's wrappers.

    :param env: the training environment
    :return: the ``DummyVecEnv``, and what the wrappers above it do to observations and rewards
    :raises ValueError: for environments in other processes (``SubprocVecEnv``) and for wrappers with state of their
        own that the branches could not reproduce (frame stacking)
    """
    layers: list[VecEnvWrapper] = []
    layer = env
    while isinstance(layer, TRANSPARENT_VEC_WRAPPERS):
        if isinstance(layer, (VecNormalize, VecTransposeImage)):
            layers.insert(0, layer)
        layer = layer.venv
    if not isinstance(layer, DummyVecEnv):
        raise ValueError(
            f"Vine sampling supports a DummyVecEnv, optionally inside VecNormalize, VecTransposeImage or VecMonitor "
            f"(it branches from copies of the environments' states, which must be in this process, and reproduces "
            f"these wrappers' transformations), not {type(layer).__name__}"
        )
    return layer, VecEnvTransforms(layers)


def check_vine_env(env: VecEnv) -> None:
    """
    Check that vine sampling can branch from the training environment's states: its wrappers, and a save, copy and
    restore of each of its environments.

    :param env: the training environment
    :raises ValueError: for the environments :func:`branchable_envs` refuses
    :raises SnapshotError: for an environment whose state cannot be saved, copied or restored
        (:func:`~sb3_trust.common.snapshots.check_snapshots`)
    """
    vec_env, _ = branchable_envs(env)
    for sub_env in vec_env.envs:
        check_snapshots(sub_env)


class BranchEnvPool:
    """
    The environments the branches run in, made once per environment of the training ``DummyVecEnv`` and reused:
    a MuJoCo or ALE environment takes milliseconds to build, and an update runs hundreds of branches.
    """

    def __init__(self) -> None:
        self._vec_env: DummyVecEnv | None = None
        self._envs: dict[int, list[gym.Env]] = {}

    def restored(self, vec_env: DummyVecEnv, snapshots: list[tuple[int, EnvSnapshot]], n_copies: int) -> list[gym.Env]:
        """
        :param vec_env: the training environments
        :param snapshots: (index of the environment in ``vec_env``, its saved state) for each state
        :param n_copies: the number of branch environments per state
        :return: ``n_copies`` environments in each saved state, state-major
        """
        if vec_env is not self._vec_env:
            # Another training environment (set_env): branch environments are made anew from its own
            self._vec_env, self._envs = vec_env, {}
        used: dict[int, int] = {}
        branch_envs = []
        for env_index, saved in snapshots:
            pool = self._envs.setdefault(env_index, [])
            for _ in range(n_copies):
                slot = used.get(env_index, 0)
                used[env_index] = slot + 1
                if slot == len(pool):
                    pool.append(make_branch_env(vec_env.envs[env_index]))
                restore_env(pool[slot], saved)
                branch_envs.append(pool[slot])
        return branch_envs


@dataclass
class VineBatch:
    """
    The rollout set of one update and what its branches estimated (the vine surrogate's samples).

    :param states: the N states, as the policy takes them
    :param actions: the N·K first actions, state-major, as the policy's distribution draws them
    :param proposal_log_prob: ``log q(a_{n,k}|s_n)``, shape (N, K)
    :param q_values: the estimates of Q(s_n, a_{n,k}), shape (N, K)
    """

    states: th.Tensor | dict[str, th.Tensor]
    actions: th.Tensor
    proposal_log_prob: th.Tensor
    q_values: th.Tensor


@dataclass
class BranchResult:
    """
    What the branch rollouts of one rollout set gave.

    :param q_values: the estimates of Q(s_n, a_{n,k}), shape (N, K)
    :param env_steps: the number of environment steps the branches took
    """

    q_values: th.Tensor
    env_steps: int


def stack_observations(observations: list) -> np.ndarray | dict[str, np.ndarray]:
    """
    :param observations: single observations of one space (arrays, or dicts of arrays for Dict spaces)
    :return: them as one batch
    """
    if isinstance(observations[0], dict):
        return {key: np.stack([obs[key] for obs in observations]) for key in observations[0]}
    return np.stack(observations)


def branch_rollouts(
    policy: ActorCriticPolicy,
    envs: list[gym.Env],
    first_actions: th.Tensor,
    n_actions: int,
    horizon: int,
    gamma: float,
    transforms: VecEnvTransforms,
    generator: th.Generator,
) -> BranchResult:
    """
    Estimate Q(s_n, a_{n,k}) = Σ_{h<H} γʰ r_h + γᴴ V(s_H) by K rollouts from each saved state s_n: the k-th
    starts with the action a_{n,k}, then follows the current policy for at most H steps in all. The K branches of
    one state share their random numbers (seed 004, Sec. 1.4.2): each starts from the same saved state, random
    generator included, and draws its actions with the same noise (:func:`sample_with_common_noise`),
    so two branches differ only through their first actions. A branch that terminates adds nothing after; one that
    the time limit truncates, or that reaches the horizon, is completed by the critic's value of its last state.

    :param policy: the policy at θ_old (actions and values)
    :param envs: the N·K branch environments, state-major, each in its state s_n (:class:`BranchEnvPool`)
    :param first_actions: the N·K first actions a_{n,k}, state-major, as the policy's distribution draws them
    :param n_actions: K
    :param horizon: H, the most steps a branch takes (its first action included)
    :param gamma: the discount factor
    :param transforms: what the training environment's wrappers do to observations and rewards (``VecNormalize``'s
        statistics normalize the branches' without being updated)
    :param generator: the random number generator of the branches' actions
    :return: the Q-value estimates, shape (N, K), and the number of environment steps taken
    """
    n_branches = len(envs)
    returns = np.zeros(n_branches)
    discount = np.ones(n_branches)
    alive = np.ones(n_branches, dtype=bool)
    # Branches cut by the time limit or the horizon, completed by the value of their last observation
    bootstrap = np.zeros(n_branches, dtype=bool)
    last_observations: list = [None] * n_branches
    actions = first_actions
    env_steps = 0
    for step in range(horizon):
        step_actions = env_actions(actions.detach().cpu().numpy(), policy)
        if np.issubdtype(step_actions.dtype, np.floating) and not np.isfinite(step_actions).all():
            # As in the rollout: an environment must not be stepped with NaN actions
            raise ValueError("A vine branch drew non-finite actions: are the observations and the policy finite?")
        for index in np.flatnonzero(alive):
            obs, reward, terminated, truncated, _ = envs[index].step(step_actions[index])
            env_steps += 1
            last_observations[index] = obs
            returns[index] += discount[index] * transforms.reward(float(reward))
            discount[index] *= gamma
            if terminated or truncated or step == horizon - 1:
                alive[index] = False
                bootstrap[index] = not terminated
        if not alive.any():
            break
        # Every branch keeps its row, so that the K branches of a state stay one group of the noise: the rows of the
        # branches that ended hold their last observation and their actions are not used
        with th.no_grad():
            distribution = policy.get_distribution(_policy_input(last_observations, transforms, policy))
            actions = sample_with_common_noise(distribution, n_actions, generator)

    if bootstrap.any():
        indices = np.flatnonzero(bootstrap)
        obs_tensor = _policy_input([last_observations[index] for index in indices], transforms, policy)
        with th.no_grad():
            values = policy.predict_values(obs_tensor).flatten().cpu().numpy()
        returns[indices] += discount[indices] * values
    q_values = th.as_tensor(returns, dtype=th.float32, device=policy.device).view(n_branches // n_actions, n_actions)
    return BranchResult(q_values, env_steps)


def _policy_input(
    observations: list, transforms: VecEnvTransforms, policy: ActorCriticPolicy
) -> th.Tensor | dict[str, th.Tensor]:
    return obs_as_tensor(transforms.observations(stack_observations(observations)), policy.device)
