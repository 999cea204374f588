"""TRPO's vine sampling: the surrogate of Eqs. 32-33 and the common random numbers, against dense computations."""

import copy
import math
import threading
from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from gymnasium.envs.mujoco.half_cheetah_v5 import HalfCheetahEnv
from gymnasium.utils import EzPickle
from gymnasium.wrappers import RecordVideo
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecFrameStack, VecNormalize, VecTransposeImage

from sb3_trust import TRPO
from sb3_trust.common.distributions import detach_distribution, mean_kl, sample_with_common_noise, torch_distributions
from sb3_trust.common.fisher import flat_gradient, flat_parameters, set_flat_parameters
from sb3_trust.common.policies import split_actor_critic_parameters
from sb3_trust.common.snapshots import SnapshotError, make_branch_env, restore_env, snapshot_env, wrapper_chain
from sb3_trust.common.surrogate import VineSurrogate
from sb3_trust.common.vine import BranchEnvPool, VecEnvTransforms, branch_rollouts, branchable_envs
from tests.test_fisher import tiny_policy


def move_actor(policy: ActorCriticPolicy, seed: int, scale: float = 0.3) -> None:
    actor, _ = split_actor_critic_parameters(policy)
    generator = th.Generator().manual_seed(seed)
    flat = flat_parameters(actor)
    set_flat_parameters(actor, flat + scale * th.randn(flat.shape, generator=generator))


def test_vine_surrogate_with_every_action_is_eq_32() -> None:
    # Every action of Discrete(3) once, q uniform: L_n(θ) = Σ_a π_θ(a|s_n) Q(s_n, a) - mean_a Q(s_n, a), exactly
    policy = tiny_policy("categorical")
    n_states, n_actions = 4, 3
    states, trunk = th.randn(n_states, 3), th.randn(7, 3)
    q_values = th.randn(n_states, n_actions) * 5
    actions = th.arange(n_actions).repeat(n_states)
    uniform = th.full((n_states, n_actions), -math.log(n_actions))
    surrogate = VineSurrogate(policy, trunk, states, actions, q_values, uniform, normalize_scale=False)
    actor, _ = split_actor_critic_parameters(policy)
    for seed in range(3):
        move_actor(policy, seed)
        probs = th.softmax(policy.action_net(policy.mlp_extractor.forward_actor(policy.extract_features(states))), -1)
        dense = (probs * (q_values - q_values.mean(1, keepdim=True))).sum(1).mean()
        evaluation = surrogate.evaluate()
        assert evaluation.objective.item() == pytest.approx(dense.item(), rel=1e-5, abs=1e-6)
        assert th.allclose(flat_gradient(evaluation.objective, actor), flat_gradient(dense, actor), atol=1e-5)


@pytest.mark.parametrize("name", ["gaussian", "categorical", "multi-categorical", "bernoulli"])
def test_vine_surrogate_is_eq_33(name: str) -> None:
    # Actions from q = π_old; at θ_old ∇L = 1/(NK) Σ ∇log π(a_nk|s_n)(Q_nk - Q̄_n), and elsewhere the weights
    # are w / Σ_k w with w = π_θ / π_old, written out here in float64
    policy = tiny_policy(name)
    n_states, n_actions = 5, 4
    states, trunk = th.randn(n_states, 3), th.randn(6, 3)
    with th.no_grad():
        rows = states.repeat_interleave(n_actions, dim=0)
        actions = policy.get_distribution(rows).sample()
        old_log_prob = policy.get_distribution(rows).log_prob(actions).view(n_states, n_actions)
    q_values = th.randn(n_states, n_actions) * 3
    surrogate = VineSurrogate(policy, trunk, states, actions, q_values, old_log_prob, normalize_scale=False)
    actor, _ = split_actor_critic_parameters(policy)
    centred = q_values - q_values.mean(1, keepdim=True)

    evaluation = surrogate.evaluate()
    assert evaluation.objective.item() == pytest.approx(0.0, abs=1e-6)
    per_sample = [
        flat_gradient(policy.get_distribution(rows[i : i + 1]).log_prob(actions[i : i + 1]).sum(), actor)
        for i in range(len(rows))
    ]
    dense_gradient = sum(g * c for g, c in zip(per_sample, centred.flatten(), strict=True)) / (n_states * n_actions)
    assert th.allclose(flat_gradient(evaluation.objective, actor), dense_gradient, atol=1e-5)
    assert dense_gradient.norm() > 1e-3

    move_actor(policy, seed=1)
    with th.no_grad():
        log_prob = policy.get_distribution(rows).log_prob(actions).double().view(n_states, n_actions)
        weights = th.exp(log_prob - old_log_prob.double())
        dense = ((weights * centred.double()).sum(1) / weights.sum(1)).mean()
        assert surrogate.evaluate().objective.item() == pytest.approx(dense.item(), rel=1e-5, abs=1e-7)


