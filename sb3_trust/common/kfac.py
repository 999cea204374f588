"""
K-FAC, Kronecker-factored approximate curvature, as a ``torch.optim.Optimizer``.

Martens & Grosse (2015) for fully connected layers, Grosse & Martens (2016, "KFC") for convolutions, and the
trust-region step of ACKTR (Wu et al., 2017). For a layer y = W x (bias as an extra input of ones) the per-sample
gradient is vec(∇W) = ȳ ⊗ x, and its Fisher block E[(ȳȳᵀ) ⊗ (xxᵀ)] is approximated by G ⊗ A with A = E[xxᵀ] and
G = E[ȳȳᵀ] (seed 002, "Calculating Natural Gradient Step with KFAC"). Row-major: ∇W has shape (out, in), so
vec_row(∇W) = ȳ ⊗ x and the block is G ⊗ A; in the column-major convention of the papers it reads A ⊗ G.

The statistics come from a separate "Fisher" backward pass (``update_statistics``) of a negative log-likelihood
of targets sampled from the model (the *sampled* Fisher). Layer inputs are captured by forward hooks and output
gradients by tensor hooks, only inside ``capture()`` and only during that pass, so the modules are not rewritten.
Parameters outside a supported layer (e.g. a Gaussian ``log_std``) get a diagonal preconditioner.
"""

import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch as th
from torch import nn
from torch.nn import functional as F
from torch.optim import Optimizer


def _supported_layer(module: nn.Module) -> bool:
    """
    :param module: a module of the model
    :return: whether K-FAC handles it as a Kronecker-factored block (Linear, or an ungrouped zero-padded Conv2d)
    """
    if isinstance(module, nn.Linear):
        return True
    return (
        isinstance(module, nn.Conv2d)
        and module.groups == 1
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
    )


