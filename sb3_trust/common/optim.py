"""Adam for the critic's many small steps."""

from collections.abc import Iterable
from typing import Any

import torch as th
from torch.optim import optimizer as torch_optimizer


class LeanAdam(th.optim.Adam):
    """
    torch's fused Adam, with a short path to the same update: :meth:`lean_step`.

    The critic of a trust-region update takes hundreds of Adam steps per rollout on a small network. There,
    ``torch.optim.Adam.step`` spends as long in its general bookkeeping (its profiler range and step hooks, grouping
    tensors by device and dtype, scalar conversions) as in the fused update kernel itself. Once every parameter has
    its state, :meth:`lean_step` calls that same kernel directly; the update, the state layout and the state dict are
    exactly torch's fused Adam's (a state dict moves freely between the two). ``step()`` is torch's, unchanged.

    :param params: parameters to optimise
    :param kwargs: ``torch.optim.Adam``'s arguments (``fused`` defaults to True)
    """

    def __init__(self, params: Iterable[th.nn.Parameter], **kwargs: Any) -> None:
        kwargs.setdefault("fused", True)
        super().__init__(params, **kwargs)

    @th.no_grad()
    def lean_step(self) -> None:
        """
        One optimization step, the update of ``step()``.

        It goes through ``step()`` itself when that does more than the fused kernel: on the first step (which creates
        the state), with amsgrad, maximize, decoupled weight decay or a tensor learning rate, when a step hook is
        registered, or while the autograd profiler records.
        """
        if (
            not hasattr(th, "_fused_adam_")
            or self._optimizer_step_pre_hooks
            or self._optimizer_step_post_hooks
            or torch_optimizer._global_optimizer_pre_hooks
            or torch_optimizer._global_optimizer_post_hooks
            or th.autograd._profiler_enabled()
        ):
            self.step()
            return
        updates = []
        for group in self.param_groups:
            params = [param for param in group["params"] if param.grad is not None]
            states = [self.state[param] for param in params]
            if not self._is_plain(group) or any(not state for state in states):
                self.step()
                return
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

    @staticmethod
    def _is_plain(group: dict[str, Any]) -> bool:
        return (
            bool(group.get("fused"))
            and not group["amsgrad"]
            and not group["maximize"]
            and not group.get("decoupled_weight_decay", False)
            and not isinstance(group["lr"], th.Tensor)
        )
