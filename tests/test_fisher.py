import copy
from typing import Any

import gymnasium as gym
import pytest
import torch as th
from stable_baselines3.common.distributions import DiagGaussianDistribution
from stable_baselines3.common.policies import ActorCriticPolicy

from sb3_trust.common import distributions as trust_distributions
from sb3_trust.common.distributions import (
    can_concatenate,
    concatenate_distributions,
    detach_distribution,
    kl_divergence,
    mean_kl,
    select_distribution,
    torch_distributions,
)
from sb3_trust.common.fisher import FisherVectorProduct
from sb3_trust.common.policies import split_actor_critic_parameters

ACTION_SPACES = {
    "gaussian": (gym.spaces.Box(-1, 1, (2,)), {}),
    "gsde": (gym.spaces.Box(-1, 1, (2,)), {"use_sde": True}),
    "gsde-shared-std": (gym.spaces.Box(-1, 1, (2,)), {"use_sde": True, "full_std": False}),
    "categorical": (gym.spaces.Discrete(3), {}),
    "multi-categorical": (gym.spaces.MultiDiscrete([2, 3]), {}),
    "bernoulli": (gym.spaces.MultiBinary(2), {}),
}


def tiny_policy(name: str, seed: int = 0) -> ActorCriticPolicy:
    th.manual_seed(seed)
    action_space, kwargs = ACTION_SPACES[name]
    policy = ActorCriticPolicy(
        gym.spaces.Box(-1, 1, (3,)), action_space, lambda _: 1e-3, net_arch=[4], log_std_init=-0.3, **kwargs
    )
    with th.no_grad():
        for param in policy.parameters():
            # Move away from the orthogonal init with its near-zero output layer, so every block is non-trivial
            param.normal_(0.0, 0.7)
    return policy


def dense_kl_hessian(policy: ActorCriticPolicy, obs: th.Tensor, params: list[th.nn.Parameter]) -> th.Tensor:
    old = detach_distribution(policy.get_distribution(obs))
    kl = mean_kl(old, policy.get_distribution(obs))
    grad = th.cat([g.reshape(-1) for g in th.autograd.grad(kl, params, create_graph=True, materialize_grads=True)])
    rows = [
        th.autograd.grad(grad[i], params, retain_graph=True, allow_unused=True, materialize_grads=True)
        for i in range(len(grad))
    ]
    return th.stack([th.cat([g.reshape(-1) for g in row]) for row in rows])


def dense_fisher(fvp: FisherVectorProduct, n: int) -> th.Tensor:
    return th.stack([fvp(e) for e in th.eye(n)])


@pytest.mark.parametrize("name", list(ACTION_SPACES))
def test_fisher_vector_product_equals_kl_hessian(name: str) -> None:
    policy = tiny_policy(name)
    actor, _ = split_actor_critic_parameters(policy)
    obs = th.randn(9, 3)
    fvp = FisherVectorProduct(policy.get_distribution(obs), actor, damping=0.0)
    assert fvp.is_analytic
    n = sum(p.numel() for p in actor)
    fisher = dense_fisher(fvp, n)
    hessian = dense_kl_hessian(policy, obs, actor)
    assert hessian.norm() > 1e-3
    assert (fisher - hessian).norm() / hessian.norm() < 1e-5
    # Symmetric, and positive definite once damped
    assert (fisher - fisher.T).norm() / fisher.norm() < 1e-5
    damped = dense_fisher(FisherVectorProduct(policy.get_distribution(obs), actor, damping=0.1), n)
    assert th.linalg.eigvalsh((damped + damped.T) / 2).min() > 0.1 - 1e-4


