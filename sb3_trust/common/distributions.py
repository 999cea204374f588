"""
KL divergences and Fisher metrics of the action distributions that SB3's on-policy policies use.

An SB3 ``Distribution`` wraps one torch distribution (``Normal``, ``Categorical``, ``Bernoulli``) or, for
``MultiCategoricalDistribution``, a list of ``Categorical``. Everything here works on those torch objects,
so a custom SB3 distribution built from them (also inside an ``Independent``, or a ``TransformedDistribution``
through element-wise transforms such as tanh) is supported as well. Any other torch distribution (a subclass of
``Normal`` included) can be detached and gets the KL-Hessian Fisher product; its rows are not selected or
concatenated (a ``TypeError`` says so, and PPOKL then estimates its KL from samples).
"""

import copy
from collections.abc import Callable, Sequence
from typing import cast

import torch as th
from stable_baselines3.common.distributions import (
    BernoulliDistribution,
    CategoricalDistribution,
    DiagGaussianDistribution,
    Distribution,
    MultiCategoricalDistribution,
    StateDependentNoiseDistribution,
)
from torch.distributions import Bernoulli, Categorical, Independent, Normal, TransformedDistribution
from torch.distributions import Distribution as TorchDistribution
from torch.distributions.transforms import (
    AbsTransform,
    AffineTransform,
    ExpTransform,
    SigmoidTransform,
    SoftplusTransform,
    TanhTransform,
    Transform,
)

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


# The distributions that :func:`sample_with_common_noise` draws from
COMMON_NOISE_DISTRIBUTIONS = (
    DiagGaussianDistribution,
    CategoricalDistribution,
    MultiCategoricalDistribution,
    BernoulliDistribution,
)


def _inverse_cdf_categorical(categorical: Categorical, uniforms: th.Tensor) -> th.Tensor:
    cumulative = categorical.probs.cumsum(dim=-1)
    # The first index whose cumulative probability exceeds u; clamped against round-off in the last sum
    return (cumulative <= uniforms.unsqueeze(-1)).sum(dim=-1).clamp(max=categorical.probs.shape[-1] - 1)