def test_vine_surrogate_kl_and_fisher_states_are_the_trunk() -> None:
    policy = tiny_policy("gaussian")
    states, trunk = th.randn(2, 3), th.randn(9, 3)
    actions = th.zeros(4, 2)
    surrogate = VineSurrogate(policy, trunk, states, actions, th.randn(2, 2), th.zeros(2, 2), normalize_scale=True)
    assert len(surrogate) == 9
    old = detach_distribution(policy.get_distribution(trunk))
    move_actor(policy, seed=2)
    with th.no_grad():
        expected = mean_kl(old, policy.get_distribution(trunk))
        assert expected > 1e-3
        assert surrogate.evaluate().kl.item() == pytest.approx(expected.item(), rel=1e-5)
    rows = th.tensor([1, 4])
    assert th.allclose(
        surrogate.distribution_on(rows).distribution.mean, policy.get_distribution(trunk[rows]).distribution.mean
    )


def test_vine_surrogate_normalized_scale() -> None:
    # Centred per state, then divided by the standard deviation over the whole batch
    policy = tiny_policy("categorical")
    q_values = th.tensor([[1.0, 3.0], [10.0, 30.0]])
    surrogate = VineSurrogate(
        policy, th.randn(3, 3), th.randn(2, 3), th.tensor([0, 1, 0, 1]), q_values, th.zeros(2, 2), normalize_scale=True
    )
    centred = th.tensor([[-1.0, 1.0], [-10.0, 10.0]])
    assert th.allclose(surrogate.q_values, centred / centred.std(), atol=1e-6)


def test_vine_surrogate_refuses_mismatched_shapes() -> None:
    policy = tiny_policy("categorical")
    with pytest.raises(ValueError, match="2 states × 3 actions"):
        VineSurrogate(policy, th.randn(3, 3), th.randn(2, 3), th.zeros(5), th.zeros(2, 3), th.zeros(2, 3), True)
    with pytest.raises(ValueError, match="2 states × 3 actions"):
        VineSurrogate(policy, th.randn(3, 3), th.randn(2, 3), th.zeros(6), th.zeros(2, 3), th.zeros(3, 2), True)


@pytest.mark.parametrize("name", ["gaussian", "categorical", "multi-categorical", "bernoulli"])
def test_common_noise_gives_one_action_per_group_for_one_law(name: str) -> None:
    policy = tiny_policy(name)
    group_size = 4
    # Each group of rows repeats one state: one law, so one action per group
    states = th.randn(50, 3).repeat_interleave(group_size, dim=0)
    distribution = policy.get_distribution(states)
    actions = sample_with_common_noise(distribution, group_size, th.Generator().manual_seed(0))
    assert actions.shape == distribution.sample().shape
    grouped = actions.view(50, group_size, -1)
    assert (grouped == grouped[:, :1]).all()
    # Different groups do draw different actions
    assert len({tuple(row.tolist()) for row in grouped[:, 0]}) > 1
    again = sample_with_common_noise(distribution, group_size, th.Generator().manual_seed(0))
    assert th.equal(actions, again)


def test_common_noise_categorical_is_the_inverse_cdf() -> None:
    probs = th.tensor([[0.2, 0.5, 0.3]]).repeat(3, 1)
    distribution = tiny_policy("categorical").action_dist.proba_distribution(th.log(probs))
    generator = th.Generator().manual_seed(3)
    uniform = th.rand(1, generator=th.Generator().manual_seed(3)).item()
    expected = 0 if uniform < 0.2 else 1 if uniform < 0.7 else 2
    assert sample_with_common_noise(distribution, 3, generator).tolist() == [expected] * 3