def test_fisher_vector_product_with_frozen_log_std() -> None:
    # Fixed exploration noise: σ is reached by no trainable parameter, so only the mean's block of F remains
    policy = tiny_policy("gaussian")
    policy.log_std.requires_grad_(False)
    actor, _ = split_actor_critic_parameters(policy)
    assert all(param is not policy.log_std for param in actor)
    obs = th.randn(9, 3)
    fvp = FisherVectorProduct(policy.get_distribution(obs), actor, damping=0.0)
    assert fvp.is_analytic
    hessian = dense_kl_hessian(policy, obs, actor)
    fisher = dense_fisher(fvp, sum(p.numel() for p in actor))
    assert hessian.norm() > 1e-3
    assert (fisher - hessian).norm() / hessian.norm() < 1e-5


@pytest.mark.parametrize("name", ["gaussian", "categorical"])
def test_fallback_kl_hessian_path_matches_analytic(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    policy = tiny_policy(name, seed=1)
    actor, _ = split_actor_critic_parameters(policy)
    obs = th.randn(6, 3)
    v = th.randn(sum(p.numel() for p in actor))
    analytic = FisherVectorProduct(policy.get_distribution(obs), actor, damping=0.05)(v)
    monkeypatch.setattr(trust_distributions, "_METRICS", {})
    fallback = FisherVectorProduct(policy.get_distribution(obs), actor, damping=0.05)
    assert not fallback.is_analytic
    assert th.allclose(fallback(v), analytic, rtol=1e-4, atol=1e-6)


def test_fallback_on_a_wrapped_gaussian_matches_analytic() -> None:
    # A custom distribution may hold its Gaussian inside an Independent: the fallback's "old" copy must be detached
    # down to the base distribution, or the KL would be identically zero and so would its Hessian
    policy = tiny_policy("gaussian", seed=2)
    actor, _ = split_actor_critic_parameters(policy)
    obs = th.randn(6, 3)
    v = th.randn(sum(p.numel() for p in actor))
    analytic = FisherVectorProduct(policy.get_distribution(obs), actor, damping=0.0)(v)
    wrapped = copy.copy(policy.get_distribution(obs))
    wrapped.distribution = th.distributions.Independent(wrapped.distribution, 1)
    fallback = FisherVectorProduct(wrapped, actor, damping=0.0)
    assert not fallback.is_analytic
    assert analytic.norm() > 1e-3
    assert th.allclose(fallback(v), analytic, rtol=1e-4, atol=1e-6)


def test_fisher_product_is_repeatable_and_linear() -> None:
    policy = tiny_policy("gaussian")
    actor, _ = split_actor_critic_parameters(policy)
    fvp = FisherVectorProduct(policy.get_distribution(th.randn(5, 3)), actor, damping=0.0)
    u, v = th.randn(2, sum(p.numel() for p in actor))
    first = fvp(u)
    assert th.allclose(fvp(u + 2 * v), first + 2 * fvp(v), atol=1e-5)
    # CG calls the product many times on one retained graph: a call must leave nothing behind for the next
    assert th.equal(fvp(u), first)


def test_kl_sums_over_action_dimensions() -> None:
    policy = tiny_policy("gaussian")
    obs = th.randn(4, 3)
    old = detach_distribution(policy.get_distribution(obs))
    with th.no_grad():
        policy.log_std += 0.3
        policy.action_net.bias += 0.2
    new = policy.get_distribution(obs)
    mu0, s0 = old.distribution.loc, old.distribution.scale
    mu1, s1 = new.distribution.loc, new.distribution.scale
    expected = (th.log(s1 / s0) + (s0**2 + (mu0 - mu1) ** 2) / (2 * s1**2) - 0.5).sum(dim=1)
    assert th.allclose(kl_divergence(old, new), expected, atol=1e-6)
    assert mean_kl(old, new).item() == pytest.approx(expected.mean().item(), rel=1e-5)


def test_kl_multi_categorical_is_sum_of_parts() -> None:
    policy = tiny_policy("multi-categorical")
    obs = th.randn(4, 3)
    old = detach_distribution(policy.get_distribution(obs))
    with th.no_grad():
        policy.action_net.bias += th.linspace(-1, 1, 5)
    new = policy.get_distribution(obs)
    parts = [th.distributions.kl_divergence(p, q) for p, q in zip(old.distribution, new.distribution, strict=True)]
    assert th.allclose(kl_divergence(old, new), parts[0] + parts[1])
    assert (kl_divergence(old, new) > 0).all()


def test_detached_distribution_survives_policy_reuse() -> None:
    policy = tiny_policy("categorical")
    obs = th.randn(4, 3)
    old = detach_distribution(policy.get_distribution(obs))
    logits_before = old.distribution.logits.clone()
    policy.get_distribution(th.randn(4, 3))  # SB3 reuses its Distribution object
    assert th.equal(old.distribution.logits, logits_before)
    assert not old.distribution.logits.requires_grad


def test_actor_critic_split_sees_through_a_wrapped_distribution() -> None:
    class WrappedGaussianPolicy(ActorCriticPolicy):
        def get_distribution(self, obs: th.Tensor) -> Any:
            distribution = copy.copy(super().get_distribution(obs))
            distribution.distribution = th.distributions.Independent(distribution.distribution, 1)
            return distribution

    policy = WrappedGaussianPolicy(gym.spaces.Box(-1, 1, (3,)), gym.spaces.Box(-1, 1, (2,)), lambda _: 1e-3, net_arch=[4])
    actor, critic = split_actor_critic_parameters(policy)
    assert id(policy.log_std) in {id(p) for p in actor}
    assert {id(p) for p in policy.action_net.parameters()} <= {id(p) for p in actor}
    assert {id(p) for p in policy.value_net.parameters()} <= {id(p) for p in critic}


@pytest.mark.parametrize("share", [True, False])
def test_actor_critic_split_follows_structure(share: bool) -> None:
    policy = ActorCriticPolicy(
        gym.spaces.Box(-1, 1, (3,)),
        gym.spaces.Box(-1, 1, (2,)),
        lambda _: 1e-3,
        net_arch=dict(pi=[8], vf=[8]),
        share_features_extractor=share,
    )
    actor, critic = split_actor_critic_parameters(policy)
    actor_ids, critic_ids = {id(p) for p in actor}, {id(p) for p in critic}
    assert not actor_ids & critic_ids
    assert id(policy.log_std) in actor_ids
    assert {id(p) for p in policy.action_net.parameters()} <= actor_ids
    assert {id(p) for p in policy.mlp_extractor.policy_net.parameters()} <= actor_ids
    assert {id(p) for p in policy.value_net.parameters()} <= critic_ids
    assert {id(p) for p in policy.mlp_extractor.value_net.parameters()} <= critic_ids
    assert len(actor) + len(critic) == len(list(policy.parameters()))


@pytest.mark.parametrize("name", list(ACTION_SPACES))
def test_concatenated_chunks_are_the_whole_batch(name: str) -> None:
    policy = tiny_policy(name)
    obs = th.randn(11, 3)
    with th.no_grad():
        whole = detach_distribution(policy.get_distribution(obs))
        actions = whole.get_actions()
        chunks = [detach_distribution(policy.get_distribution(obs[rows])) for rows in (slice(0, 4), slice(4, 8), slice(8, 11))]
        joined = concatenate_distributions(chunks)
        assert th.allclose(joined.log_prob(actions), whole.log_prob(actions), atol=1e-6)
        for param in policy.parameters():
            param.add_(0.3 * th.randn_like(param))
        new = policy.get_distribution(obs)
        assert th.allclose(kl_divergence(joined, new), kl_divergence(whole, new), atol=1e-6)
        assert kl_divergence(whole, new).mean() > 1e-2
    # Each chunk is left as it was
    assert torch_distributions(chunks[0])[0].batch_shape[0] == 4


def test_only_rebuilt_kinds_are_concatenated() -> None:
    obs = th.randn(3, 3)
    with th.no_grad():
        categorical = detach_distribution(tiny_policy("categorical").get_distribution(obs))
        bernoulli = detach_distribution(tiny_policy("bernoulli").get_distribution(obs))
    with pytest.raises(TypeError, match="one kind"):
        concatenate_distributions([categorical, bernoulli])
    # Beta keeps its rows in a nested Dirichlet, which a concatenation of its own tensors would miss
    beta = copy.copy(categorical)
    beta.distribution = th.distributions.Beta(th.ones(3, 2), th.ones(3, 2))
    assert can_concatenate(categorical) and not can_concatenate(beta)
    with pytest.raises(TypeError, match="Beta"):
        concatenate_distributions([beta, beta])
    with pytest.raises(TypeError, match="Beta"):
        select_distribution(beta, slice(0, 2))
    assert select_distribution(beta, slice(0, 3)) is beta
    assert concatenate_distributions([beta]) is beta


def _wrapped(loc: th.Tensor, kind: str) -> th.distributions.Distribution:
    """A distribution over rows of loc (shape (n, 2)), in one of the wrappers a custom SB3 distribution may use."""
    normal = th.distributions.Normal(loc, th.full_like(loc, 0.5))
    if kind == "independent":
        return th.distributions.Independent(normal, 1)
    if kind == "transformed":
        return th.distributions.TransformedDistribution(normal, [th.distributions.transforms.TanhTransform()])
    if kind == "affine-per-row":  # a transform with a tensor of its own: its rows would not be selected
        return th.distributions.TransformedDistribution(
            normal, [th.distributions.transforms.AffineTransform(loc.detach(), 2.0)]
        )
    if kind == "affine-numbers":
        return th.distributions.TransformedDistribution(normal, [th.distributions.transforms.AffineTransform(0.5, 2.0)])
    if kind == "composed":  # refused whatever it holds: only transforms known to be element-wise are rebuilt
        tanh = th.distributions.transforms.TanhTransform()
        return th.distributions.TransformedDistribution(normal, [th.distributions.transforms.ComposeTransform([tanh])])
    if kind == "beta":
        return th.distributions.Beta(loc.exp(), th.ones_like(loc))
    return type("NormalSubclass", (th.distributions.Normal,), {})(loc, th.full_like(loc, 0.5))


@pytest.mark.parametrize(
    "kind", ["independent", "transformed", "affine-numbers", "affine-per-row", "composed", "beta", "normal-subclass"]
)
def test_wrapped_distributions_are_detached_selected_and_concatenated(kind: str) -> None:
    loc = th.randn(5, 2, requires_grad=True)
    distribution = DiagGaussianDistribution(2)
    distribution.distribution = _wrapped(loc * 1.0, kind)
    actions = th.rand(5, 2) * 0.8 + 0.1  # inside every support (Beta: (0, 1); tanh: (-1, 1))
    detached = detach_distribution(distribution)
    part = torch_distributions(detached)[0]
    assert type(part) is type(torch_distributions(distribution)[0])
    # Detached all the way down (a wrapper's base distribution included), with the same law
    assert not _log_prob(detached, actions).requires_grad
    assert th.equal(_log_prob(detached, actions), _log_prob(distribution, actions).detach())
    if kind in ("affine-per-row", "composed", "beta", "normal-subclass"):
        assert not can_concatenate(detached)
        with pytest.raises(TypeError, match="selected or concatenated"):
            select_distribution(detached, slice(0, 2))
        return
    assert can_concatenate(detached)
    rows = th.tensor([3, 0])
    selected = select_distribution(detached, rows)
    assert torch_distributions(selected)[0].batch_shape[0] == 2
    assert th.allclose(_log_prob(selected, actions[rows]), _log_prob(detached, actions)[rows])
    halves = [select_distribution(detached, rows) for rows in (slice(0, 2), slice(2, 5))]
    joined = concatenate_distributions(halves)
    assert th.allclose(_log_prob(joined, actions), _log_prob(detached, actions))


def _log_prob(distribution: DiagGaussianDistribution, actions: th.Tensor) -> th.Tensor:
    # The torch part's own log-probability: SB3's would sum an Independent's per-row values once more
    return torch_distributions(distribution)[0].log_prob(actions)
