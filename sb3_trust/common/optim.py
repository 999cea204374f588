"""Adam for the critic's many small steps."""

from collections.abc import Callable, Iterable
from typing import Any

import torch as th


class LeanAdam(th.optim.Adam):
    """
    torch's fused Adam, with a short path through ``step()``.

    The critic of a trust-region update takes hundreds of Adam steps per rollout on a small network. There,
    ``torch.optim.Adam.step`` spends as long in its general bookkeeping (grouping tensors by device and dtype,
    hooks, scalar conversions) as in the fused update kernel itself. Once every parameter has its state, this
    calls that same kernel directly; the update, the state layout and the state dict are exactly torch's fused
    Adam's (a state dict moves freely between the two). Closures, amsgrad, maximize, tensor learning rates and
    the first step go through ``torch.optim.Adam.step``.

    :param params: parameters to optimise
    :param kwargs: ``torch.optim.Adam``'s arguments (``fused`` defaults to True)
    """

    def __init__(self, params: Iterable[th.nn.Parameter], **kwargs: Any) -> None:
        kwargs.setdefault("fused", True)
        super().__init__(params, **kwargs)

    @th.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """
        Perform a single optimization step.

        :param closure: a closure that re-evaluates the model and returns the loss (handled by torch's Adam)
        :return: the closure's loss, if any
        """
        if closure is not None or not hasattr(th, "_fused_adam_"):
            return super().step(closure)
        updates = []
        for group in self.param_groups:
            params = [param for param in group["params"] if param.grad is not None]
            states = [self.state[param] for param in params]
            if not self._is_plain(group) or any(not state for state in states):
                return super().step()
            updates.append((group, params, states))
        for group, params, states in updates:
            if not params:
                continue
            steps = [state["step"] for state in states]
            th._foreach_add_(steps, 1)
            beta1, beta2 = group["betas"]
            th._fused_adam_(
                params,
                [param.grad for param in params],
                [state["exp_avg"] for state in states],
                [state["exp_avg_sq"] for state in states],
                [],
                steps,
                amsgrad=False,
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                weight_decay=group["weight_decay"],
                eps=group["eps"],
                maximize=False,
                grad_scale=None,
                found_inf=None,
            )
        return None

    @staticmethod
    def _is_plain(group: dict[str, Any]) -> bool:
        return (
            bool(group.get("fused"))
            and not group["amsgrad"]
            and not group["maximize"]
            and not group.get("decoupled_weight_decay", False)
            and not isinstance(group["lr"], th.Tensor)
        )