@pytest.mark.parametrize("name", ["gaussian", "categorical", "multi-categorical", "bernoulli"])
def test_common_noise_draws_from_the_law(name: str) -> None:
    # Groups of one row: independent draws, whose frequencies (or moments) are the distribution's
    policy = tiny_policy(name)
    n = 40000
    distribution = policy.get_distribution(th.randn(1, 3).repeat(n, 1))
    actions = sample_with_common_noise(distribution, 1, th.Generator().manual_seed(1)).float()
    part = torch_distributions(distribution)[0]
    if name == "gaussian":
        assert th.allclose(actions.mean(0), part.mean[0], atol=0.03)
        assert th.allclose(actions.std(0), part.stddev[0], atol=0.03)
    elif name == "categorical":
        frequencies = th.bincount(actions.long(), minlength=3).float() / n
        assert th.allclose(frequencies, part.probs[0], atol=0.01)
    elif name == "multi-categorical":
        for column, categorical in enumerate(torch_distributions(distribution)):
            frequencies = th.bincount(actions[:, column].long(), minlength=categorical.probs.shape[-1]).float() / n
            assert th.allclose(frequencies, categorical.probs[0], atol=0.01)
    else:
        assert th.allclose(actions.mean(0), part.probs[0], atol=0.01)


def test_common_noise_refusals() -> None:
    gsde = tiny_policy("gsde").get_distribution(th.randn(4, 3))
    with pytest.raises(TypeError, match="StateDependentNoiseDistribution"):
        sample_with_common_noise(gsde, 2)
    with pytest.raises(ValueError, match="5 rows are no whole number of groups of 2"):
        sample_with_common_noise(tiny_policy("gaussian").get_distribution(th.randn(5, 3)), 2)


NO_TRANSFORMS = VecEnvTransforms([])

# --- Environment snapshots and branch rollouts ---------------------------------------------------------------------


class NoisyChain(gym.Env):
    """
    Plain-Python environment: the observation is (step, noise), the reward 1 + the noise, drawn from ``np_random`` in
    every step; it terminates after ``length`` steps.
    """

    def __init__(self, length: int = 1000, n_actions: int = 2) -> None:
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (2,))
        self.action_space = gym.spaces.Discrete(n_actions)
        self.length = length
        self.t = 0

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self.t = 0
        return np.array([0.0, 0.0], dtype=np.float32), {}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        self.t += 1
        noise = float(self.np_random.normal())
        return np.array([self.t, noise], dtype=np.float32), 1.0 + noise, self.t >= self.length, False, {}


def stepped_vec_env(env_id: str | Callable[[], gym.Env], n_steps: int = 7) -> DummyVecEnv:
    vec_env = make_vec_env(env_id, n_envs=1, seed=3)
    assert isinstance(vec_env, DummyVecEnv)
    vec_env.reset()
    vec_env.action_space.seed(0)
    for _ in range(n_steps):
        vec_env.step(np.array([vec_env.action_space.sample()]))
    return vec_env


def steps_until_done(env: gym.Env, actions: list) -> list[tuple[Any, float, bool]]:
    steps = []
    for action in actions:
        obs, reward, terminated, truncated, _ = env.step(action)
        steps.append((obs, float(reward), terminated or truncated))
        if terminated or truncated:
            break
    return steps


class LazyCounter(NoisyChain):
    """Creates an attribute at its first step: a restore must remove it from a branch that has stepped."""

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        self.calls = getattr(self, "calls", 0) + 1
        obs, reward, terminated, truncated, info = super().step(action)
        return obs, reward + self.calls, terminated, truncated, info


def test_restore_removes_the_attributes_a_branch_created() -> None:
    vec_env = stepped_vec_env(LazyCounter, n_steps=0)
    trunk = vec_env.envs[0]
    saved = snapshot_env(trunk)  # before the first step: no `calls` yet
    branch = make_branch_env(trunk)
    for _ in range(2):
        restore_env(branch, saved)
        rewards = [branch.step(0)[1] for _ in range(3)]
    assert rewards == [trunk.step(0)[1] for _ in range(3)]


def short_time_limit() -> gym.Env:
    # The trunk is 5 steps from its time limit when saved: a branch restored again after running into it must not
    # inherit its step count
    return gym.wrappers.TimeLimit(NoisyChain(), 12)


SNAPSHOT_ENVS = ["CartPole-v1", "Pendulum-v1", "HalfCheetah-v5", "Hopper-v5", "Ant-v5", NoisyChain, short_time_limit]


