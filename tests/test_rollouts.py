"""
The rollout path (``TrustOnPolicyAlgorithm.collect_rollouts``, written for speed) against SB3's own
``OnPolicyAlgorithm.collect_rollouts`` on the same model and seed, and the buffer's values and log-probabilities
against what the policy's own methods give, for policies that override them.
"""

from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from torch import nn

from sb3_trust import TRPO


class DropoutExtractor(BaseFeaturesExtractor):
    def __init__(self, observation_space: gym.spaces.Box) -> None:
        super().__init__(observation_space, 8)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(observation_space.shape)), 8), nn.Dropout(0.5))

    def forward(self, observations: th.Tensor) -> th.Tensor:
        return self.net(observations)


class LocalsRecorder(BaseCallback):
    """What a callback sees at each step and at the end of each rollout."""

    def __init__(self) -> None:
        super().__init__()
        self.steps: list[tuple[Any, ...]] = []
        self.ends: list[tuple[np.ndarray, np.ndarray]] = []

    def _on_step(self) -> bool:
        seen = self.locals
        arrays = tuple(np.copy(seen[key]) for key in ("new_obs", "rewards", "dones", "clipped_actions"))
        self.steps.append((*arrays, [sorted(info) for info in seen["infos"]]))
        return True

    def _on_rollout_end(self) -> None:
        self.ends.append((np.asarray(self.locals["values"]).copy(), np.copy(self.locals["dones"])))


SETTINGS = {
    "gaussian": ("Pendulum-v1", {}),  # its 200-step time limit: bootstraps inside the 2 x 256 steps
    "categorical": ("CartPole-v1", {}),
    "gsde": ("Pendulum-v1", dict(use_sde=True, sde_sample_freq=4)),
    "gsde-squashed": ("Pendulum-v1", dict(use_sde=True, policy_kwargs=dict(net_arch=[8], squash_output=True))),
    "dropout": ("Pendulum-v1", dict(policy_kwargs=dict(net_arch=[8], features_extractor_class=DropoutExtractor))),
}
BUFFER_KEYS = ("observations", "actions", "rewards", "episode_starts", "values", "log_probs", "returns", "advantages")


def two_rollouts(env_id: str, kwargs: dict[str, Any], collect: Any) -> tuple[list[dict], LocalsRecorder, TRPO]:
    model = TRPO(
        "MlpPolicy",
        make_vec_env(env_id, n_envs=2, seed=0),
        n_steps=256,
        batch_size=64,
        seed=0,
        **{"policy_kwargs": dict(net_arch=[8]), **kwargs}
    )
    with th.no_grad():  # laws that depend on the state and are far from uniform: a slip in the draw shows
        model.policy.action_net.weight.mul_(30.0)
    recorder = LocalsRecorder()
    model._setup_learn(512)
    callback = model._init_callback(recorder)
    buffers = []
    for _ in range(2):
        assert collect(model, model.env, callback, model.rollout_buffer, model.n_steps)
        buffers.append({key: getattr(model.rollout_buffer, key).copy() for key in BUFFER_KEYS})
        if model.use_sde:
            with th.no_grad():  # as an update would: gSDE's noise must be drawn again at the next rollout's start
                model.policy.log_std.add_(0.3)
    return buffers, recorder, model


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_rollouts_equal_sb3s(setting: str) -> None:
    env_id, kwargs = SETTINGS[setting]
    ours, ours_seen, ours_model = two_rollouts(env_id, kwargs, lambda model, *args: model.collect_rollouts(*args))
    sb3s, sb3_seen, sb3_model = two_rollouts(
        env_id, kwargs, lambda model, *args: OnPolicyAlgorithm.collect_rollouts(model, *args)
    )
    assert ours_model.num_timesteps == sb3_model.num_timesteps
    for mine, theirs in zip(ours, sb3s, strict=True):
        for key in BUFFER_KEYS[:4]:
            assert np.array_equal(mine[key], theirs[key]), key
        for key in BUFFER_KEYS[4:]:
            assert np.allclose(mine[key], theirs[key], rtol=1e-5, atol=1e-5), key
    episodes = [[(info["r"], info["l"]) for info in model.ep_info_buffer] for model in (ours_model, sb3_model)]
    assert episodes[0] == episodes[1] and len(episodes[0]) > 0
    assert len(ours_seen.steps) == len(sb3_seen.steps) == 512
    for mine_step, their_step in zip(ours_seen.steps, sb3_seen.steps, strict=True):
        assert all(np.array_equal(a, b) for a, b in zip(mine_step[:4], their_step[:4], strict=True))
        assert mine_step[4] == their_step[4]
    for (values, dones), (their_values, their_dones) in zip(ours_seen.ends, sb3_seen.ends, strict=True):
        assert np.allclose(values, their_values, atol=1e-6) and np.array_equal(dones, their_dones)


def collect(model: TRPO) -> tuple[th.Tensor, th.Tensor, Any]:
    model._setup_learn(model.n_steps * model.n_envs)
    model.collect_rollouts(model.env, model._init_callback(None), model.rollout_buffer, model.n_steps)
    buffer = model.rollout_buffer
    observations = th.as_tensor(buffer.observations.reshape(-1, *buffer.observations.shape[2:]))
    return observations, th.as_tensor(buffer.actions.reshape(buffer.buffer_size * buffer.n_envs, -1)), buffer


class OwnValues(ActorCriticPolicy):
    def predict_values(self, obs: th.Tensor) -> th.Tensor:
        return super().predict_values(obs) + 100.0


class OwnDistribution(ActorCriticPolicy):
    def get_distribution(self, obs: Any) -> Any:
        distribution = super().get_distribution(obs)
        return distribution.proba_distribution(distribution.distribution.mean + 3.0, self.log_std)


class LinearExtractor(BaseFeaturesExtractor):
    def __init__(self, observation_space: gym.spaces.Box) -> None:
        super().__init__(observation_space, 8)
        self.linear = nn.Linear(int(np.prod(observation_space.shape)), 8)

    def forward(self, observations: th.Tensor) -> th.Tensor:
        return th.tanh(self.linear(observations.flatten(1)))


@pytest.mark.parametrize(
    "policy, policy_kwargs",
    [
        (OwnValues, {}),  # only predict_values overridden: the buffer's values are its
        (OwnDistribution, {}),  # only get_distribution overridden: the actions are drawn from it
        ("MlpPolicy", dict(features_extractor_class=LinearExtractor, share_features_extractor=False)),
    ],
    ids=["own-values", "own-distribution", "separate-extractors"],
)
def test_the_buffer_holds_what_the_policy_s_own_methods_give(policy: Any, policy_kwargs: dict[str, Any]) -> None:
    env = make_vec_env("Pendulum-v1", n_envs=2, seed=0)
    model = TRPO(policy, env, n_steps=64, batch_size=64, seed=0, policy_kwargs=policy_kwargs)
    observations, actions, buffer = collect(model)
    with th.no_grad():
        values, log_prob, _ = model.policy.evaluate_actions(observations, actions)
        own_values = model.policy.predict_values(observations).flatten()
        own_log_prob = model.policy.get_distribution(observations).log_prob(actions)
    assert np.allclose(buffer.values.reshape(-1), own_values.numpy(), atol=1e-5)
    assert np.allclose(buffer.log_probs.reshape(-1), own_log_prob.numpy(), atol=1e-5)
    if policy == "MlpPolicy":
        assert np.allclose(buffer.values.reshape(-1), values.flatten().numpy(), atol=1e-5)
        assert np.allclose(buffer.log_probs.reshape(-1), log_prob.numpy(), atol=1e-5)
