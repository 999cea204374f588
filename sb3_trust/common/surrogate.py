"""Where the policy-gradient samples come from, and the surrogate objective built on them."""

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch as th
from stable_baselines3.common.distributions import Distribution
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.type_aliases import RolloutBufferSamples, TensorDict

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


class Surrogate(ABC):
    """
    A surrogate objective L(θ) of one update, frozen at θ_old, and the states on which the trust region's mean KL
    and the Fisher matrix are taken.
    """

    @abstractmethod
    def __len__(self) -> int:
        """
        :return: the number of states of the KL and the Fisher matrix
        """

    @abstractmethod
    def evaluate(self) -> SurrogateEvaluation:
        """
        Evaluate the surrogate at the policy's current parameters (under the caller's grad mode).

        :return: objective, mean KL to π_old, and the distribution on the KL's states
        """

    @abstractmethod
    def distribution_on(self, indices: th.Tensor) -> Distribution:
        """
        The policy's distribution on a subset of the KL's states, with a graph to the parameters.

        :param indices: the rows to use
        :return: the distribution
        """


class ImportanceSampledSurrogate(Surrogate):
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
        distribution = self.policy.get_distribution(self.observations)
        ratio = th.exp(distribution.log_prob(self.actions) - self.old_log_prob)
        objective = (ratio * self.advantages).mean()
        return SurrogateEvaluation(objective, mean_kl(self.old_distribution, distribution), distribution)

    def distribution_on(self, indices: th.Tensor) -> Distribution:
        return self.policy.get_distribution(index_observations(self.observations, indices))


class VineSurrogate(Surrogate):
    """
    The vine surrogate of TRPO (Schulman et al., 2015, Sec. 5.2; seed 004, Eqs. 32-33). At each state s_n of the
    rollout set, K actions a_{n,k} were drawn from a proposal ``q(·|s_n)`` and each was followed by a rollout that
    estimates Q(s_n, a_{n,k}). The self-normalized importance-sampling estimate at one state is

    ``L_n(θ) = Σ_k w_{n,k} Q_{n,k} / Σ_k w_{n,k}``,  ``w_{n,k} = π_θ(a_{n,k}|s_n) / q(a_{n,k}|s_n)``,

    and L(θ) = mean_n L_n(θ). With every action of a finite action space taken once (q uniform), this is Eq. 32,
    ``Σ_a π_θ(a|s_n) Q(s_n, a)``, exactly. Adding a constant to the Q-values of one state adds it to L_n, so they are
    centred per state (which changes no gradient) and, with ``normalize_scale``, divided by their standard
    deviation over the batch, as the single-path advantages are.

    The trust region's KL and the Fisher matrix are taken on the trunk's states (the rollout the rollout set was
    chosen from): the same state distribution, with many more states than the rollout set.

    :param policy: the actor-critic policy, at θ_old
    :param trunk_observations: the trunk's states
    :param states: the rollout set's N states
    :param actions: the N·K branch actions, as ``distribution.log_prob`` takes them, state-major (a_{1,1}, a_{1,2}, …)
    :param q_values: Q(s_n, a_{n,k}), shape (N, K)
    :param proposal_log_prob: ``log q(a_{n,k}|s_n)``, shape (N, K)
    :param normalize_scale: divide the centred Q-values by their standard deviation over the batch
    """

    def __init__(
        self,
        policy: ActorCriticPolicy,
        trunk_observations: th.Tensor | TensorDict,
        states: th.Tensor | TensorDict,
        actions: th.Tensor,
        q_values: th.Tensor,
        proposal_log_prob: th.Tensor,
        normalize_scale: bool,
    ) -> None:
        n_states, n_actions = q_values.shape
        if proposal_log_prob.shape != q_values.shape or len(actions) != n_states * n_actions:
            raise ValueError(
                f"{n_states} states × {n_actions} actions need Q-values and proposal log-probabilities of shape "
                f"{tuple(q_values.shape)} and {n_states * n_actions} actions; got {tuple(proposal_log_prob.shape)} "
                f"and {len(actions)}"
            )
        self.policy = policy
        self.trunk_observations = trunk_observations
        self.branch_observations = index_observations(states, th.arange(n_states).repeat_interleave(n_actions))
        self.actions = actions
        self.proposal_log_prob = proposal_log_prob
        centred = q_values - q_values.mean(dim=1, keepdim=True)
        if normalize_scale and n_actions > 1:
            centred = centred / (centred.std() + 1e-8)
        self.q_values = centred
        with th.no_grad():
            self.old_distribution = detach_distribution(policy.get_distribution(trunk_observations))

    def __len__(self) -> int:
        observations = self.trunk_observations
        return len(next(iter(observations.values())) if isinstance(observations, dict) else observations)

    def evaluate(self) -> SurrogateEvaluation:
        log_prob = self.policy.get_distribution(self.branch_observations).log_prob(self.actions)
        # softmax over k of log w: the self-normalized weights w / Σ_k w, without overflow
        weights = th.softmax(log_prob.view_as(self.q_values) - self.proposal_log_prob, dim=1)
        objective = (weights * self.q_values).sum(dim=1).mean()
        distribution = self.policy.get_distribution(self.trunk_observations)
        return SurrogateEvaluation(objective, mean_kl(self.old_distribution, distribution), distribution)

    def distribution_on(self, indices: th.Tensor) -> Distribution:
        return self.policy.get_distribution(index_observations(self.trunk_observations, indices))