@pytest.mark.parametrize("env_id", SNAPSHOT_ENVS, ids=lambda env_id: getattr(env_id, "__name__", env_id))
def test_branch_replays_the_trunk_exactly(env_id: Any) -> None:
    # A branch restored from a snapshot and given the trunk's next actions sees the trunk's observations and rewards,
    # bit for bit; the trunk's Monitor records none of the branch's steps
    vec_env = stepped_vec_env(env_id)
    trunk = vec_env.envs[0]
    saved = snapshot_env(trunk)
    actions = [vec_env.action_space.sample() for _ in range(30)]
    branch = make_branch_env(trunk)
    assert not any(isinstance(wrapper, Monitor) for wrapper in wrapper_chain(branch))
    for _ in range(2):  # a snapshot can be restored more than once
        restore_env(branch, saved)
        branch_steps = steps_until_done(branch, actions)
    assert isinstance(trunk, Monitor)
    steps_before = trunk.get_total_steps()
    trunk_steps = steps_until_done(trunk, actions)
    assert trunk.get_total_steps() == steps_before + len(trunk_steps) >= steps_before + 5
    assert len(branch_steps) == len(trunk_steps)
    for (branch_obs, branch_reward, branch_done), (trunk_obs, trunk_reward, trunk_done) in zip(
        branch_steps, trunk_steps, strict=True
    ):
        np.testing.assert_array_equal(branch_obs, trunk_obs)
        assert branch_reward == trunk_reward and branch_done == trunk_done


def test_branch_replays_an_atari_trunk_with_sticky_actions() -> None:
    # ALE's own generator (sticky actions) is in the snapshot: without it two branches would differ
    ale_py = pytest.importorskip("ale_py")
    gym.register_envs(ale_py)
    vec_env = stepped_vec_env(lambda: gym.make("ALE/Pong-v5", repeat_action_probability=0.5), n_steps=40)
    trunk = vec_env.envs[0]
    saved = snapshot_env(trunk)
    actions = [vec_env.action_space.sample() for _ in range(60)]
    branch = make_branch_env(trunk)
    restore_env(branch, saved)
    branch_steps, trunk_steps = steps_until_done(branch, actions), steps_until_done(trunk, actions)
    assert len(branch_steps) == len(trunk_steps)
    np.testing.assert_array_equal(np.stack([s[0] for s in branch_steps]), np.stack([s[0] for s in trunk_steps]))


class GoalCheetah(HalfCheetahEnv):
    """A MuJoCo task whose goal speed, drawn at reset, lives in a Python attribute."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # (EzPickle rebuilds it with HalfCheetahEnv's arguments)
        super().__init__(*args, **kwargs)
        self.target = 0.0

    def reset_model(self) -> np.ndarray:
        self.target = float(self.np_random.uniform(-3, 3))
        return super().reset_model()

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        obs, _, terminated, truncated, info = super().step(action)
        return obs, -abs(info["x_velocity"] - self.target), terminated, truncated, info


def heavy_cheetah() -> gym.Env:
    # The model changed after construction: a branch environment built from the constructor's arguments would not have it
    env = gym.make("HalfCheetah-v5")
    env.unwrapped.model.body_mass[:] *= 2  # type: ignore[attr-defined]
    return env


class PoleAngleBonus(gym.Wrapper):
    """A wrapper that keeps a reference into its chain (a common pattern for reward shaping)."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        self.core = env.unwrapped

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        return obs, float(reward) - abs(self.core.state[2]), terminated, truncated, info  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "env_id",
    [GoalCheetah, heavy_cheetah, lambda: PoleAngleBonus(gym.make("CartPole-v1"))],
    ids=["attribute-of-a-MuJoCo-env", "changed-MuJoCo-model", "wrapper-referring-to-its-env"],
)
def test_branch_replays_what_more_than_the_simulator_holds(env_id: Any) -> None:
    test_branch_replays_the_trunk_exactly(env_id)


def test_branch_environments_leave_out_recording_and_rendering(tmp_path: Any) -> None:
    env = Monitor(RecordVideo(gym.make("CartPole-v1", render_mode="rgb_array"), str(tmp_path), episode_trigger=lambda _: True))
    env.reset(seed=0)
    branch = make_branch_env(env)
    assert [type(layer) for layer in wrapper_chain(branch)] == [type(layer) for layer in wrapper_chain(env)[2:]]
    assert branch.unwrapped.render_mode is None and env.unwrapped.render_mode == "rgb_array"
    restore_env(branch, snapshot_env(env))
    for _ in range(5):
        branch.step(0)
    env.close()
    assert len(list(tmp_path.iterdir())) <= 1  # the trunk's own video only


