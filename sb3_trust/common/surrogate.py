"""Where the policy-gradient samples come from, and the surrogate objective built on them."""

from dataclasses import dataclass

import torch as th
from stable_baselines3.common.distributions import Distribution
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.type_aliases import RolloutBufferSamples

from sb3_trust.common.distributions import detach_distribution, mean_kl
from sb3_trust.common.on_policy import distribution_actions, index_observations, normalized_advantages


@dataclass
class SurrogateEvaluation:
    """
    The surrogate objective and the mean KL to the old policy at the current parameters.

    :param objective: L(θ), a scalar tensor (with a graph when evaluated with gradients)
    :param kl: mean KL(π_old ‖ π_θ) over the states of the batch
    :param distribution: the policy's distribution on the batch
    """

    objective: th.Tensor
    kl: th.Tensor
    distribution: Distribution


class ImportanceSampledSurrogate:
    """
    The single-path surrogate of TRPO (Schulman et al., 2015, Eq. 14):
    ``L(θ) = mean_t[π_θ(a_t|s_t) / π_old(a_t|s_t) · Â_t]``, with the states and actions of one rollout.

    The old policy is frozen when the surrogate is built, so ``evaluate`` can be called after the parameters move
    (line search) and always compares against the same π_old.

    :param policy: the actor-critic policy, at θ_old
    :param samples: the whole rollout (states, actions, advantages)
    :param normalize_advantage: standardise the advantages over the batch
    """

    def __init__(self, policy: ActorCriticPolicy, samples: RolloutBufferSamples, normalize_advantage: bool) -> None:
        self.policy = policy
        self.observations = samples.observations
        self.actions = distribution_actions(samples.actions, policy.action_space)
        self.advantages = normalized_advantages(samples.advantages) if normalize_advantage else samples.advantages
        with th.no_grad():
            distribution = policy.get_distribution(self.observations)
            self.old_log_prob = distribution.log_prob(self.actions)
            self.old_distribution = detach_distribution(distribution)

    def __len__(self) -> int:
        return len(self.advantages)

    def evaluate(self) -> SurrogateEvaluation:
        """
        Evaluate the surrogate at the policy's current parameters (under the caller's grad mode).

        :return: objective, mean KL to π_old, and the distribution
        """
        distribution = self.policy.get_distribution(self.observations)
        ratio = th.exp(distribution.log_prob(self.actions) - self.old_log_prob)
        objective = (ratio * self.advantages).mean()
        return SurrogateEvaluation(objective, mean_kl(self.old_distribution, distribution), distribution)

    def distribution_on(self, indices: th.Tensor) -> Distribution:
        """
        The policy's distribution on a subset of the states, with a graph to the parameters.

        :param indices: the rows to use
        :return: the distribution
        """
        return self.policy.get_distribution(index_observations(self.observations, indices))
