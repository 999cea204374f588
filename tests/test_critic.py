import pytest
import torch as th
from torch import nn

from sb3_trust.common.critic import MLPValueRegression


def autograd_loss_and_gradients(layers: list[nn.Module], x: th.Tensor, y: th.Tensor) -> tuple[th.Tensor, list[th.Tensor]]:
    model = nn.Sequential(*layers)
    for param in model.parameters():
        param.grad = None
    loss = nn.functional.mse_loss(model(x).flatten(), y)
    loss.backward()
    return loss.detach(), [param.grad.clone() for param in model.parameters()]  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "make_layers",
    [
        lambda: [nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh()), nn.Linear(8, 1)],
        lambda: [nn.Sequential(nn.Linear(5, 8), nn.ReLU()), nn.Linear(8, 1)],
        lambda: [nn.Sequential(nn.Linear(5, 8), nn.Identity(), nn.Linear(8, 3), nn.Tanh()), nn.Linear(3, 1)],
        lambda: [nn.Sequential(), nn.Linear(5, 1)],
    ],
)
def test_hand_written_gradients_equal_autograd(make_layers) -> None:  # type: ignore[no-untyped-def]
    th.manual_seed(0)
    layers = make_layers()
    x, y = th.randn(32, 5, dtype=th.float64), th.randn(32, dtype=th.float64)
    layers = [layer.double() for layer in layers]
    regression = MLPValueRegression.build(layers)
    assert regression is not None
    loss = regression.loss_and_gradients(x, y)
    params = [param for layer in layers for param in layer.parameters()]
    manual = [param.grad.clone() for param in params]  # type: ignore[union-attr]
    flat_layers = [m for layer in layers for m in (layer if isinstance(layer, nn.Sequential) else [layer])]
    expected_loss, expected = autograd_loss_and_gradients(flat_layers, x, y)
    assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-12)
    for got, want in zip(manual, expected, strict=True):
        assert th.allclose(got, want, rtol=1e-10, atol=1e-12)


class NoisyLinear(nn.Linear):
    def forward(self, input: th.Tensor) -> th.Tensor:
        return super().forward(input) + 1.0


class DoublingSequential(nn.Sequential):
    def forward(self, input: th.Tensor) -> th.Tensor:
        return 2.0 * super().forward(input)


def hooked(module: nn.Module) -> nn.Module:
    module.register_forward_hook(lambda _module, _inputs, output: output * 2.0)
    return module


@pytest.mark.parametrize(
    "layers",
    [
        [nn.Sequential(nn.Linear(5, 8), nn.Sigmoid()), nn.Linear(8, 1)],
        [nn.Sequential(nn.Linear(5, 8, bias=False), nn.Tanh()), nn.Linear(8, 1)],
        [nn.Sequential(nn.Linear(5, 8), nn.Tanh()), nn.Linear(8, 2)],
        [nn.Sequential(nn.Tanh()), nn.Linear(5, 1)],
        [nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(5, 8)), nn.Tanh()), nn.Linear(8, 1)],
        [nn.Sequential(nn.Linear(5, 8), nn.Tanh()), nn.utils.parametrizations.spectral_norm(nn.Linear(8, 1))],
        [nn.Sequential(NoisyLinear(5, 8), nn.Tanh()), nn.Linear(8, 1)],
        [nn.Sequential(hooked(nn.Linear(5, 8)), nn.Tanh()), nn.Linear(8, 1)],
        [nn.Sequential(nn.Linear(5, 8), hooked(nn.Tanh())), nn.Linear(8, 1)],
        [hooked(nn.Sequential(nn.Linear(5, 8), nn.Tanh())), nn.Linear(8, 1)],
        [nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.ReLU()), nn.Linear(8, 1)],
        [nn.Sequential(nn.Linear(5, 8), nn.Tanh(), NoisyLinear(8, 8), nn.Tanh()), nn.Linear(8, 1)],
        [DoublingSequential(nn.Linear(5, 8), nn.Tanh()), nn.Linear(8, 1)],
    ],
    ids=[
        "sigmoid",
        "no-bias",
        "vector-output",
        "activation-first",
        "weight-norm",
        "spectral-norm",
        "subclass",
        "hook",
        "hook-on-activation",
        "hook-on-container",
        "two-activations",
        "subclass-inside",
        "sequential-subclass",
    ],
)
def test_unsupported_heads_fall_back(layers: list[nn.Module]) -> None:
    assert MLPValueRegression.build(layers) is None


@pytest.mark.parametrize(
    "register",
    [
        "register_module_forward_hook",
        "register_module_forward_pre_hook",
        "register_module_full_backward_hook",
        "register_module_full_backward_pre_hook",
    ],
)
def test_a_global_module_hook_makes_heads_fall_back(register: str) -> None:
    layers = [nn.Sequential(nn.Linear(5, 8), nn.Tanh()), nn.Linear(8, 1)]
    assert MLPValueRegression.build(layers) is not None
    handle = getattr(nn.modules.module, register)(lambda *args: None)
    try:
        assert MLPValueRegression.build(layers) is None
    finally:
        handle.remove()
