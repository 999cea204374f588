"""TRPO's vine sampling: the surrogate of Eqs. 32-33 and the common random numbers, against dense computations."""

import math

import pytest
import torch as th
from stable_baselines3.common.policies import ActorCriticPolicy

from sb3_trust.common.distributions import detach_distribution, mean_kl, sample_with_common_noise, torch_distributions
from sb3_trust.common.fisher import flat_gradient, flat_parameters, set_flat_parameters
from sb3_trust.common.policies import split_actor_critic_parameters
from sb3_trust.common.surrogate import VineSurrogate
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
