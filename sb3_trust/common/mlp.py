"""SB3's MLPs run as plain tensor functions, for the passes repeated hundreds of times per update or per rollout."""

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch as th
from torch import nn
from torch.nn.utils import parametrize


class Activation(NamedTuple):
    """
    An activation the plain passes know, as functions (one kernel each): on a small batch, a module call costs as
    much as its arithmetic.

    :param forward: the activation
    :param backward: (gradient, output) ↦ the gradient times the activation's derivative, written in terms of its
        output (tanh' = 1 - tanh², relu' = [relu > 0]), the kernels autograd uses
    """

    forward: Callable[[th.Tensor], th.Tensor]
    backward: Callable[[th.Tensor, th.Tensor], th.Tensor]


# None: the identity, skipped
ACTIVATIONS: dict[type[nn.Module], Activation | None] = {
    nn.Tanh: Activation(th.tanh, th.ops.aten.tanh_backward),
    nn.ReLU: Activation(th.relu, lambda gradient, output: th.ops.aten.threshold_backward(gradient, output, 0)),
    nn.Identity: None,
}


def _has_hooks(module: nn.Module) -> bool:
    """
    :param module: a module
    :return: whether hooks are registered on it (forward, forward-pre or backward ones)
    """
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks)


def _global_module_hooks() -> bool:
    """
    :return: whether hooks registered for every module (``torch.nn.modules.module.register_module_*_hook``) exist
    """
    hooks = nn.modules.module
    return bool(
        hooks._global_forward_hooks
        or hooks._global_forward_pre_hooks
        or hooks._global_backward_hooks
        or hooks._global_backward_pre_hooks
    )


class LinearStack:
    """
    ``nn.Linear`` layers, each optionally followed by a Tanh, ReLU or Identity, evaluated with ``addmm`` and the
    activation functions directly: the values the modules compute, without their call overhead.

    :param layers: the modules, in order, ``nn.Sequential`` containers expanded (build it with :meth:`build`)
    """

    def __init__(self, layers: Sequence[nn.Module]) -> None:
        self.linears: list[nn.Linear] = []
        # activations[i]: the activation that follows linears[i] (None when there is none)
        self.activations: list[Activation | None] = []
        for layer in layers:
            if isinstance(layer, nn.Linear):
                self.linears.append(layer)
                self.activations.append(None)
            else:
                self.activations[-1] = ACTIVATIONS[type(layer)]

    @staticmethod
    def build(layers: Sequence[nn.Module]) -> "LinearStack | None":
        """
        :param layers: the candidate modules, in order (``nn.Sequential`` containers are expanded)
        :return: the stack, or None unless the modules are ``nn.Linear`` layers with biases, the first and the last
            a linear layer, with at most one known activation after each, none of them a subclass, parametrized
            (weight or spectral norm) or hooked: those change what the module computes, which only calling it gives
        """
        if _global_module_hooks():
            return None
        expanded: list[nn.Module] = []
        for layer in layers:
            if _has_hooks(layer):  # a container's hooks as well: its call is what gets skipped
                return None
            expanded.extend(layer if type(layer) is nn.Sequential else [layer])
        if not expanded or type(expanded[0]) is not nn.Linear or type(expanded[-1]) is not nn.Linear:
            return None
        previous_linear = False
        for layer in expanded:
            if parametrize.is_parametrized(layer) or _has_hooks(layer):
                return None
            is_linear = type(layer) is nn.Linear
            if is_linear and layer.bias is None:
                return None
            if not is_linear and (type(layer) not in ACTIVATIONS or not previous_linear):
                return None
            previous_linear = is_linear
        return LinearStack(expanded)

    @property
    def out_features(self) -> int:
        return self.linears[-1].out_features

    def forward(self, inputs: th.Tensor, layer_inputs: list[th.Tensor] | None = None) -> th.Tensor:
        """
        :param inputs: a batch, shape (batch, in_features)
        :param layer_inputs: when given, receives the input of every linear layer (each the output of the activation
            before it), for a hand-written backward pass
        :return: the output (with a graph only if the caller's grad mode and the parameters ask for one)
        """
        hidden = inputs
        for linear, activation in zip(self.linears, self.activations, strict=True):
            if layer_inputs is not None:
                layer_inputs.append(hidden)
            hidden = th.addmm(linear.bias, hidden, linear.weight.t())
            if activation is not None:
                hidden = activation.forward(hidden)
        return hidden
