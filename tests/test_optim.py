from typing import Any

import pytest
import torch as th
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from sb3_trust.common.optim import LeanAdam


def make_model() -> nn.Module:
    th.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 1))


@pytest.mark.parametrize("kwargs", [dict(lr=1e-3, eps=1e-5), dict(lr=3e-2, weight_decay=0.01, betas=(0.8, 0.99))])
def test_lean_adam_matches_fused_adam_exactly(kwargs: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    reference_model, lean_model = make_model(), make_model()
    reference = th.optim.Adam(reference_model.parameters(), fused=True, **kwargs)
    lean = LeanAdam(lean_model.parameters(), **kwargs)
    torch_steps: list[th.optim.Optimizer] = []
    torch_step = th.optim.Adam.step

    def counted_torch_step(self: th.optim.Adam, closure: Any = None) -> Any:
        torch_steps.append(self)
        return torch_step(self, closure)

    monkeypatch.setattr(th.optim.Adam, "step", counted_torch_step)
    x, y = th.randn(32, 5), th.randn(32, 1)
    for _ in range(25):
        for model, optimizer in ((reference_model, reference), (lean_model, lean)):
            optimizer.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            if optimizer is lean:
                lean.lean_step()
            else:
                optimizer.step()
    for a, b in zip(reference_model.parameters(), lean_model.parameters(), strict=True):
        assert th.equal(a, b)
    # Only the first step, which creates the state, went through torch's Adam.step: the others took the short path
    assert sum(optimizer is lean for optimizer in torch_steps) == 1
    assert lean.state_dict()["state"][0]["step"].item() == 25
    # The state dict is plain Adam's: it loads into torch's optimizer and back
    reference.load_state_dict(lean.state_dict())
    lean.load_state_dict(reference.state_dict())


def test_lean_adam_leaves_other_configurations_to_torch() -> None:
    model = make_model()
    optimizer = LeanAdam(model.parameters(), lr=1e-2, amsgrad=True)
    ((model(th.randn(4, 5))) ** 2).mean().backward()
    optimizer.lean_step()
    optimizer.lean_step()
    assert "max_exp_avg_sq" in optimizer.state[next(model.parameters())]


def test_lean_step_runs_step_hooks_once() -> None:
    model = make_model()
    optimizer = LeanAdam(model.parameters(), lr=1e-2)
    ((model(th.randn(4, 5))) ** 2).mean().backward()
    optimizer.lean_step()  # creates the state, through step()
    calls: list[str] = []
    pre = optimizer.register_step_pre_hook(lambda *_: calls.append("pre"))
    post = register_optimizer_step_post_hook(lambda *_: calls.append("post"))
    try:
        optimizer.lean_step()
    finally:
        pre.remove()
        post.remove()
    assert calls == ["pre", "post"]
    optimizer.lean_step()
    assert calls == ["pre", "post"]
    assert optimizer.state[next(model.parameters())]["step"].item() == 3
