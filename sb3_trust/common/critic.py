"""Critic regression: the value head fitted to the GAE returns by minibatch mean-squared error."""

from collections.abc import Callable, Sequence
from typing import Any

import torch as th
from torch import nn

# d(activation)/d(input) written in terms of the activation's output, for the layers the fast path knows
_ACTIVATION_DERIVATIVES: dict[type[nn.Module], Callable[[th.Tensor], th.Tensor]] = {
    nn.Tanh: lambda output: 1.0 - output * output,
    nn.ReLU: lambda output: (output > 0).to(output.dtype),
    nn.Identity: th.ones_like,
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
        self.modules = list(layers)
        self.linears: list[nn.Linear] = []
        # derivatives[i]: the derivative of the activation that follows linears[i] (None when there is none)
        self.derivatives: list[Callable[[th.Tensor], th.Tensor] | None] = []
        for layer in self.modules:
            if isinstance(layer, nn.Linear):
                self.linears.append(layer)
                self.derivatives.append(None)
            else:
                self.derivatives[-1] = _ACTIVATION_DERIVATIVES[type(layer)]

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
            is_linear = isinstance(layer, nn.Linear)
            if is_linear and layer.bias is None:
                return None
            if not is_linear and (type(layer) not in _ACTIVATION_DERIVATIVES or not previous_linear):
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
            for module in self.modules:
                if isinstance(module, nn.Linear):
                    linear_inputs.append(hidden)
                hidden = module(hidden)
            error = hidden.flatten() - targets
            loss = error.pow(2).mean()
            # Back-propagate d loss / d value = 2 (v - y) / N; grad_output is d loss / d (output of linears[index])
            grad_output = (2.0 / len(targets)) * error.unsqueeze(1)
            for index in range(len(self.linears) - 1, -1, -1):
                linear, linear_input = self.linears[index], linear_inputs[index]
                linear.weight.grad = grad_output.T @ linear_input
                linear.bias.grad = grad_output.sum(dim=0)
                if index > 0:
                    grad_output = grad_output @ linear.weight
                    derivative = self.derivatives[index - 1]
                    if derivative is not None:
                        # linear_input is the output of that activation
                        grad_output = grad_output * derivative(linear_input)
        return loss


def value_head_layers(policy: Any) -> list[nn.Module]:
    """
    :param policy: an SB3 ``ActorCriticPolicy``
    :return: the modules that map the shared features to the value: the MLP extractor's value net, then value_net
    """
    return [policy.mlp_extractor.value_net, policy.value_net]
