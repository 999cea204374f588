"""Critic regression: the value head fitted to the GAE returns by minibatch mean-squared error."""

from collections.abc import Sequence

import torch as th
from stable_baselines3.common.policies import ActorCriticPolicy
from torch import nn

from sb3_trust.common.mlp import LinearStack


class MLPValueRegression:
    """
    The mean-squared-error gradient of an MLP value head, by hand.

    The critic of a trust-region update takes hundreds of small Adam steps per rollout (``n_critic_updates``
    epochs of minibatches), and for the usual 64x64 MLP the autograd engine and module calls cost more than the
    arithmetic. For a head made only of ``nn.Linear`` layers and Tanh/ReLU/Identity activations, this computes
    the loss and the parameter gradients with a fixed sequence of matrix products (the same values autograd
    gives) and stores them in ``.grad``.

    :param head: the value head, from the (fixed) features to the scalar value
    """

    def __init__(self, head: LinearStack) -> None:
        self.head = head

    @staticmethod
    def build(layers: Sequence[nn.Module]) -> "MLPValueRegression | None":
        """
        :param layers: the candidate modules, in order
        :return: the hand-written regression, or None when some layer is not supported (see
            :meth:`~sb3_trust.common.mlp.LinearStack.build`) or the output is not a scalar
        """
        head = LinearStack.build(layers)
        if head is None or head.out_features != 1:
            return None
        return MLPValueRegression(head)

    def loss_and_gradients(self, inputs: th.Tensor, targets: th.Tensor) -> th.Tensor:
        """
        Forward pass, mean-squared error against ``targets``, and its gradients into each parameter's ``.grad``.

        :param inputs: a minibatch of features (no gradient needed)
        :param targets: the regression targets, shape (batch_size,)
        :return: the loss (detached)
        """
        head = self.head
        with th.no_grad():
            linear_inputs: list[th.Tensor] = []
            values = head.forward(inputs, linear_inputs)
            error = values.flatten() - targets
            loss = error.pow(2).mean()
            # Back-propagate d loss / d value = 2 (v - y) / N; grad_output is d loss / d (output of linears[index])
            grad_output = (2.0 / len(targets)) * error.unsqueeze(1)
            for index in range(len(head.linears) - 1, -1, -1):
                linear, linear_input = head.linears[index], linear_inputs[index]
                linear.weight.grad = grad_output.t() @ linear_input
                linear.bias.grad = grad_output.sum(dim=0)
                if index > 0:
                    grad_output = grad_output @ linear.weight
                    activation = head.activations[index - 1]
                    if activation is not None:
                        # linear_input is that activation's output
                        grad_output = activation.backward(grad_output, linear_input)
        return loss


def value_head_layers(policy: ActorCriticPolicy) -> list[nn.Module]:
    """
    :param policy: an SB3 ``ActorCriticPolicy``
    :return: the modules that map the shared features to the value: the MLP extractor's value net, then value_net
    """
    return [policy.mlp_extractor.value_net, policy.value_net]
