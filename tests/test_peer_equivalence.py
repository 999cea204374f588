"""Our TRPO update against sb3-contrib's, on the same rollout from the same weights."""

import copy

import numpy as np
import pytest
import torch as th
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import VecNormalize

from sb3_trust import TRPO

sb3_contrib = pytest.importorskip("sb3_contrib")


def test_trpo_step_equals_sb3_contrib_with_converted_hyperparameters() -> None:
    # sb3-contrib averages the KL over the d action dimensions, so its (target_kl, cg_damping) = (δ, λ) is our
    # (d·δ, d·λ); with those, the two implementations must take the same actor step on the same data.
    env = VecNormalize(make_vec_env("HalfCheetah-v5", n_envs=2, seed=0))
    action_dim = env.action_space.shape[0]
    common = dict(n_steps=256, batch_size=128, n_critic_updates=2, cg_max_steps=25, seed=0)
    ours = TRPO("MlpPolicy", env, target_kl=0.04 * action_dim, cg_damping=0.1 * action_dim, **common)
    peer = sb3_contrib.TRPO("MlpPolicy", env, target_kl=0.04, cg_damping=0.1, **common)
    ours.learn(512)  # move away from the initial weights
    peer.policy.load_state_dict(ours.policy.state_dict())
    ours.rollout_buffer.reset()
    ours.collect_rollouts(env, ours._init_callback(None), ours.rollout_buffer, ours.n_steps)
    peer.rollout_buffer = copy.deepcopy(ours.rollout_buffer)
    peer._logger = ours.logger
    before = {name: param.detach().clone() for name, param in ours.policy.named_parameters()}

    ours.train()
    assert ours.logger.name_to_value["train/is_line_search_success"] == 1.0
    peer.train()
    peer_params = dict(peer.policy.named_parameters())
    actor_ids = {id(param) for param in ours.actor_parameters}
    for name, param in ours.policy.named_parameters():
        if id(param) not in actor_ids:
            continue
        our_step, peer_step = param.detach() - before[name], peer_params[name].detach() - before[name]
        assert our_step.norm() > 0
        assert th.allclose(our_step, peer_step, rtol=1e-3, atol=1e-6), name
    assert np.isfinite(ours.logger.name_to_value["train/kl_divergence"])