class CheetahTask(gym.Env):
    """A task built around another environment (composition, no wrapper): its copy would be a new environment."""

    def __init__(self) -> None:
        self.inner = gym.make("HalfCheetah-v5")
        self.observation_space, self.action_space = self.inner.observation_space, self.inner.action_space

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[Any, dict]:
        return self.inner.reset(seed=seed)

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict]:
        return self.inner.step(action)  # type: ignore[return-value]


class LockedEnv(NoisyChain):
    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()


def test_snapshot_refusals() -> None:
    with pytest.raises(SnapshotError, match="Cannot save the state of LunarLander"):
        snapshot_env(gym.make("LunarLander-v3"))
    with pytest.raises(TypeError, match=r"CheetahTask\.inner holds an environment"):
        snapshot_env(CheetahTask())
    # At construction, not after the first rollout
    with pytest.raises(TypeError, match=r"CheetahTask\.inner holds an environment"):
        vine_trpo(make_vec_env(CheetahTask, n_envs=1))
    with pytest.raises(TypeError, match=r"cannot save, copy and restore the state of .*LockedEnv.*cannot pickle"):
        vine_trpo(make_vec_env(LockedEnv, n_envs=1))


class UserStateEnv(NoisyChain, EzPickle):
    """An EzPickle environment (no deep copy) that saves its own state."""

    def __init__(self) -> None:
        NoisyChain.__init__(self)
        EzPickle.__init__(self)

    def get_vine_state(self) -> tuple[int, str]:
        return self.t, "saved"

    def set_vine_state(self, state: tuple[int, str]) -> None:
        self.t = state[0]


def test_snapshot_uses_the_environments_own_methods() -> None:
    vec_env = stepped_vec_env(UserStateEnv, n_steps=5)
    saved = snapshot_env(vec_env.envs[0])
    assert saved.simulator_state == (5, "saved")
    branch = make_branch_env(vec_env.envs[0])
    restore_env(branch, saved)
    assert branch.unwrapped.t == 5  # type: ignore[attr-defined]
    assert branch.step(0)[0][0] == vec_env.envs[0].step(0)[0][0] == 6


def branch_policy(env: gym.Env, seed: int = 0) -> ActorCriticPolicy:
    th.manual_seed(seed)
    return ActorCriticPolicy(env.observation_space, env.action_space, lambda _: 1e-3, net_arch=[8])


@pytest.mark.parametrize("env_id", ["Pendulum-v1", NoisyChain], ids=["Pendulum-v1", "NoisyChain"])
def test_common_random_numbers_give_equal_q_for_equal_actions(env_id: Any) -> None:
    # The K branches of a state share the environment's and the policy's noise: equal first actions, equal Q
    vec_env = stepped_vec_env(env_id)
    policy = branch_policy(vec_env.envs[0])
    saved = [(0, snapshot_env(vec_env.envs[0]))]
    n_actions = 4
    first = policy.get_distribution(th.zeros(1, *vec_env.observation_space.shape)).sample()
    envs = BranchEnvPool().restored(vec_env, saved, n_actions)
    result = branch_rollouts(
        policy, envs, first.repeat_interleave(n_actions, dim=0), n_actions, 30, 0.9, NO_TRANSFORMS, th.Generator()
    )
    assert result.q_values.shape == (1, n_actions)
    assert th.all(result.q_values == result.q_values[0, 0])
    assert result.env_steps == 30 * n_actions
    if env_id == "Pendulum-v1":
        # Without shared policy noise (groups of one), they differ
        envs = BranchEnvPool().restored(vec_env, saved, n_actions)
        independent = branch_rollouts(
            policy, envs, first.repeat_interleave(n_actions, dim=0), 1, 30, 0.9, NO_TRANSFORMS, th.Generator()
        ).q_values.flatten()
        assert len(set(independent.tolist())) == n_actions


def test_branches_refuse_non_finite_actions() -> None:
    vec_env = stepped_vec_env("Pendulum-v1")
    policy = branch_policy(vec_env.envs[0])
    envs = BranchEnvPool().restored(vec_env, [(0, snapshot_env(vec_env.envs[0]))], 2)
    with pytest.raises(ValueError, match="non-finite actions"):
        branch_rollouts(policy, envs, th.tensor([[0.5], [float("nan")]]), 2, 5, 0.9, NO_TRANSFORMS, th.Generator())


