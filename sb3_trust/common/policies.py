"""Helpers that read an SB3 actor-critic policy's structure."""

import torch as th
from stable_baselines3.common.distributions import Distribution
from stable_baselines3.common.policies import ActorCriticPolicy
from torch import nn

from sb3_trust.common.distributions import state_tensors, torch_distributions


def _distribution_tensors(distribution: Distribution) -> list[th.Tensor]:
    return [tensor for part in torch_distributions(distribution) for tensor in state_tensors(part) if tensor.requires_grad]


def overridden_methods(policy: ActorCriticPolicy, names: tuple[str, ...]) -> list[str]:
    """
    :param policy: a policy
    :param names: names of ``ActorCriticPolicy`` methods
    :return: those that the policy's class overrides
    """
    return [name for name in names if getattr(type(policy), name) is not getattr(ActorCriticPolicy, name)]


def check_policy_methods(policy: ActorCriticPolicy) -> None:
    """
    Refuse a policy whose class overrides ``evaluate_actions``: SB3's PPO and A2C train through it, but every update
    here needs the action distribution itself (for the KL and the Fisher matrix), which it does not return.

    :param policy: the policy of an sb3_trust algorithm
    :raises TypeError: when its class overrides ``evaluate_actions``
    """
    if overridden_methods(policy, ("evaluate_actions",)):
        raise TypeError(
            f"{type(policy).__name__} overrides evaluate_actions, which sb3_trust's algorithms never call: their updates "
            "need the action distribution itself (for the KL and the Fisher matrix). Override get_distribution (or "
            "_get_action_dist_from_latent) and predict_values instead: both are used by the rollout and the updates."
        )


def _reachable(outputs: list[th.Tensor], params: list[nn.Parameter]) -> list[bool]:
    total = sum(output.sum() for output in outputs if output.requires_grad)
    if not isinstance(total, th.Tensor):
        # No output depends on a trainable parameter (e.g. a frozen critic)
        return [False] * len(params)
    grads = th.autograd.grad(total, params, allow_unused=True)
    return [grad is not None for grad in grads]


def split_actor_critic_parameters(policy: ActorCriticPolicy) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """
    Tell the actor's parameters from the critic's by following the autograd graph, not parameter names.

    A parameter belongs to the actor when the action distribution depends on it, and to the critic when only
    the value prediction does. A feature extractor shared by both counts as the actor's: it moves with the
    natural-gradient step only, and the critic regresses on its (fixed) features.

    :param policy: the policy to inspect
    :return: (actor parameters, critic parameters), each in ``policy.parameters()`` order; the first is empty when
        the action distribution depends on no trainable parameter
    """
    params = [param for param in policy.parameters() if param.requires_grad]
    observation = policy.observation_space.sample()
    obs_tensor, _ = policy.obs_to_tensor(observation)
    was_training = policy.training
    policy.set_training_mode(False)
    with th.enable_grad():
        in_actor = _reachable(_distribution_tensors(policy.get_distribution(obs_tensor)), params)
        in_critic = _reachable([policy.predict_values(obs_tensor)], params)
    policy.set_training_mode(was_training)
    actor = [param for param, used in zip(params, in_actor, strict=True) if used]
    critic = [param for param, used, by_actor in zip(params, in_critic, in_actor, strict=True) if used and not by_actor]
    return actor, critic


def values_and_distribution(
    policy: ActorCriticPolicy, obs: th.Tensor | dict[str, th.Tensor]
) -> tuple[th.Tensor, Distribution]:
    """
    The critic's values and the actor's action distribution: from one forward pass through the policy's parts, or
    from its own ``predict_values`` and ``get_distribution`` when its class overrides either.

    :param policy: the policy
    :param obs: observations
    :return: values, action distribution
    """
    if overridden_methods(policy, ("predict_values", "get_distribution")):
        return policy.predict_values(obs), policy.get_distribution(obs)
    features = policy.extract_features(obs)
    if policy.share_features_extractor:
        latent_pi, latent_vf = policy.mlp_extractor(features)
    else:
        pi_features, vf_features = features
        latent_pi = policy.mlp_extractor.forward_actor(pi_features)
        latent_vf = policy.mlp_extractor.forward_critic(vf_features)
    return policy.value_net(latent_vf), policy._get_action_dist_from_latent(latent_pi)
