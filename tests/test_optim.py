from collections.abc import Callable
from typing import Any

import pytest
import torch as th
import torch.optim.adam as torch_adam
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from sb3_trust.common.optim import LeanAdam


def make_model() -> nn.Module:
    th.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 1))


def count_torch_steps(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the updates that go through ``torch.optim.Adam.step`` (its functional update), not the short path."""
    calls: list[int] = []
    updates = ("_fused_adam", "_multi_tensor_adam", "_single_tensor_adam")

    def counted(update: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            calls.append(1)
            return update(*args, **kwargs)

        return wrapper

    for name in updates:
        monkeypatch.setattr(torch_adam, name, counted(getattr(torch_adam, name)))
    return calls


def train_side_by_side(lean: LeanAdam, lean_model: nn.Module, reference: th.optim.Adam, reference_model: nn.Module) -> None:
    x, y = th.randn(32, 5), th.randn(32, 1)
    for step in range(6):
        for model, optimizer in ((reference_model, reference), (lean_model, lean)):
            for group in optimizer.param_groups:
                # A schedule changes the learning rate between steps, as SB3's _update_learning_rate does
                if not isinstance(group["lr"], th.Tensor):
                    group["lr"] = 1e-2 / (1 + step)
            optimizer.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            if optimizer is lean:
                lean.lean_step()
            else:
                optimizer.step()
    for a, b in zip(reference_model.parameters(), lean_model.parameters(), strict=True):
        assert th.equal(a, b)


@pytest.mark.parametrize("kwargs", [dict(lr=1e-3, eps=1e-5), dict(lr=3e-2, weight_decay=0.01, betas=(0.8, 0.99))])
def test_lean_adam_matches_fused_adam_exactly(kwargs: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    reference_model, lean_model = make_model(), make_model()
    reference = th.optim.Adam(reference_model.parameters(), fused=True, **kwargs)
    lean = LeanAdam(lean_model.parameters(), **kwargs)
    torch_steps = count_torch_steps(monkeypatch)
    train_side_by_side(lean, lean_model, reference, reference_model)
    # The reference's 6 steps, and only the first of LeanAdam's (which creates the state): the others took the short path
    assert len(torch_steps) == 6 + 1
    assert lean.state_dict()["state"][0]["step"].item() == 6
    # The state dict is plain Adam's: it loads into torch's optimizer and back
    reference.load_state_dict(lean.state_dict())
    lean.load_state_dict(reference.state_dict())


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(amsgrad=True),
        dict(maximize=True),
        dict(weight_decay=0.1, decoupled_weight_decay=True),
        dict(lr=th.tensor(1e-2)),
        dict(fused=False),
    ],
    ids=["amsgrad", "maximize", "decoupled-weight-decay", "tensor-lr", "not-fused"],
)
def test_lean_step_leaves_other_configurations_to_torch(kwargs: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    reference_model, lean_model = make_model(), make_model()
    reference = th.optim.Adam(reference_model.parameters(), **{"fused": True, **kwargs})
    lean = LeanAdam(lean_model.parameters(), **kwargs)
    torch_steps = count_torch_steps(monkeypatch)
    train_side_by_side(lean, lean_model, reference, reference_model)
    assert len(torch_steps) == 6 + 6


def _instance_post_hook(optimizer: LeanAdam, calls: list[str]) -> Any:
    return optimizer.register_step_post_hook(lambda *_: calls.append("hook"))


def _global_pre_hook(optimizer: LeanAdam, calls: list[str]) -> Any:
    return register_optimizer_step_pre_hook(lambda *_: calls.append("hook"))


def _global_post_hook(optimizer: LeanAdam, calls: list[str]) -> Any:
    return register_optimizer_step_post_hook(lambda *_: calls.append("hook"))


def _instance_pre_hook(optimizer: LeanAdam, calls: list[str]) -> Any:
    return optimizer.register_step_pre_hook(lambda *_: calls.append("hook"))


@pytest.mark.parametrize("register", [_instance_pre_hook, _instance_post_hook, _global_pre_hook, _global_post_hook])
def test_lean_step_runs_step_hooks_once(register: Callable[[LeanAdam, list[str]], Any]) -> None:
    model = make_model()
    optimizer = LeanAdam(model.parameters(), lr=1e-2)
    ((model(th.randn(4, 5))) ** 2).mean().backward()
    optimizer.lean_step()  # creates the state, through step()
    calls: list[str] = []
    handle = register(optimizer, calls)
    try:
        optimizer.lean_step()
    finally:
        handle.remove()
    assert calls == ["hook"]
    optimizer.lean_step()
    assert calls == ["hook"]
    assert optimizer.state[next(model.parameters())]["step"].item() == 3


def test_lean_step_goes_through_step_when_profiled_or_overridden(monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_model()
    optimizer = LeanAdam(model.parameters(), lr=1e-2)
    ((model(th.randn(4, 5))) ** 2).mean().backward()
    optimizer.lean_step()
    torch_steps = count_torch_steps(monkeypatch)
    with th.profiler.profile() as profile:
        optimizer.lean_step()
    assert len(torch_steps) == 1
    assert any("Optimizer.step#LeanAdam.step" in event.name for event in profile.events())

    # A step replaced on the instance, or overridden by a subclass, is what lean_step runs
    replaced: list[str] = []
    original = optimizer.step
    monkeypatch.setattr(optimizer, "step", lambda *args: replaced.append("instance") or original(*args))
    optimizer.lean_step()
    assert replaced == ["instance"]

    class Overriding(LeanAdam):
        def step(self, closure: Any = None) -> Any:  # type: ignore[override]
            replaced.append("subclass")
            return super().step(closure)

    subclassed = Overriding(model.parameters(), lr=1e-2)
    subclassed.lean_step()
    subclassed.lean_step()
    assert replaced == ["instance", "subclass", "subclass"]


def test_lean_step_leaves_mixed_dtypes_to_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    # One group with float32 and float64 parameters: torch's step() makes one kernel call per dtype (on CUDA, one
    # call for both would be refused), so lean_step leaves them to it
    torch_steps = count_torch_steps(monkeypatch)
    th.manual_seed(0)
    single, double = nn.Parameter(th.randn(3)), nn.Parameter(th.randn(3, dtype=th.float64))
    reference_single, reference_double = nn.Parameter(single.detach().clone()), nn.Parameter(double.detach().clone())
    lean = LeanAdam([single, double], lr=1e-2)
    reference = th.optim.Adam([reference_single, reference_double], lr=1e-2, fused=True)
    for _ in range(3):
        for optimizer, params in ((lean, (single, double)), (reference, (reference_single, reference_double))):
            optimizer.zero_grad()
            (params[0].sum() ** 2 + (params[1] ** 3).sum()).backward()
            lean.lean_step() if optimizer is lean else optimizer.step()
    assert th.equal(single, reference_single) and th.equal(double, reference_double)
    assert len(torch_steps) == 3 + 3


def test_a_parameter_without_gradient_keeps_the_short_path(monkeypatch: pytest.MonkeyPatch) -> None:
    # As torch's Adam, a parameter that gets no gradient has no state and does not move; the others still take the
    # short path (a frozen or unused critic parameter must not send every later step through step())
    reference_model, lean_model = make_model(), make_model()
    unused = [nn.Parameter(th.ones(3)) for _ in range(2)]
    reference = th.optim.Adam([*reference_model.parameters(), unused[0]], fused=True, lr=1e-3)
    lean = LeanAdam([*lean_model.parameters(), unused[1]], lr=1e-3)
    torch_steps = count_torch_steps(monkeypatch)
    train_side_by_side(lean, lean_model, reference, reference_model)
    assert len(torch_steps) == 6 + 1
    assert th.equal(unused[1], th.ones(3)) and unused[1] not in lean.state