class ConstantValue(ActorCriticPolicy):
    def predict_values(self, obs: th.Tensor) -> th.Tensor:  # type: ignore[override]
        return th.full((len(obs), 1), 10.0)


@pytest.mark.parametrize(
    ("length", "time_limit", "horizon", "expected_steps", "bootstrap"),
    [(4, None, 10, 4, False), (50, None, 6, 6, True), (50, 5, 10, 5, True)],
    ids=["terminated", "horizon", "truncated"],
)
def test_branch_q_values(length: int, time_limit: int | None, horizon: int, expected_steps: int, bootstrap: bool) -> None:
    # Q = Σ_{h<L} γʰ r_h (+ γᴸ V(s_L) when cut by the horizon or the time limit), with NoisyChain's rewards 1 + noise
    def make() -> gym.Env:
        env = NoisyChain(length=length)
        return gym.wrappers.TimeLimit(env, time_limit) if time_limit else env

    vec_env = make_vec_env(make, n_envs=1, seed=0)
    replay = make_vec_env(make, n_envs=1, seed=0)
    vec_env.reset()
    replay.reset()
    policy = ConstantValue(vec_env.observation_space, vec_env.action_space, lambda _: 1e-3, net_arch=[8])
    envs = BranchEnvPool().restored(vec_env, [(0, snapshot_env(vec_env.envs[0]))], 2)
    q_values = branch_rollouts(policy, envs, th.tensor([0, 1]), 2, horizon, 0.9, NO_TRANSFORMS, th.Generator()).q_values
    rewards = [replay.envs[0].step(0)[1] for _ in range(expected_steps)]
    expected = sum(0.9**h * reward for h, reward in enumerate(rewards)) + (0.9**expected_steps * 10.0 if bootstrap else 0.0)
    assert q_values.flatten().tolist() == pytest.approx([expected, expected], rel=1e-6)


class StepCountValue(ActorCriticPolicy):
    def predict_values(self, obs: th.Tensor) -> th.Tensor:  # type: ignore[override]
        return obs[:, :1]


def test_branch_rewards_and_observations_normalized_with_frozen_statistics() -> None:
    # Rewards through normalize_reward, the bootstrap's observation through normalize_obs (V(o) = its first
    # coordinate here), and VecNormalize's statistics untouched
    vec_env = VecNormalize(make_vec_env(lambda: NoisyChain(length=50), n_envs=1, seed=0), gamma=0.9)
    vec_env.reset()
    for _ in range(20):
        vec_env.step(np.array([0]))
    dummy, transforms = branchable_envs(vec_env)
    assert transforms.vec_normalize is vec_env
    statistics = copy.deepcopy((vec_env.obs_rms, vec_env.ret_rms, vec_env.returns))
    policy = StepCountValue(dummy.observation_space, dummy.action_space, lambda _: 1e-3, net_arch=[8])
    replay = copy.deepcopy(dummy.envs[0].unwrapped)
    envs = BranchEnvPool().restored(dummy, [(0, snapshot_env(dummy.envs[0]))], 2)
    q_values = branch_rollouts(policy, envs, th.tensor([0, 1]), 2, 4, 0.9, transforms, th.Generator()).q_values
    steps = [replay.step(0) for _ in range(4)]
    expected = sum(0.9**h * vec_env.normalize_reward(np.array([step[1]]))[0] for h, step in enumerate(steps))
    expected += 0.9**4 * vec_env.normalize_obs(steps[-1][0][None])[0, 0]
    assert q_values[0, 0].item() == pytest.approx(expected, rel=1e-5)
    after = (vec_env.obs_rms, vec_env.ret_rms, vec_env.returns)
    assert after[0].mean.tolist() == statistics[0].mean.tolist() and after[0].count == statistics[0].count
    assert after[1].var.tolist() == statistics[1].var.tolist() and after[2].tolist() == statistics[2].tolist()


# --- TRPO(sampling="vine") -----------------------------------------------------------------------------------------


def vine_trpo(env: Any, policy: str = "MlpPolicy", **kwargs: Any) -> TRPO:
    settings: dict[str, Any] = dict(n_steps=64, batch_size=64, vine_n_states=8, vine_horizon=20, seed=0)
    settings.update(kwargs)
    return TRPO(policy, env, sampling="vine", **settings)