class KFAC(Optimizer):
    """
    K-FAC with a trust region on the step's quadratic KL (the optimizer of ACKTR).

    Use: forward the Fisher loss's inputs inside ``with optimizer.capture():``; call
    ``optimizer.update_statistics(fisher_loss, batch_size)``; then ``loss.backward()`` and ``optimizer.step()``.

    Each step: the gradient (weight decay added, norm clipped) is preconditioned per layer, Δ = (G + √λ/π I)⁻¹ ∇W
    (A + π√λ I)⁻¹, computed in the factors' eigenbases (factored Tikhonov damping with the π-correction,
    Martens & Grosse 2015, Sec. 6.3); free parameters get Δ = ∇ / (diag F + λ). The step is scaled by
    η = min(1, sqrt(2·kl_clip / (lr² ΔᵀF̂Δ))) so that the quadratic KL ½·lr²·η²·ΔᵀF̂Δ is at most ``kl_clip``;
    then θ ← θ − lr·u with the momentum buffer u ← momentum·u + η Δ.

    ΔᵀF̂Δ is computed as Δᵀ∇: Δ = F̂⁻¹∇ exactly, for the damped block-diagonal K-FAC Fisher F̂ that is inverted,
    so Δᵀ∇ = ΔᵀF̂Δ without another product with F̂ (as in OpenAI baselines). It is ≥ 0 since F̂ is positive
    definite.

    The running factors, their eigendecompositions and the counters are optimizer state (``self.state[param]``),
    so they are in ``state_dict()`` and come back with ``load_state_dict()``.

    :param model: the module whose parameters are optimised (hooks are registered on its Linear and Conv2d layers)
    :param lr: learning rate (step length before the trust-region scale)
    :param momentum: momentum of the scaled step (0 for none)
    :param damping: λ, the Tikhonov damping of the Fisher blocks
    :param kl_clip: the bound on the step's quadratic KL estimate (trust region radius)
    :param stat_decay: decay of the running averages of the factors (debiased: the first updates average evenly)
    :param inverse_update_freq: the factors are eigendecomposed every this many steps
    :param cold_iters: the first ``cold_iters`` steps are plain SGD at lr/3 (as baselines) while statistics warm up
    :param weight_decay: L2 coefficient added to the gradient before preconditioning
    :param max_grad_norm: clip the raw gradient to this global norm (None: no clipping)
    :param eigenvalue_min: eigenvalues of the factors are clamped to at least this before damping
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 0.25,
        momentum: float = 0.9,
        damping: float = 0.01,
        kl_clip: float = 0.001,
        stat_decay: float = 0.99,
        inverse_update_freq: int = 10,
        cold_iters: int = 0,
        weight_decay: float = 0.0,
        max_grad_norm: float | None = None,
        eigenvalue_min: float = 1e-6,
    ):
        for name, value in (("lr", lr), ("damping", damping), ("kl_clip", kl_clip)):
            if not value > 0:
                raise ValueError(f"`{name}` must be positive, got {value}")
        if not 0 < stat_decay < 1:
            raise ValueError(f"`stat_decay` must lie in (0, 1), got {stat_decay}")
        if not 0 <= momentum < 1:
            raise ValueError(f"`momentum` must lie in [0, 1), got {momentum}")
        if inverse_update_freq < 1:
            raise ValueError(f"`inverse_update_freq` must be >= 1, got {inverse_update_freq}")
        if cold_iters < 0 or weight_decay < 0:
            raise ValueError("`cold_iters` and `weight_decay` must be >= 0")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"`max_grad_norm` must be positive or None, got {max_grad_norm}")
        params = [param for param in model.parameters() if param.requires_grad]
        defaults: dict[str, Any] = dict(lr=lr, momentum=momentum, damping=damping, kl_clip=kl_clip, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.stat_decay = stat_decay
        self.inverse_update_freq = inverse_update_freq
        self.cold_iters = cold_iters
        self.max_grad_norm = max_grad_norm
        self.eigenvalue_min = eigenvalue_min

        # Kronecker-factored blocks: (module, weight, bias or None); every other parameter is diagonal
        self.blocks: list[tuple[nn.Module, nn.Parameter, nn.Parameter | None]] = []
        in_block: set[int] = set()
        for module in model.modules():
            weight = getattr(module, "weight", None)
            bias = getattr(module, "bias", None)
            if not _supported_layer(module) or not isinstance(weight, nn.Parameter) or not weight.requires_grad:
                continue
            if bias is not None and not bias.requires_grad:
                continue
            self.blocks.append((module, weight, bias))
            in_block.update(id(param) for param in (weight, bias) if param is not None)
            module.register_forward_hook(self._forward_hook)
        self.diagonal_params = [param for param in params if id(param) not in in_block]
        self._capturing = False
        self._fisher_backward = False
        self._inputs: dict[nn.Module, list[th.Tensor]] = {}
        self._output_grads: dict[nn.Module, list[th.Tensor]] = {}
        # Diagnostics of the last step, for logging
        self.step_scale = 1.0
        self.kl_estimate = 0.0

    # --- statistics -------------------------------------------------------------------------------------------

    def _forward_hook(self, module: nn.Module, inputs: tuple[th.Tensor, ...], output: th.Tensor) -> None:
        if not self._capturing or not th.is_grad_enabled() or not output.requires_grad:
            return
        self._inputs.setdefault(module, []).append(inputs[0].detach())
        output.register_hook(partial(self._output_grad_hook, module))

    def _output_grad_hook(self, module: nn.Module, grad: th.Tensor) -> None:
        # Ignore the ordinary loss's backward pass: only the Fisher pass feeds G
        if self._fisher_backward:
            self._output_grads.setdefault(module, []).append(grad.detach())

    @contextmanager
    def capture(self) -> Iterator[None]:
        """
        Record the inputs of the K-FAC layers during the forward passes inside this context.
        """
        self._inputs.clear()
        self._output_grads.clear()
        self._capturing = True
        try:
            yield
        finally:
            self._capturing = False

    @staticmethod
    def _layer_rows(module: nn.Module, layer_input: th.Tensor, has_bias: bool) -> th.Tensor:
        """
        :return: the layer's inputs as rows (one per sample and output location), with a column of ones for the bias
        """
        if isinstance(module, nn.Conv2d):
            # KFC: the patches each output location sees, (N, C·kh·kw, L) -> (N·L, C·kh·kw)
            patches = F.unfold(
                layer_input,
                module.kernel_size,
                dilation=module.dilation,
                padding=module.padding,  # type: ignore[arg-type]
                stride=module.stride,
            )
            rows = patches.transpose(1, 2).reshape(-1, patches.shape[1])
        else:
            rows = layer_input.reshape(-1, layer_input.shape[-1])
        if has_bias:
            rows = th.cat([rows, th.ones_like(rows[:, :1])], dim=1)
        return rows

    @staticmethod
    def _grad_rows(module: nn.Module, grad: th.Tensor) -> th.Tensor:
        """
        :return: the output gradients as rows (one per sample and output location)
        """
        if isinstance(module, nn.Conv2d):
            return grad.permute(0, 2, 3, 1).reshape(-1, grad.shape[1])
        return grad.reshape(-1, grad.shape[-1])

    def _running_average(self, state: dict[str, Any], key: str, new: th.Tensor, count: int) -> None:
        # Debiased running average: decay min(stat_decay, 1 - 1/t), so early statistics are plain means
        decay = min(self.stat_decay, 1.0 - 1.0 / count)
        if key in state:
            state[key].mul_(decay).add_(new, alpha=1.0 - decay)
        else:
            state[key] = new.clone()

    def update_statistics(self, fisher_loss: th.Tensor, batch_size: int) -> None:
        """
        Backpropagate the Fisher loss and update the running Kronecker factors and diagonal statistics.

        ``fisher_loss`` must be a batch *mean* of per-sample negative log-likelihoods of targets sampled from the
        model, computed from a forward pass inside ``capture()``. Per-sample output gradients are then
        ``batch_size`` times the captured ones, and with rows over samples and locations:
        A = mean_rows(a aᵀ) and G = batch_size · Σ_rows g gᵀ; for a convolution this is the KFC factorisation with
        the number T of output locations carried by G (E[vec ∇W vec ∇Wᵀ] ≈ T·E[ggᵀ] ⊗ E[aaᵀ] under spatial homogeneity).
        For a free parameter, batch_size·(mean gradient)² estimates its Fisher diagonal without bias, because the
        score of sampled targets has mean zero.

        Statistics that are not finite are not recorded (with a warning). ``.grad`` is left untouched.

        :param fisher_loss: the scalar Fisher loss (its graph is retained for the ordinary loss's backward)
        :param batch_size: the number of samples the loss averages over
        """
        params = [param for group in self.param_groups for param in group["params"]]
        self._fisher_backward = True
        try:
            grads = th.autograd.grad(fisher_loss, params, retain_graph=True, allow_unused=True)
        finally:
            self._fisher_backward = False
        with th.no_grad():
            skipped = 0
            for module, weight, bias in self.blocks:
                if module not in self._inputs or module not in self._output_grads:
                    continue
                rows = th.cat([self._layer_rows(module, x, bias is not None) for x in self._inputs[module]])
                grad_rows = th.cat([self._grad_rows(module, g) for g in self._output_grads[module]])
                factor_a = rows.T @ rows / rows.shape[0]
                factor_g = batch_size * (grad_rows.T @ grad_rows)
                if not (th.isfinite(factor_a).all() and th.isfinite(factor_g).all()):
                    skipped += 1
                    continue
                state = self.state[weight]
                state["stat_updates"] = state.get("stat_updates", 0) + 1
                self._running_average(state, "A", factor_a, state["stat_updates"])
                self._running_average(state, "G", factor_g, state["stat_updates"])
            by_id = {id(param): grad for param, grad in zip(params, grads, strict=True)}
            for param in self.diagonal_params:
                grad = by_id[id(param)]
                if grad is None:
                    continue
                if not th.isfinite(grad).all():
                    skipped += 1
                    continue
                state = self.state[param]
                state["stat_updates"] = state.get("stat_updates", 0) + 1
                self._running_average(state, "diag", batch_size * grad.detach() ** 2, state["stat_updates"])
        self._inputs.clear()
        self._output_grads.clear()
        if skipped:
            warnings.warn(f"K-FAC: {skipped} non-finite statistics were not recorded", RuntimeWarning, stacklevel=2)

    def kronecker_factors(self, module: nn.Module) -> tuple[th.Tensor, th.Tensor]:
        """
        :param module: a K-FAC layer of the model
        :return: its running (A, G): the Fisher block is approximated by G ⊗ A in row-major vec order
        """
        for layer, weight, _ in self.blocks:
            if layer is module:
                return self.state[weight]["A"], self.state[weight]["G"]
        raise KeyError(f"{module} is not a K-FAC layer of this optimizer")

    # --- step -------------------------------------------------------------------------------------------------

    @staticmethod
    def _eigh(matrix: th.Tensor) -> tuple[th.Tensor, th.Tensor] | None:
        """
        Symmetric eigendecomposition, retried in float64 when the first attempt fails or is not finite.

        :return: (eigenvalues, eigenvectors) in the matrix's dtype, or None when both attempts failed
        """
        for dtype in dict.fromkeys((matrix.dtype, th.float64)):
            try:
                eigenvalues, eigenvectors = th.linalg.eigh(matrix.to(dtype))
            except RuntimeError:  # torch.linalg.LinAlgError is a RuntimeError
                continue
            if bool(th.isfinite(eigenvalues).all()) and bool(th.isfinite(eigenvectors).all()):
                return eigenvalues.to(matrix.dtype), eigenvectors.to(matrix.dtype)
        return None

    def _update_eigenbasis(self, state: dict[str, Any]) -> bool:
        """
        Eigendecompose A and G (clamped eigenvalues) and the π of the factored damping.

        :return: False when the decomposition failed or was not finite (the previous one, if any, is kept)
        """
        decomposed_a, decomposed_g = self._eigh(state["A"]), self._eigh(state["G"])
        if decomposed_a is None or decomposed_g is None:
            return False
        (eig_a, basis_a), (eig_g, basis_g) = decomposed_a, decomposed_g
        # π = sqrt((tr A / dim A) / (tr G / dim G)), Martens & Grosse (2015), Eq. 12 (traces from the clamped spectra)
        eig_a = eig_a.clamp_min(self.eigenvalue_min)
        eig_g = eig_g.clamp_min(self.eigenvalue_min)
        state.update(eig_A=eig_a, Q_A=basis_a, eig_G=eig_g, Q_G=basis_g)
        state["pi"] = math.sqrt(eig_a.mean().item() / eig_g.mean().item())
        return True

    def _gradients(self) -> dict[nn.Parameter, th.Tensor] | None:
        """
        :return: the gradients with weight decay and norm clipping applied, or None when one is not finite
        """
        grads: dict[nn.Parameter, th.Tensor] = {}
        for group in self.param_groups:
            for param in group["params"]:
                grad = th.zeros_like(param) if param.grad is None else param.grad.detach().clone()
                if group["weight_decay"]:
                    grad.add_(param.detach(), alpha=group["weight_decay"])
                grads[param] = grad
        if not all(bool(th.isfinite(grad).all()) for grad in grads.values()):
            return None
        if self.max_grad_norm is not None:
            norm = th.linalg.vector_norm(th.stack([th.linalg.vector_norm(grad) for grad in grads.values()]))
            if norm > self.max_grad_norm:
                for grad in grads.values():
                    grad.mul_(self.max_grad_norm / (norm + 1e-6))
        return grads

    def _precondition(
        self, grads: dict[nn.Parameter, th.Tensor], damping: float, refresh: bool
    ) -> dict[nn.Parameter, th.Tensor]:
        """
        Δ = F̂⁻¹ ∇ blockwise: (G + √λ/π I)⁻¹ ∇W (A + π√λ I)⁻¹ for each layer, ∇ / (diag + λ) for free parameters.

        A block without statistics or eigendecomposition gets the damped gradient ∇/λ (F̂ = λI).

        :param grads: the processed gradients
        :param damping: λ
        :param refresh: whether to recompute the eigendecompositions
        :return: Δ for each parameter
        """
        directions: dict[nn.Parameter, th.Tensor] = {}
        failed = 0
        for _, weight, bias in self.blocks:
            state = self.state[weight]
            grad_w = grads[weight].reshape(weight.shape[0], -1)
            grad = grad_w if bias is None else th.cat([grad_w, grads[bias].unsqueeze(1)], dim=1)
            if "A" in state and (refresh or "Q_A" not in state):
                failed += not self._update_eigenbasis(state)
            if "Q_A" in state:
                pi, root = state["pi"], math.sqrt(damping)
                basis_a, basis_g = state["Q_A"], state["Q_G"]
                # In the eigenbases the damped Kronecker product is diagonal: divide by (d_G + √λ/π)(d_A + π√λ)
                rotated = basis_g.T @ grad @ basis_a
                rotated = rotated / ((state["eig_G"] + root / pi).unsqueeze(1) * (state["eig_A"] + pi * root).unsqueeze(0))
                direction = basis_g @ rotated @ basis_a.T
            else:
                direction = grad / damping
            if bias is None:
                directions[weight] = direction.reshape(weight.shape)
            else:
                directions[weight] = direction[:, :-1].reshape(weight.shape)
                directions[bias] = direction[:, -1].reshape(bias.shape)
        for param in self.diagonal_params:
            state = self.state[param]
            curvature = state["diag"] if "diag" in state else th.zeros_like(param)
            directions[param] = grads[param] / (curvature + damping)
        if failed:
            warnings.warn(
                f"K-FAC: {failed} eigendecompositions failed; those layers keep their previous basis or use the damped "
                "gradient",
                RuntimeWarning,
                stacklevel=3,
            )
        return directions

    @th.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """
        One K-FAC step with the trust-region scale (see the class docstring).

        A non-finite gradient or step leaves the parameters (and the momentum) unchanged, with a warning.

        :param closure: optional closure re-evaluating the loss
        :return: the closure's loss, if any
        """
        loss = None
        if closure is not None:
            with th.enable_grad():
                loss = closure()
        group = self.param_groups[0]
        lr, damping, kl_clip, momentum = group["lr"], group["damping"], group["kl_clip"], group["momentum"]
        grads = self._gradients()
        if grads is None:
            warnings.warn("K-FAC: non-finite gradient, the step is skipped", RuntimeWarning, stacklevel=2)
            return loss
        first = self.state[group["params"][0]]
        step = first.get("step_count", 0) + 1

        if step <= self.cold_iters:
            # Cold start: plain SGD (lr/3, as baselines) while the statistics warm up
            directions, scale, lr = grads, 1.0, lr / 3.0
            self.kl_estimate = float("nan")
        else:
            refresh = (step - self.cold_iters - 1) % self.inverse_update_freq == 0
            directions = self._precondition(grads, damping, refresh)
            # ΔᵀF̂Δ = Δᵀ∇ since Δ = F̂⁻¹∇
            quadratic = sum(th.sum(directions[param] * grads[param]) for param in grads)
            assert isinstance(quadratic, th.Tensor)
            quadratic_value = quadratic.item()
            if not math.isfinite(quadratic_value) or quadratic_value < 0:
                warnings.warn("K-FAC: non-finite step, the step is skipped", RuntimeWarning, stacklevel=2)
                return loss
            # η = min(1, sqrt(2·kl_clip / (lr² ΔᵀF̂Δ))): the quadratic KL ½ lr² η² ΔᵀF̂Δ stays ≤ kl_clip (ACKTR, Sec. 3.1)
            scale = 1.0 if quadratic_value == 0 or lr <= 0 else min(1.0, math.sqrt(2.0 * kl_clip / (lr**2 * quadratic_value)))
            self.kl_estimate = 0.5 * lr**2 * scale**2 * quadratic_value
        self.step_scale = scale

        for param, direction in directions.items():
            state = self.state[param]
            if momentum > 0:
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = th.zeros_like(param)
                buffer = state["momentum_buffer"]
                buffer.mul_(momentum).add_(direction, alpha=scale)
                param.add_(buffer, alpha=-lr)
            else:
                param.add_(direction, alpha=-lr * scale)
        first["step_count"] = step
        return loss
