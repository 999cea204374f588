"""Critic regression: the value head fitted to the GAE returns by minibatch mean-squared error."""

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch as th
from torch import nn
from torch.nn.utils import parametrize


class _Activation(NamedTuple):
    """
    An activation the fast path knows, as plain functions (one kernel each): on a minibatch of 128, a module call
    costs as much as its arithmetic.

    :param forward: the activation
    :param backward: (gradient, output) ↦ the gradient times the activation's derivative, written in terms of its
        output (tanh' = 1 - tanh², relu' = [relu > 0]), the kernels autograd uses
    """

    forward: Callable[[th.Tensor], th.Tensor]
    backward: Callable[[th.Tensor, th.Tensor], th.Tensor]


# The identity is skipped
_ACTIVATIONS: dict[type[nn.Module], _Activation | None] = {
    nn.Tanh: _Activation(th.tanh, th.ops.aten.tanh_backward),
    nn.ReLU: _Activation(th.relu, lambda gradient, output: th.ops.aten.threshold_backward(gradient, output, 0)),
    nn.Identity: None,
}


class MLPValueRegression:
    """
    The mean-squared-error gradient of an MLP value head, by hand.

    The critic of a trust-region update takes hundreds of small Adam steps per rollout (``n_critic_updates``
    epochs of minibatches), and for the usual 64x64 MLP the autograd engine and module calls cost more than the
    arithmetic. For a head made only of ``nn.Linear`` layers and Tanh/ReLU/Identity activations, this computes
    the loss and the parameter gradients with a fixed sequence of matrix products (the same values autograd
    gives) and stores them in ``.grad``.

    :param layers: the modules from the (fixed) features to the scalar value, in order
    """

    def __init__(self, layers: Sequence[nn.Module]) -> None:
        self.linears: list[nn.Linear] = []
        # activations[i]: the activation that follows linears[i] (None when there is none)
        self.activations: list[_Activation | None] = []
        for layer in layers:
            if isinstance(layer, nn.Linear):
                self.linears.append(layer)
                self.activations.append(None)
            else:
                self.activations[-1] = _ACTIVATIONS[type(layer)]

    @staticmethod
    def build(layers: Sequence[nn.Module]) -> "MLPValueRegression | None":
        """
        :param layers: the candidate modules, in order
        :return: the hand-written regression, or None when some layer is not supported
        """
        expanded: list[nn.Module] = []
        for layer in layers:
            expanded.extend(layer if isinstance(layer, nn.Sequential) else [layer])
        if not expanded or not isinstance(expanded[0], nn.Linear) or not isinstance(expanded[-1], nn.Linear):
            return None
        previous_linear = False
        for layer in expanded:
            # Exactly these modules, as they are: a subclass, a parametrization (weight norm, spectral norm) or a hook
            # changes what the module computes, which only calling it gives
            if parametrize.is_parametrized(layer) or layer._forward_hooks or layer._forward_pre_hooks:
                return None
            is_linear = type(layer) is nn.Linear
            if is_linear and layer.bias is None:
                return None
            if not is_linear and (type(layer) not in _ACTIVATIONS or not previous_linear):
                return None
            previous_linear = is_linear
        if expanded[-1].out_features != 1:
            return None
        return MLPValueRegression(expanded)

    def loss_and_gradients(self, inputs: th.Tensor, targets: th.Tensor) -> th.Tensor:
        """
        Forward pass, mean-squared error against ``targets``, and its gradients into each parameter's ``.grad``.

        :param inputs: a minibatch of features (no gradient needed)
        :param targets: the regression targets, shape (batch_size,)
        :return: the loss (detached)
        """
        with th.no_grad():
            linear_inputs = []
            hidden = inputs
            for linear, activation in zip(self.linears, self.activations, strict=True):
                linear_inputs.append(hidden)
                hidden = th.addmm(linear.bias, hidden, linear.weight.t())
                if activation is not None:
                    hidden = activation.forward(hidden)
            error = hidden.flatten() - targets
            loss = error.pow(2).mean()
            # Back-propagate d loss / d value = 2 (v - y) / N; grad_output is d loss / d (output of linears[index])
            grad_output = (2.0 / len(targets)) * error.unsqueeze(1)
            for index in range(len(self.linears) - 1, -1, -1):
                linear, linear_input = self.linears[index], linear_inputs[index]
                linear.weight.grad = grad_output.t() @ linear_input
                linear.bias.grad = grad_output.sum(dim=0)
                if index > 0:
                    grad_output = grad_output @ linear.weight
                    activation = self.activations[index - 1]
                    if activation is not None:
                        # linear_input is that activation's output
                        grad_output = activation.backward(grad_output, linear_input)
        return loss


def value_head_layers(policy: Any) -> list[nn.Module]:
    """
    :param policy: an SB3 ``ActorCriticPolicy``
    :return: the modules that map the shared features to the value: the MLP extractor's value net, then value_net
    """
    return [policy.mlp_extractor.value_net, policy.value_net]
