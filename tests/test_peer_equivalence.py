"""
Our TRPO update against sb3-contrib's: from the same weights, on the same rollout, along a training trajectory.

``lockstep`` is also the diagnostic quoted in docs/benchmarks.md, with the RL Zoo's HalfCheetah-v5 setting::

    python -c "from tests.test_peer_equivalence import lockstep; print(lockstep(120, n_steps=1024))"
"""

import copy
from typing import NamedTuple

import numpy as np
import pytest
import torch as th
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import VecNormalize

from sb3_trust import TRPO

sb3_contrib = pytest.importorskip("sb3_contrib")


class LockstepResult(NamedTuple):
    """
    :param step_differences: per update, ‖our actor step − peer's‖ / ‖peer's‖
    :param critic_mse_ratios: per update, our critic's mean squared error on the rollout's returns after fitting,
        over the peer's
    :param line_search_successes: per update, whether our line search accepted a step
    """

    step_differences: list[float]
    critic_mse_ratios: list[float]
    line_search_successes: list[bool]

    def __str__(self) -> str:
        steps, ratios = np.array(self.step_differences), np.array(self.critic_mse_ratios)
        return (
            f"{len(steps)} updates: actor step relative difference median {np.median(steps):.2e}, max {steps.max():.2e}; "
            f"critic MSE ours/peer mean {ratios.mean():.3f} (ours lower in {(ratios < 1).sum()}); "
            f"line search accepted {sum(self.line_search_successes)}"
        )


def lockstep(n_updates: int, n_steps: int = 256, seed: int = 0, env_id: str = "HalfCheetah-v5") -> LockstepResult:
    """
    Train our TRPO and, at each update, give sb3-contrib's TRPO the same weights and the same rollout.

    sb3-contrib averages the KL over the d action dimensions, so its (target_kl, cg_damping) = (δ, λ) is our
    (d·δ, d·λ): with those, both must take the same actor step and fit the critic equally well. Our model keeps
    its own parameters, so the comparison runs along our training trajectory (the states a long run visits).

    :param n_updates: number of compared updates
    :param n_steps: steps per environment per rollout (2 environments, critic minibatch 128)
    :param seed: seed of both models and the environments
    :param env_id: a continuous-control task
    :return: the per-update comparison
    """
    threads = th.get_num_threads()
    th.set_num_threads(1)  # small products: more threads only compete for the cores
    try:
        return _lockstep(n_updates, n_steps, seed, env_id)
    finally:
        th.set_num_threads(threads)


def _lockstep(n_updates: int, n_steps: int, seed: int, env_id: str) -> LockstepResult:
    env = VecNormalize(make_vec_env(env_id, n_envs=2, seed=seed), gamma=0.99)
    action_dim = env.action_space.shape[0]
    common = dict(n_steps=n_steps, batch_size=128, n_critic_updates=20, cg_max_steps=25, gae_lambda=0.95, seed=seed)
    ours = TRPO("MlpPolicy", env, target_kl=0.04 * action_dim, cg_damping=0.1 * action_dim, **common)
    peer = sb3_contrib.TRPO("MlpPolicy", env, target_kl=0.04, cg_damping=0.1, **common)
    ours.learn(2 * n_steps)  # move away from the initial weights
    peer._logger = ours.logger
    # The peer's critic optimizer starts with our Adam moments: a fresh Adam would fit faster for ~1000 steps,
    # because ours still carries the large gradients of the first (random-critic) updates in its second moments
    peer_params = dict(peer.policy.named_parameters())
    for name, param in ours.policy.named_parameters():
        if param in ours.policy.optimizer.state:
            peer.policy.optimizer.state[peer_params[name]] = copy.deepcopy(ours.policy.optimizer.state[param])
    actor_ids = {id(param) for param in ours.actor_parameters}
    actor_names = [name for name, param in ours.policy.named_parameters() if id(param) in actor_ids]
    callback = ours._init_callback(None)
    result = LockstepResult([], [], [])
    for _ in range(n_updates):
        peer.policy.load_state_dict(ours.policy.state_dict())
        ours.rollout_buffer.reset()
        ours.collect_rollouts(env, callback, ours.rollout_buffer, ours.n_steps)
        peer.rollout_buffer = copy.deepcopy(ours.rollout_buffer)
        before = {name: param.detach().clone() for name, param in ours.policy.named_parameters()}
        ours.train()
        result.line_search_successes.append(ours.logger.name_to_value["train/is_line_search_success"] == 1.0)
        peer.train()

        ours_params, peer_params = dict(ours.policy.named_parameters()), dict(peer.policy.named_parameters())
        our_step = th.cat([(ours_params[name].detach() - before[name]).flatten() for name in actor_names])
        peer_step = th.cat([(peer_params[name].detach() - before[name]).flatten() for name in actor_names])
        result.step_differences.append(((our_step - peer_step).norm() / peer_step.norm().clamp_min(1e-12)).item())
        buffer = ours.rollout_buffer
        with th.no_grad():
            observations = th.as_tensor(buffer.observations.reshape(-1, *buffer.obs_shape))
            returns = th.as_tensor(buffer.returns.flatten())
            errors = [((model.policy.predict_values(observations).flatten() - returns) ** 2).mean() for model in (ours, peer)]
        result.critic_mse_ratios.append((errors[0] / errors[1]).item())
    env.close()
    return result


def test_trpo_updates_equal_sb3_contrib_along_a_trajectory() -> None:
    threads = th.get_num_threads()
    result = lockstep(6)
    assert th.get_num_threads() == threads
    assert all(result.line_search_successes)
    # Same actor step (float32 round-off, amplified by CG on an ill-conditioned Fisher when it runs to its cap)
    assert max(result.step_differences) < 1e-3, result
    # The critics' minibatch orders differ (torch vs numpy permutations), so their fits agree on average only
    assert 0.9 < float(np.mean(result.critic_mse_ratios)) < 1.1, result