def test_vine_trunk_is_the_single_path_rollout() -> None:
    # The rollout set is drawn from NumPy's generator and the branches run after the rollout: the trunk is unchanged
    buffers = []
    for sampling in ("single_path", "vine"):
        model = TRPO(
            "MlpPolicy",
            make_vec_env("CartPole-v1", n_envs=2, seed=0),
            n_steps=64,
            batch_size=64,
            seed=0,
            sampling=sampling,
            vine_n_states=8,
        )
        model.learn(128)
        buffers.append(model.rollout_buffer)
    for name in ("observations", "actions", "rewards", "episode_starts", "log_probs", "values"):
        np.testing.assert_array_equal(getattr(buffers[0], name), getattr(buffers[1], name))


def test_vine_update_and_monitor() -> None:
    env = make_vec_env("CartPole-v1", n_envs=2, seed=0)
    model = vine_trpo(env)
    model.learn(256)
    # The branches' steps are not the training run's: num_timesteps and the Monitors count the trunk only
    assert model.num_timesteps == 256
    assert sum(monitor.get_total_steps() for monitor in env.envs) == 256  # type: ignore[attr-defined]
    assert model._vine_batch is not None
    assert model._vine_batch.q_values.shape == (8, 2)  # Discrete(2) ≤ K = 4: every action once (Eq. 32)


@pytest.mark.parametrize(
    "env_id",
    [lambda: NoisyChain(n_actions=7), "Pendulum-v1"],
    ids=["Discrete(7)", "Box"],
)
@pytest.mark.filterwarnings("ignore:.*policy update skipped:RuntimeWarning")
def test_vine_draws_k_actions_from_the_policy(env_id: Any) -> None:
    model = vine_trpo(make_vec_env(env_id, n_envs=1, seed=0), vine_n_actions=3)
    model.learn(64)
    assert model._vine_batch is not None
    assert model._vine_batch.q_values.shape == (8, 3)
    # K independent draws per state, not one action repeated
    actions = model._vine_batch.actions.view(8, 3, -1)
    assert any(len({tuple(action.tolist()) for action in state_actions}) > 1 for state_actions in actions)


class SpacesEnv(gym.Env):
    """Plain-Python environment with the given action space and a Box or Dict observation; reward from the action."""

    def __init__(self, action_space: gym.spaces.Space, dict_observation: bool = False) -> None:
        box = gym.spaces.Box(-1, 1, (3,))
        self.observation_space = gym.spaces.Dict({"a": box, "b": box}) if dict_observation else box
        self.action_space = action_space
        self.t = 0

    def _obs(self) -> Any:
        obs = self.np_random.uniform(-1, 1, 3).astype(np.float32)
        return {"a": obs, "b": -obs} if isinstance(self.observation_space, gym.spaces.Dict) else obs

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[Any, dict]:
        super().reset(seed=seed)
        self.t = 0
        return self._obs(), {}

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict]:
        self.t += 1
        return self._obs(), float(np.sum(action)), False, self.t >= 30, {}


@pytest.mark.parametrize(
    ("action_space", "dict_observation"),
    [(gym.spaces.MultiDiscrete([3, 4]), False), (gym.spaces.MultiBinary(3), False), (gym.spaces.Discrete(3), True)],
    ids=["MultiDiscrete", "MultiBinary", "Dict-observations"],
)
def test_vine_updates_the_policy_with_other_spaces(action_space: gym.spaces.Space, dict_observation: bool) -> None:
    env = make_vec_env(lambda: SpacesEnv(action_space, dict_observation), n_envs=2, seed=0)
    policy = "MultiInputPolicy" if dict_observation else "MlpPolicy"
    model = TRPO(policy, env, sampling="vine", n_steps=32, batch_size=64, vine_n_states=8, vine_horizon=5, seed=0)
    before = [param.clone() for param in model.policy.action_net.parameters()]
    model.learn(64)
    assert model._vine_batch is not None and model._vine_batch.q_values.shape == (8, 3 if dict_observation else 4)
    assert model.logger.name_to_value["train/is_line_search_success"] == 1.0
    assert any(not th.equal(old, new) for old, new in zip(before, model.policy.action_net.parameters(), strict=True))