def sample_with_common_noise(distribution: Distribution, group_size: int, generator: th.Generator | None = None) -> th.Tensor:
    """
    One action per row, the rows in consecutive groups of ``group_size`` sharing their random numbers (common random
    numbers, seed 004 Sec. 1.4.2): rows of one group with the same law draw the same action, and rows with close
    laws draw close actions. A Gaussian row is μ + σ ε, a categorical row the inverse of its CDF at u, a Bernoulli
    row 1[u < p], with ε or u drawn once per group.

    :param distribution: an SB3 diagonal Gaussian, categorical, multi-categorical or Bernoulli distribution
        (``COMMON_NOISE_DISTRIBUTIONS``) on which ``proba_distribution`` has been called, over a multiple of
        ``group_size`` rows
    :param group_size: the number of consecutive rows that share their random numbers
    :param generator: the random number generator (torch's global one when None)
    :return: the actions, as ``distribution.sample()`` shapes them
    :raises TypeError: for other distributions
    """
    if not isinstance(distribution, COMMON_NOISE_DISTRIBUTIONS):
        raise TypeError(f"{type(distribution).__name__} has no common-random-number sampler here")
    actions = []
    for part in torch_distributions(distribution):
        batch_shape = part.batch_shape
        if batch_shape[0] % group_size != 0:
            raise ValueError(f"{batch_shape[0]} rows are no whole number of groups of {group_size}")
        noise_shape = (batch_shape[0] // group_size, *batch_shape[1:])
        if isinstance(part, Normal):
            noise = th.randn(noise_shape, generator=generator, device=part.loc.device)
            actions.append(part.loc + part.scale * noise.repeat_interleave(group_size, dim=0))
            continue
        assert isinstance(part, (Categorical, Bernoulli))
        probs = part.probs
        uniforms = th.rand(noise_shape, generator=generator, device=probs.device).repeat_interleave(group_size, dim=0)
        if isinstance(part, Categorical):
            actions.append(_inverse_cdf_categorical(part, uniforms))
        else:
            actions.append((uniforms < probs).to(probs.dtype))
    if isinstance(distribution, MultiCategoricalDistribution):
        return th.stack(actions, dim=1)
    return actions[0]


# The torch distributions rebuilt from their defining parameters (cached ones such as ``probs`` would go stale)
_REBUILT_TORCH_DISTRIBUTIONS = (Normal, Categorical, Bernoulli)


# Transforms without per-row state that compare equal by value (torch's __eq__), the only ones a
# TransformedDistribution's rows are selected or concatenated with
_ROW_FREE_TRANSFORMS = (TanhTransform, SigmoidTransform, ExpTransform, SoftplusTransform, AbsTransform)


def _is_row_free(transform: Transform) -> bool:
    if type(transform) is AffineTransform:
        affine = cast(AffineTransform, transform)
        return isinstance(affine.loc, (int, float)) and isinstance(affine.scale, (int, float))
    return type(transform) in _ROW_FREE_TRANSFORMS


def _can_rebuild(part: TorchDistribution) -> bool:
    """
    :param part: a torch distribution
    :return: whether its rows can be selected or concatenated here: it is Normal, Categorical or Bernoulli exactly
        (a subclass may hold other state or compute otherwise), or an ``Independent`` of such, or a
        ``TransformedDistribution`` of such through element-wise transforms without tensors (``_ROW_FREE_TRANSFORMS``,
        or an ``AffineTransform`` with numbers)
    """
    if type(part) in _REBUILT_TORCH_DISTRIBUTIONS:
        return True
    if type(part) is Independent:
        return _can_rebuild(cast(Independent, part).base_dist)
    if type(part) is TransformedDistribution:
        transformed = cast(TransformedDistribution, part)
        return _can_rebuild(transformed.base_dist) and all(_is_row_free(transform) for transform in transformed.transforms)
    return False


def _rebuild_torch_distribution(
    parts: Sequence[TorchDistribution], combine: Callable[[list[th.Tensor]], th.Tensor]
) -> TorchDistribution:
    """
    :param parts: torch distributions of one structure, each accepted by :func:`_can_rebuild`
    :param combine: how each defining tensor of the result is made from theirs
    :return: a new distribution of that structure built from the combined defining tensors
    :raises TypeError: when the parts are not all of one rebuildable structure
    """
    first = parts[0]
    if not all(_can_rebuild(part) and type(part) is type(first) for part in parts):
        kinds = sorted({type(part).__name__ for part in parts})
        raise TypeError(
            f"Only the rows of Normal, Categorical or Bernoulli distributions of one kind (or of an Independent or an "
            f"element-wise TransformedDistribution of them) are selected or concatenated here, not {kinds}"
        )
    if isinstance(first, Normal):
        normals = cast(list[Normal], list(parts))
        return Normal(combine([part.loc for part in normals]), combine([part.scale for part in normals]), validate_args=False)
    if isinstance(first, (Categorical, Bernoulli)):
        logits = combine([cast(Categorical | Bernoulli, part).logits for part in parts])
        kind = Categorical if isinstance(first, Categorical) else Bernoulli
        return kind(logits=logits, validate_args=False)
    wrappers = cast(list[Independent | TransformedDistribution], list(parts))
    base = _rebuild_torch_distribution([part.base_dist for part in wrappers], combine)
    if isinstance(first, Independent):
        if any(cast(Independent, part).reinterpreted_batch_ndims != first.reinterpreted_batch_ndims for part in parts):
            raise TypeError("Independent rows with different event dimensions are not concatenated")
        return Independent(base, first.reinterpreted_batch_ndims, validate_args=False)
    transforms = cast(TransformedDistribution, first).transforms
    if any(cast(TransformedDistribution, part).transforms != transforms for part in parts):
        raise TypeError("TransformedDistribution rows with different transforms are not concatenated")
    return TransformedDistribution(base, transforms, validate_args=False)


def state_tensors(part: TorchDistribution) -> list[th.Tensor]:
    """
    :param part: a torch distribution
    :return: the tensors it holds, those of its nested distributions included (an ``Independent`` or a
        ``TransformedDistribution`` keeps its own in ``base_dist``, a ``Beta`` in a ``Dirichlet``)
    """
    tensors: list[th.Tensor] = []
    for value in vars(part).values():
        if isinstance(value, th.Tensor):
            tensors.append(value)
        elif isinstance(value, TorchDistribution):
            tensors.extend(state_tensors(value))
    return tensors


def _detached_torch_distribution(part: TorchDistribution) -> TorchDistribution:
    """
    :param part: any torch distribution whose state is tensors and nested distributions (e.g. ``Beta``)
    :return: a shallow copy of it (and of its nested distributions) holding detached tensors
    """
    if _can_rebuild(part):
        return _rebuild_torch_distribution([part], lambda tensors: tensors[0].detach())
    detached = copy.copy(part)
    for name, value in vars(part).items():
        if isinstance(value, th.Tensor):
            setattr(detached, name, value.detach())
        elif isinstance(value, TorchDistribution):
            setattr(detached, name, _detached_torch_distribution(value))
    return detached


def _with_torch_distributions(distribution: Distribution, parts: list[TorchDistribution]) -> Distribution:
    """
    :param distribution: an SB3 distribution
    :param parts: new torch distributions, one per part of ``distribution``
    :return: a shallow copy of ``distribution`` holding them (its other state, such as gSDE's noise features, shared)
    """
    result = copy.copy(distribution)
    result.distribution = parts if isinstance(distribution.distribution, (list, tuple)) else parts[0]
    return result


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
    return _with_torch_distributions(distributions[0], [_rebuild_torch_distribution(column, combine) for column in columns])


def can_concatenate(distribution: Distribution) -> bool:
    """
    :param distribution: an SB3 distribution on which ``proba_distribution`` has been called
    :return: whether distributions like it can be concatenated, and rows of it selected (its torch parts are
        Normal, Categorical or Bernoulli exactly, possibly inside an ``Independent`` or a ``TransformedDistribution``
        through element-wise transforms without tensors: see ``_can_rebuild``)
    """
    return all(_can_rebuild(part) for part in torch_distributions(distribution))


def concatenate_distributions(distributions: Sequence[Distribution]) -> Distribution:
    """
    One distribution over the rows of several batched distributions, in order (a rollout evaluated in chunks).

    Only the torch distributions are concatenated, which is what KL divergences, log-probabilities and entropies use;
    other state of the SB3 object (gSDE's noise features, used to sample) is the first's.

    :param distributions: SB3 distributions of the same structure that :func:`can_concatenate`
    :return: a new distribution object over all their rows (the one distribution itself when there is one)
    :raises TypeError: for other torch distributions
    """
    if len(distributions) == 1:
        return distributions[0]
    return _combine_distributions(distributions, th.cat)


def select_distribution(distribution: Distribution, indices: th.Tensor | slice) -> Distribution:
    """
    The distribution of a subset of the batch (e.g. a minibatch of a frozen rollout distribution).

    :param distribution: a batched SB3 distribution that :func:`can_concatenate` (any, for a slice of every row)
    :param indices: the rows to keep
    :return: a new distribution object over those rows (the distribution itself for a slice of every row)
    :raises TypeError: for other torch distributions, whose rows may hide in state not known here
    """
    if isinstance(indices, slice):
        rows = range(torch_distributions(distribution)[0].batch_shape[0])
        if rows[indices] == rows:
            return distribution
    return _combine_distributions([distribution], lambda tensors: tensors[0][indices])


def detach_distribution(distribution: Distribution) -> Distribution:
    """
    A copy of an SB3 distribution cut from the autograd graph.

    SB3 policies reuse one ``Distribution`` object for every forward pass, so the "old" policy of a trust-region
    update must be copied before the parameters move.

    :param distribution: the distribution to freeze (any torch distributions whose state is tensors and nested
        distributions)
    :return: a shallow copy whose torch distributions hold detached tensors
    """
    return _with_torch_distributions(
        distribution, [_detached_torch_distribution(part) for part in torch_distributions(distribution)]
    )


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
