"""
KL divergences and Fisher metrics of the action distributions that SB3's on-policy policies use.

An SB3 ``Distribution`` wraps one torch distribution (``Normal``, ``Categorical``, ``Bernoulli``) or, for
``MultiCategoricalDistribution``, a list of ``Categorical``. Everything here works on those torch objects,
so a custom SB3 distribution built from them is supported as well.
"""

import copy
from collections.abc import Callable, Sequence
from typing import cast

import torch as th
from stable_baselines3.common.distributions import Distribution, StateDependentNoiseDistribution
from torch.distributions import Bernoulli, Categorical, Normal
from torch.distributions import Distribution as TorchDistribution

# Applies the distribution's Fisher matrix M (in its own parameters) to a list of per-sample tangent vectors
FisherMetric = Callable[[list[th.Tensor]], list[th.Tensor]]


def torch_distributions(distribution: Distribution) -> list[TorchDistribution]:
    """
    The torch distributions behind an SB3 distribution, as a list (one entry unless it is multi-categorical).

    :param distribution: an SB3 distribution on which ``proba_distribution`` has been called
    :return: the list of underlying torch distributions
    """
    inner = distribution.distribution
    if isinstance(inner, TorchDistribution):
        return [inner]
    if isinstance(inner, (list, tuple)) and all(isinstance(part, TorchDistribution) for part in inner):
        return list(inner)
    raise TypeError(f"{type(distribution).__name__} does not hold torch distributions (found {type(inner).__name__})")


def sample_independently(distribution: Distribution) -> th.Tensor:
    """
    One action per row, each drawn independently from its row's law (for a sampled Fisher estimate).

    SB3's gSDE distribution draws with one exploration matrix for the whole batch (one per environment during
    rollouts), so its ``sample()`` on a training batch gives correlated actions. The law of one row is the
    Gaussian it holds, squashed by its bijector when it has one: that is what is sampled here.

    :param distribution: an SB3 distribution on which ``proba_distribution`` has been called
    :return: the actions, as ``distribution.sample()`` shapes them
    """
    if isinstance(distribution, StateDependentNoiseDistribution):
        gaussian_actions = distribution.distribution.sample()
        return gaussian_actions if distribution.bijector is None else distribution.bijector.forward(gaussian_actions)
    return distribution.sample()


# The torch distributions rebuilt from their defining parameters, the only ones whose rows are concatenated
_REBUILT_TORCH_DISTRIBUTIONS = (Normal, Categorical, Bernoulli)


def _combine_torch_distributions(
    parts: Sequence[TorchDistribution], combine: Callable[[list[th.Tensor]], th.Tensor]
) -> TorchDistribution:
    """
    :param parts: torch distributions of one kind (a single one for a map such as a row selection)
    :param combine: how each defining tensor of the result is made from theirs
    :return: the rebuilt distribution (from the defining parameters: cached ones such as ``probs`` would go stale)
    :raises TypeError: when several parts are not all of one of ``_REBUILT_TORCH_DISTRIBUTIONS`` (exactly): the
        rows of another kind, which may keep its tensors in a base distribution, cannot be combined reliably
    """
    first = parts[0]
    if len(parts) > 1 and any(
        type(part) not in _REBUILT_TORCH_DISTRIBUTIONS or type(part) is not type(first) for part in parts
    ):
        kinds = sorted({type(part).__name__ for part in parts})
        raise TypeError(f"Only Normal, Categorical or Bernoulli rows of one kind are concatenated here, not {kinds}")
    if isinstance(first, Normal):
        normals = cast(list[Normal], list(parts))
        return Normal(combine([part.loc for part in normals]), combine([part.scale for part in normals]), validate_args=False)
    if isinstance(first, (Categorical, Bernoulli)):
        logits = combine([cast(Categorical | Bernoulli, part).logits for part in parts])
        return (
            Categorical(logits=logits, validate_args=False)
            if isinstance(first, Categorical)
            else Bernoulli(logits=logits, validate_args=False)
        )
    mapped = copy.copy(first)
    for name, value in vars(first).items():
        if isinstance(value, th.Tensor):
            setattr(mapped, name, combine([value]))
    return mapped


def _combine_distributions(
    distributions: Sequence[Distribution], combine: Callable[[list[th.Tensor]], th.Tensor]
) -> Distribution:
    """
    Combine the torch distributions of SB3 distributions of one structure.

    :param distributions: SB3 distributions of the same structure
    :param combine: how each defining tensor of the result is made from theirs
    :return: a copy of the first whose torch distributions hold the combined tensors (its other state, such as
        gSDE's noise features, is the first's)
    """
    columns = zip(*(torch_distributions(distribution) for distribution in distributions), strict=True)
    parts = [_combine_torch_distributions(column, combine) for column in columns]
    combined = copy.copy(distributions[0])
    combined.distribution = parts if isinstance(distributions[0].distribution, (list, tuple)) else parts[0]
    return combined


def _map_distribution(distribution: Distribution, transform: Callable[[th.Tensor], th.Tensor]) -> Distribution:
    return _combine_distributions([distribution], lambda tensors: transform(tensors[0]))


def can_concatenate(distribution: Distribution) -> bool:
    """
    :param distribution: an SB3 distribution on which ``proba_distribution`` has been called
    :return: whether distributions like it can be concatenated (their torch parts are Normal, Categorical or
        Bernoulli exactly)
    """
    return all(type(part) in _REBUILT_TORCH_DISTRIBUTIONS for part in torch_distributions(distribution))