class ImageEnv(gym.Env):
    """Plain-Python environment with image observations (SB3 adds VecTransposeImage for CnnPolicy)."""

    def __init__(self) -> None:
        self.observation_space = gym.spaces.Box(0, 255, (36, 36, 3), np.uint8)
        self.action_space = gym.spaces.Discrete(2)
        self.t = 0

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self.t = 0
        return np.zeros((36, 36, 3), np.uint8), {}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        self.t += 1
        obs = np.zeros((36, 36, 3), np.uint8)
        obs[..., int(action)] = 10 * self.t
        return obs, float(action), False, self.t >= 20, {}


def test_vine_with_image_observations() -> None:
    model = vine_trpo(make_vec_env(ImageEnv, n_envs=1, seed=0), policy="CnnPolicy", n_steps=16, batch_size=16, vine_n_states=4)
    assert isinstance(model.env, VecTransposeImage)
    _, transforms = branchable_envs(model.env)
    assert transforms.observations(np.zeros((2, 36, 36, 3), np.uint8)).shape == (2, 3, 36, 36)
    model.learn(16)
    assert model._vine_batch is not None and model._vine_batch.q_values.shape == (4, 2)
    # Action 1 earns 1 per step: its Q-value is the larger at every state
    assert (model._vine_batch.q_values[:, 1] > model._vine_batch.q_values[:, 0]).all()


def test_vine_refusals() -> None:
    cartpole = make_vec_env("CartPole-v1", n_envs=1)
    with pytest.raises(ValueError, match="`sampling` must be 'single_path' or 'vine'"):
        TRPO("MlpPolicy", cartpole, sampling="tree")
    with pytest.raises(ValueError, match="vine_n_actions"):
        vine_trpo(cartpole, vine_n_actions=1)
    with pytest.raises(ValueError, match="vine_n_states` \\(65\\) exceeds the rollout size"):
        vine_trpo(cartpole, vine_n_states=65)
    with pytest.raises(ValueError, match="gSDE"):
        vine_trpo(make_vec_env("Pendulum-v1", n_envs=1), use_sde=True)
    with pytest.raises(ValueError, match="not SubprocVecEnv"):
        vine_trpo(make_vec_env("CartPole-v1", n_envs=2, vec_env_cls=SubprocVecEnv))
    with pytest.raises(ValueError, match="not VecFrameStack"):
        vine_trpo(VecFrameStack(make_vec_env("CartPole-v1", n_envs=1), 2))
    with pytest.raises(TypeError, match="LunarLander"):
        vine_trpo(make_vec_env("LunarLander-v3", n_envs=1))
    # Single-path sampling takes them all
    TRPO("MlpPolicy", make_vec_env("LunarLander-v3", n_envs=1), n_steps=64, batch_size=64)


def test_vine_with_vec_normalize_updates_its_statistics_with_the_trunk_only() -> None:
    env = VecNormalize(make_vec_env("HalfCheetah-v5", n_envs=2, seed=0))
    model = vine_trpo(env, n_steps=32, vine_horizon=10)
    model.learn(128, log_interval=None)  # no dump: the logger keeps the last values
    assert model.logger.name_to_value["rollout/vine_env_steps"] == 8 * 4 * 10
    # The reset's observations and the trunk's steps, not the branches' 320 steps per update
    assert env.obs_rms.count == pytest.approx(2 + 128 + 1e-4)
    assert model.logger.name_to_value["train/is_line_search_success"] == 1.0


def test_vine_branches_from_a_new_environment() -> None:
    # set_env: the branch environments are made from the new environment (here one without any wrapper)
    model = vine_trpo(make_vec_env("CartPole-v1", n_envs=1, seed=0))
    model.learn(64)
    model.set_env(DummyVecEnv([lambda: gym.make("CartPole-v1").unwrapped]))
    model.learn(64)
    assert model._vine_batch is not None


def test_vine_save_and_load(tmp_path: Any) -> None:
    env = make_vec_env("CartPole-v1", n_envs=1, seed=0)
    model = vine_trpo(env, vine_n_actions=3, vine_horizon=7)
    model.learn(64)
    model.save(tmp_path / "vine")
    loaded = TRPO.load(tmp_path / "vine", env=env)
    assert (loaded.sampling, loaded.vine_n_states, loaded.vine_n_actions, loaded.vine_horizon) == ("vine", 8, 3, 7)
    assert loaded._vine_batch is None and isinstance(loaded._vine_pool, BranchEnvPool)
    loaded.learn(64)
    assert loaded._vine_batch is not None
