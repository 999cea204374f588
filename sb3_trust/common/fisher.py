"""Fisher-vector products F v of a policy, without ever forming F or the Jacobian J."""

from collections.abc import Sequence

import torch as th
from stable_baselines3.common.distributions import Distribution
from torch import nn
from torch.nn.utils import parameters_to_vector

from sb3_trust.common.distributions import detach_distribution, fisher_parameters, mean_kl


def _flat(tensors: Sequence[th.Tensor | None], like: Sequence[nn.Parameter]) -> th.Tensor:
    return th.cat([(th.zeros_like(p) if t is None else t).reshape(-1) for t, p in zip(tensors, like, strict=True)])


def _unflatten(vector: th.Tensor, like: Sequence[th.Tensor]) -> list[th.Tensor]:
    chunks, start = [], 0
    for tensor in like:
        chunks.append(vector[start : start + tensor.numel()].view_as(tensor))
        start += tensor.numel()
    return chunks


class FisherVectorProduct:
    """
    The damped Fisher-vector product (F + λI) v of a policy over a batch of states.

    F is the Hessian of the mean KL(π_old ‖ π_θ) at θ = θ_old. For the distributions with an analytic metric
    (diagonal Gaussian, gSDE, categorical, multi-categorical, Bernoulli) it is computed exactly as
    F = (1/N) Σ_n J_nᵀ M_n J_n (Schulman et al., 2015, App. C.1): J v comes from the "double-vjp" trick (differentiate
    u ↦ Jᵀ u, which is linear in u, to get J v), M is applied in closed form, and Jᵀ(M J v) is one more
    vector-Jacobian product. For any other distribution it falls back to double back-propagation of the mean KL.

    The graph of the forward pass is kept, so each product costs two backward passes and no forward pass.

    :param distribution: the policy's distribution on the batch, built with a graph to ``params``
    :param params: the actor parameters θ (the ones the natural gradient moves)
    :param damping: λ, added to make the system better conditioned (``cg_damping``)
    """

    def __init__(self, distribution: Distribution, params: Sequence[nn.Parameter], damping: float) -> None:
        self.params = list(params)
        self.damping = damping
        fisher = fisher_parameters(distribution)
        self.is_analytic = fisher is not None
        if fisher is not None:
            all_outputs, self._metric = fisher
            self._batch_size = all_outputs[0].shape[0]
            # A distribution parameter that no trainable parameter reaches (e.g. a frozen log_std) has J = 0: its
            # tangent is zero and its block of Jᵀ M J v drops out, so it is left out of the products (exactly)
            self._zero_tangents = [None if output.requires_grad else th.zeros_like(output) for output in all_outputs]
            self._outputs = [output for output in all_outputs if output.requires_grad]
            self._cotangents = [th.zeros_like(output, requires_grad=True) for output in self._outputs]
            # Jᵀ u, kept as a graph that is linear in u
            self._jacobian_transpose = th.autograd.grad(
                self._outputs, self.params, self._cotangents, create_graph=True, allow_unused=True, materialize_grads=True
            )
        else:
            kl = mean_kl(detach_distribution(distribution), distribution)
            self._kl_gradient = _flat(
                th.autograd.grad(kl, self.params, create_graph=True, allow_unused=True, materialize_grads=True),
                self.params,
            )

    def __call__(self, vector: th.Tensor) -> th.Tensor:
        """
        :param vector: a flat vector with one entry per actor parameter
        :return: (F + λI) v as a flat vector
        """
        return self.fisher_product(vector) + self.damping * vector

    def fisher_product(self, vector: th.Tensor) -> th.Tensor:
        """
        :param vector: a flat vector with one entry per actor parameter
        :return: F v without damping
        """
        if not self.is_analytic:
            product = th.autograd.grad(self._kl_gradient, self.params, vector, retain_graph=True, allow_unused=True)
            return _flat(product, self.params).detach()
        jacobian_vector = th.autograd.grad(
            self._jacobian_transpose,
            self._cotangents,
            _unflatten(vector, self.params),
            retain_graph=True,
            allow_unused=True,
            materialize_grads=True,
        )
        tangents = iter(jacobian_vector)
        metric_jacobian_vector = self._metric([next(tangents) if zero is None else zero for zero in self._zero_tangents])
        trainable_blocks = [
            block for block, zero in zip(metric_jacobian_vector, self._zero_tangents, strict=True) if zero is None
        ]
        product = th.autograd.grad(self._outputs, self.params, trainable_blocks, retain_graph=True, allow_unused=True)
        return _flat(product, self.params).detach() / self._batch_size


def flat_parameters(params: Sequence[nn.Parameter]) -> th.Tensor:
    """
    :param params: parameters
    :return: a detached flat copy of their values
    """
    return parameters_to_vector(params).detach().clone()


def set_flat_parameters(params: Sequence[nn.Parameter], flat: th.Tensor) -> None:
    """
    Copy a flat vector into parameters, in place (their storage, and so any optimizer's view of them, is kept).

    :param params: parameters
    :param flat: one value per parameter entry
    """
    with th.no_grad():
        for param, value in zip(params, _unflatten(flat, params), strict=True):
            param.copy_(value)


def flat_gradient(output: th.Tensor, params: Sequence[nn.Parameter], retain_graph: bool = False) -> th.Tensor:
    """
    :param output: a scalar
    :param params: parameters (an unused one gets a zero gradient)
    :param retain_graph: keep the graph for later products
    :return: the flat gradient of ``output`` w.r.t. ``params``
    """
    grads = th.autograd.grad(output, params, retain_graph=retain_graph, allow_unused=True)
    return _flat(grads, params)