def concatenate_distributions(distributions: Sequence[Distribution]) -> Distribution:
    """
    One distribution over the rows of several batched distributions, in order (a rollout evaluated in chunks).

    Only the torch distributions are concatenated, which is what KL divergences, log-probabilities and entropies use;
    other state of the SB3 object (gSDE's noise features, used to sample) is the first's.

    :param distributions: SB3 distributions of the same structure whose torch parts are Normal, Categorical or
        Bernoulli (see :func:`can_concatenate`)
    :return: a new distribution object over all their rows (the one distribution itself when there is one)
    :raises TypeError: for other torch distributions
    """
    if len(distributions) == 1:
        return distributions[0]
    return _combine_distributions(distributions, th.cat)


def select_distribution(distribution: Distribution, indices: th.Tensor | slice) -> Distribution:
    """
    The distribution of a subset of the batch (e.g. a minibatch of a frozen rollout distribution).

    :param distribution: a batched SB3 distribution over Normal, Categorical or Bernoulli parts
    :param indices: the rows to keep
    :return: a new distribution object over those rows
    """
    return _map_distribution(distribution, lambda tensor: tensor[indices])


def detach_distribution(distribution: Distribution) -> Distribution:
    """
    A copy of an SB3 distribution cut from the autograd graph.

    SB3 policies reuse one ``Distribution`` object for every forward pass, so the "old" policy of a trust-region
    update must be copied before the parameters move.

    :param distribution: the distribution to freeze
    :return: a shallow copy whose torch distributions hold detached tensors
    """
    return _map_distribution(distribution, th.Tensor.detach)


def _sum_event_dims(tensor: th.Tensor) -> th.Tensor:
    return tensor.flatten(start_dim=1).sum(dim=1) if tensor.dim() > 1 else tensor


def kl_divergence(old: Distribution, new: Distribution) -> th.Tensor:
    """
    Per-sample KL(old ‖ new), summed over independent action dimensions.

    Unlike ``th.distributions.kl_divergence`` on a diagonal Gaussian, this returns the KL of the joint action
    distribution (one value per sample), which is what the trust region bounds.

    :param old: the reference distribution (usually detached)
    :param new: the distribution being optimised
    :return: a tensor of shape (batch_size,)
    """
    old_parts, new_parts = torch_distributions(old), torch_distributions(new)
    if len(old_parts) != len(new_parts):
        raise ValueError(f"Distributions have {len(old_parts)} and {len(new_parts)} components")
    return sum(
        (_sum_event_dims(th.distributions.kl_divergence(p, q)) for p, q in zip(old_parts, new_parts, strict=True)),
        start=th.zeros(()),
    )


def mean_kl(old: Distribution, new: Distribution) -> th.Tensor:
    """
    The mean over the batch of KL(old ‖ new): the trust-region constraint of TRPO (Schulman et al., 2015, Eq. 12).

    :param old: the reference distribution (usually detached)
    :param new: the distribution being optimised
    :return: a scalar tensor
    """
    return kl_divergence(old, new).mean()


def _normal_metric(normal: Normal) -> tuple[list[th.Tensor], FisherMetric]:
    # Parameters (mean, log σ): the Fisher is diag(1/σ², 2) per action dimension
    inv_variance = normal.scale.detach().pow(-2)
    return [normal.loc, normal.scale.log()], lambda t: [t[0] * inv_variance, 2.0 * t[1]]


def _categorical_metric(categorical: Categorical) -> tuple[list[th.Tensor], FisherMetric]:
    # Parameters: logits. Fisher: diag(p) - p pᵀ
    probs = categorical.probs.detach()
    return [categorical.logits], lambda t: [probs * t[0] - probs * (probs * t[0]).sum(dim=-1, keepdim=True)]


def _bernoulli_metric(bernoulli: Bernoulli) -> tuple[list[th.Tensor], FisherMetric]:
    # Parameters: logits. Fisher: p (1 - p) per dimension
    probs = bernoulli.probs.detach()
    weight = probs * (1.0 - probs)
    return [bernoulli.logits], lambda t: [weight * t[0]]


_METRICS: dict[type[TorchDistribution], Callable[..., tuple[list[th.Tensor], FisherMetric]]] = {
    Normal: _normal_metric,
    Categorical: _categorical_metric,
    Bernoulli: _bernoulli_metric,
}


def fisher_parameters(distribution: Distribution) -> tuple[list[th.Tensor], FisherMetric] | None:
    """
    The parameters μ of a distribution and its Fisher matrix M in those parameters (Schulman et al., 2015, App. C.1).

    The Fisher matrix of the policy is then F = Jᵀ M J with J = ∂μ/∂θ. ``M`` is the Hessian of KL(old ‖ new) in
    the new distribution's parameters at new = old; it is evaluated at the current (old) parameters and treated
    as a constant.

    :param distribution: an SB3 distribution built with a graph back to the policy parameters
    :return: the list of per-sample parameter tensors and the function applying M to matching tangents,
        or None when the distribution has no analytic metric here
    """
    tensors: list[th.Tensor] = []
    metrics: list[tuple[int, FisherMetric]] = []
    for part in torch_distributions(distribution):
        factory = _METRICS.get(type(part))
        if factory is None:
            return None
        part_tensors, metric = factory(part)
        metrics.append((len(part_tensors), metric))
        tensors.extend(part_tensors)

    def apply_metric(tangents: list[th.Tensor]) -> list[th.Tensor]:
        result: list[th.Tensor] = []
        start = 0
        for count, metric in metrics:
            result.extend(metric(tangents[start : start + count]))
            start += count
        return result

    return tensors, apply_metric
