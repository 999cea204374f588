"""Adam for the critic's many small steps."""

import inspect
from collections.abc import Iterable
from typing import Any

import torch as th
from torch.optim import optimizer as torch_optimizer

# torch.optim.Adam.step without the wrappers torch adds (its profiler hook): a step override is anything else
_ADAM_STEP = inspect.unwrap(th.optim.Adam.step)


def _torch_says_step_must_run(optimizer: th.optim.Optimizer) -> bool:
    """
    :param optimizer: an optimizer
    :return: whether its ``step()`` has work around the update: a registered step hook (its own or a global one)
        or a recording autograd profiler (torch's private names, read defensively: unknown means yes)
    """
    hook_registries = (
        getattr(optimizer, "_optimizer_step_pre_hooks", None),
        getattr(optimizer, "_optimizer_step_post_hooks", None),
        getattr(torch_optimizer, "_global_optimizer_pre_hooks", None),
        getattr(torch_optimizer, "_global_optimizer_post_hooks", None),
    )
    profiler_enabled = getattr(th.autograd, "_profiler_enabled", None)
    return (
        any(registry is None or len(registry) > 0 for registry in hook_registries)
        or profiler_enabled is None
        or bool(profiler_enabled())
    )


class LeanAdam(th.optim.Adam):
    """
    torch's fused Adam, with a short path to the same update: :meth:`lean_step`.

    The critic of a trust-region update takes hundreds of Adam steps per rollout on a small network. There,
    ``torch.optim.Adam.step`` spends as long in its general bookkeeping (its profiler range and step hooks, grouping
    tensors by device and dtype, scalar conversions) as in the fused update kernel itself. Once every parameter with
    a gradient has its state, :meth:`lean_step` calls that same kernel directly; the update, the state layout and the
    state dict are exactly torch's fused Adam's (a state dict moves freely between the two). ``step()`` is torch's,
    unchanged; the critic regression of NPG and TRPO calls ``lean_step()``.

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

        It calls ``step()`` itself whenever that would do more than the one fused kernel call: on the first step
        (which creates the state); with amsgrad, maximize, decoupled weight decay, a tensor learning rate, or
        ``fused=False``; for a group whose parameters differ in device or dtype; when a step hook is registered or the
        autograd profiler records; when ``step`` is overridden (by a subclass or on this instance); and when this
        torch has no fused Adam kernel.
        """
        if (
            not hasattr(th, "_fused_adam_")
            or "step" in vars(self)
            or inspect.unwrap(type(self).step) is not _ADAM_STEP
            or _torch_says_step_must_run(self)
        ):
            self.step()
            return
        updates = []
        for group in self.param_groups:
            params = [param for param in group["params"] if param.grad is not None]
            states = [self.state[param] for param in params]
            if not self._is_plain(group) or any(not state for state in states) or not _one_device_and_dtype(params):
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


def _one_device_and_dtype(params: list[th.Tensor]) -> bool:
    # torch's step() splits a group by device and dtype before calling the kernel; the short path makes one call
    return len({(param.device, param.dtype) for param in params}) <= 1
