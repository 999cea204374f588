"""
K-FAC, Kronecker-factored approximate curvature, as a ``torch.optim.Optimizer``.

Martens & Grosse (2015) for fully connected layers, Grosse & Martens (2016, "KFC") for convolutions, and the
trust-region step of ACKTR (Wu et al., 2017). For a layer y = W x (bias as an extra input of ones) the per-sample
gradient is vec(∇W) = ȳ ⊗ x, and its Fisher block E[(ȳȳᵀ) ⊗ (xxᵀ)] is approximated by G ⊗ A with A = E[xxᵀ] and
G = E[ȳȳᵀ] (seed 002, "Calculating Natural Gradient Step with KFAC"). Row-major: ∇W has shape (out, in), so
vec_row(∇W) = ȳ ⊗ x and the block is G ⊗ A; in the column-major convention of the papers it reads A ⊗ G.

The statistics come from the backward pass of a negative log-likelihood of targets sampled from the model (the
*sampled* Fisher). Forward hooks record the inputs and outputs of the K-FAC layers, only inside ``capture()``, so
the modules are not rewritten; the output gradients ȳ are asked of autograd directly. Parameters outside a
supported layer (e.g. a Gaussian ``log_std``) get a diagonal preconditioner, and so do the weights of a layer that
another module shares (tied weights) or that the loss also uses outside the layer's own calls (e.g. the ``out_proj``
of ``nn.MultiheadAttention``, found at its first ``backward()`` with a finite loss): the statistics of a layer's
calls would not describe their gradient.
"""

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch as th
from torch import nn
from torch.nn import functional as F
from torch.optim import Optimizer

from sb3_trust.common.checks import (
    check_integer,
    check_momentum,
    check_non_negative,
    check_open_unit_interval,
    check_positive,
    check_positive_or_infinite,
)


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


# Optimizer state that is derived from the rest and rebuilt on demand, so not saved
_REBUILT_STATE = ("inverse_A", "inverse_G", "inverse_damping")


class KFAC(Optimizer):
    """
    K-FAC with a trust region on the step's quadratic KL (the optimizer of ACKTR).

    Use: run the forward pass inside ``with optimizer.capture():``, then ``optimizer.backward(loss, fisher_loss,
    batch_size)`` (instead of ``loss.backward()``: it fills ``.grad`` and the statistics, see there), then
    ``optimizer.step()``.

    Each step: the gradient (weight decay added, norm clipped) is preconditioned per layer,
    Δ = (G + √λ/π I)⁻¹ ∇W (A + π√λ I)⁻¹ (factored Tikhonov damping with the π-correction, Martens & Grosse 2015,
    Sec. 6.3; the two damped inverses are built from the factors' eigendecompositions and kept between them); free
    parameters get Δ = ∇ / (diag F + λ). The step is scaled by ν = min(1, sqrt(2·kl_clip / (lr² ΔᵀF̂Δ))) so that the
    quadratic KL ½·lr²·ν²·ΔᵀF̂Δ is at most ``kl_clip``; then θ ← θ − lr·(1 − momentum)·u with the momentum buffer
    u ← momentum·u + ν Δ. The factor (1 − momentum), as in OpenAI baselines and its PyTorch port, makes the
    steady-state step (u → νΔ / (1 − momentum) for a constant νΔ) the trust-region step itself; without it, a
    momentum of 0.9 takes steps up to 10× the bounded one.

    ΔᵀF̂Δ is computed as Δᵀ∇: Δ = F̂⁻¹∇ exactly, for the damped block-diagonal K-FAC Fisher F̂ that is inverted,
    so Δᵀ∇ = ΔᵀF̂Δ without another product with F̂ (as in OpenAI baselines). It is ≥ 0 since F̂ is positive
    definite.

    The running factors, their eigendecompositions and the counters are optimizer state (``self.state[param]``),
    so they are in ``state_dict()`` and come back with ``load_state_dict()``.

    :param model: the module whose parameters are optimised (hooks are registered on its Linear and Conv2d layers)
    :param lr: learning rate (step length before the trust-region scale); 0 leaves the parameters where they are
    :param momentum: momentum of the scaled step (0 for none)
    :param damping: λ, the Tikhonov damping of the Fisher blocks
    :param kl_clip: the bound on the step's quadratic KL estimate (trust region radius)
    :param stat_decay: decay of the running averages of the factors (debiased: the first updates average evenly)
    :param inverse_update_freq: the factors are eigendecomposed every this many steps
    :param cold_iters: the first ``cold_iters`` steps skip the preconditioner and the trust region while the
        statistics warm up: the gradient (through the same momentum) at lr/3
    :param weight_decay: L2 coefficient added to the gradient before preconditioning
    :param max_grad_norm: clip the gradient (weight decay included) to this global norm (None: no clipping)
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
        # lr = 0 is allowed: rl-zoo3's enjoy loads models with learning_rate=0
        check_non_negative(lr=lr, weight_decay=weight_decay)
        check_positive(damping=damping, kl_clip=kl_clip, eigenvalue_min=eigenvalue_min)
        check_open_unit_interval(stat_decay=stat_decay)
        check_momentum(momentum=momentum)
        check_integer(1, inverse_update_freq=inverse_update_freq)
        check_integer(0, cold_iters=cold_iters)
        if max_grad_norm is not None:
            check_positive_or_infinite(max_grad_norm=max_grad_norm)
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
        owners: dict[int, int] = {}
        for module in model.modules():
            for param in module.parameters(recurse=False):
                owners[id(param)] = owners.get(id(param), 0) + 1
        for module in model.modules():
            weight = getattr(module, "weight", None)
            bias = getattr(module, "bias", None)
            if not _supported_layer(module) or not isinstance(weight, nn.Parameter) or not weight.requires_grad:
                continue
            if bias is not None and not (isinstance(bias, nn.Parameter) and bias.requires_grad):
                continue
            if any(owners[id(param)] > 1 for param in (weight, bias) if param is not None):
                continue  # tied to another module: a gradient from elsewhere that this layer's statistics do not see
            self.blocks.append((module, weight, bias))
            module.register_forward_hook(self._forward_hook)
        self._capturing = False
        # The layers whose weights were checked for uses outside their calls (``_demote_blocks_with_other_uses``)
        self._checked_layers: set[nn.Module] = set()
        # (input, output, their versions) of each K-FAC layer call in the captured forward pass
        self._calls: dict[nn.Module, list[tuple[th.Tensor, th.Tensor, tuple[int, int]]]] = {}
        # Diagnostics of the last step, for logging
        self.step_scale = 1.0
        self.kl_estimate = 0.0

    # --- statistics -------------------------------------------------------------------------------------------

    def _forward_hook(self, module: nn.Module, inputs: tuple[th.Tensor, ...], output: th.Tensor) -> None:
        """
        Record a K-FAC layer's input and output during ``capture()``.

        :param module: the layer
        :param inputs: its positional inputs
        :param output: its output
        """
        if self._capturing and th.is_grad_enabled() and output.requires_grad:
            # The versions tell whether an in-place operation later overwrote what K-FAC reads in backward()
            self._calls.setdefault(module, []).append((inputs[0].detach(), output, (inputs[0]._version, output._version)))

    @contextmanager
    def capture(self) -> Iterator[None]:
        """
        Record the inputs and outputs of the K-FAC layers during the forward passes inside this context.
        """
        self._calls.clear()
        self._capturing = True
        try:
            yield
        finally:
            self._capturing = False

    @staticmethod
    def _layer_rows(module: nn.Module, layer_input: th.Tensor, has_bias: bool) -> th.Tensor:
        """
        :param module: a Linear or Conv2d layer
        :param layer_input: its captured input
        :param has_bias: whether to append the bias's column of ones
        :return: the layer's inputs as rows (one per sample and output location), with a column of ones for the bias
        """
        if isinstance(module, nn.Conv2d) and module.dilation == (1, 1):
            # KFC: the patches each output location sees, one row each, (N·L, C·kh·kw) in F.unfold's column order.
            # Taken as a strided view and copied once, straight into the rows with their bias column: F.unfold on a
            # contiguous batch is several times slower on CPU (2.5 s against 0.1 s per NatureCNN layer on an Atari
            # rollout of 320 frames), and a second copy to append the column costs as much as the first
            (kernel_h, kernel_w), (stride_h, stride_w) = module.kernel_size, module.stride
            padded = F.pad(layer_input, module._reversed_padding_repeated_twice)
            patches = padded.unfold(2, kernel_h, stride_h).unfold(3, kernel_w, stride_w)  # (N, C, Lh, Lw, kh, kw)
            patches = patches.permute(0, 2, 3, 1, 4, 5)  # (N, Lh, Lw, C, kh, kw)
            width = module.in_channels * kernel_h * kernel_w
            rows = layer_input.new_empty(patches.shape[:3].numel(), width + int(has_bias))
            rows[:, :width].unflatten(0, patches.shape[:3]).unflatten(-1, patches.shape[3:]).copy_(patches)
            if has_bias:
                rows[:, width] = 1.0
            return rows
        elif isinstance(module, nn.Conv2d):
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
        return F.pad(rows, (0, 1), value=1.0) if has_bias else rows

    @staticmethod
    def _grad_rows(module: nn.Module, grad: th.Tensor) -> th.Tensor:
        """
        :param module: a Linear or Conv2d layer
        :param grad: the gradient with respect to its output
        :return: the output gradients as rows (one per sample and output location)
        """
        if isinstance(module, nn.Conv2d):
            return grad.permute(0, 2, 3, 1).reshape(-1, grad.shape[1])
        return grad.reshape(-1, grad.shape[-1])

    def _captured_rows(self, index: list[tuple[int, nn.Module, int]]) -> list[th.Tensor]:
        """
        :param index: the captured layer calls (``_captured_outputs``)
        :return: each call's input rows (``_layer_rows``), built once for both the gradient and the statistics
        """
        with th.no_grad():
            return [
                self._layer_rows(module, self._calls[module][call][0], self.blocks[block][2] is not None)
                for block, module, call in index
            ]

    def _block_gradients(
        self, index: list[tuple[int, nn.Module, int]], layer_rows: list[th.Tensor], output_grads: Sequence[th.Tensor | None]
    ) -> dict[int, th.Tensor]:
        """
        :param index: the captured layer calls (``_captured_outputs``)
        :param layer_rows: their input rows (``_captured_rows``)
        :param output_grads: a loss's gradients with respect to their outputs ȳ, in the same order
        :return: for each block reached, its gradient ȳᵀx summed over its calls, as one (out, in [+ 1]) matrix
        """
        block_grads: dict[int, th.Tensor] = {}
        for (block, module, _), inputs, output_grad in zip(index, layer_rows, output_grads, strict=True):
            if output_grad is not None:
                weight_grad = self._grad_rows(module, output_grad).T @ inputs
                block_grads[block] = block_grads[block] + weight_grad if block in block_grads else weight_grad
        return block_grads

    def _demote_blocks_with_other_uses(self, loss: th.Tensor, blocks: list[int]) -> None:
        """
        Once per layer, at its first ``backward()`` with a finite loss: compare each block's gradient from its
        captured calls with autograd's, and make diagonal (with a warning) the blocks whose weights the loss also
        reaches another way, used without calling their layer (``nn.MultiheadAttention`` applies its ``out_proj``
        weight functionally) or besides it. The statistics of the layer's calls would not describe their gradient.

        :param loss: the loss of the captured forward pass
        :param blocks: the indices of the blocks to check (trainable, not checked before)
        """
        if not bool(th.isfinite(loss)):
            return  # a NaN gradient compares as equal to anything: check at the next finite loss
        self._checked_layers.update(self.blocks[block][0] for block in blocks)
        params = [param for block in blocks for param in self.blocks[block][1:] if param is not None]
        reference = iter(th.autograd.grad(loss, params, retain_graph=True, allow_unused=True, materialize_grads=True))
        index, outputs = self._captured_outputs(blocks)
        output_grads = th.autograd.grad(loss, outputs, retain_graph=True, allow_unused=True) if outputs else ()
        with th.no_grad():
            reconstructed = self._block_gradients(index, self._captured_rows(index), output_grads)
            demoted = []
            for block in blocks:
                module, weight, bias = self.blocks[block]
                expected = next(reference).reshape(weight.shape[0], -1)
                if bias is not None:
                    expected = th.cat([expected, next(reference).unsqueeze(1)], dim=1)
                found = reconstructed.get(block, th.zeros_like(expected))
                if (found - expected).norm() > 1e-3 * expected.norm() + 1e-12:
                    demoted.append(module)
        if not demoted:
            return
        warnings.warn(
            f"K-FAC: the weights of {[type(module).__name__ for module in demoted]} are also used outside their layer's "
            "call; they get a diagonal preconditioner",
            RuntimeWarning,
            stacklevel=3,
        )
        self.blocks = [block for block in self.blocks if all(block[0] is not module for module in demoted)]

    @property
    def diagonal_params(self) -> list[nn.Parameter]:
        """
        :return: the trainable parameters that get a diagonal preconditioner (outside every Kronecker-factored block
            they train), in the parameter group's order
        """
        return self._partition(lambda param: param.requires_grad)[1]

    def _partition(self, is_live: Callable[[nn.Parameter], bool]) -> tuple[list[int], list[nn.Parameter]]:
        """
        The parameters an update trains, as Kronecker-factored blocks and diagonal parameters. Freezing a parameter
        after K-FAC was built (``requires_grad_(False)``) takes it out; the rest of its layer, if any, is then
        preconditioned by its diagonal.

        :param is_live: whether a parameter takes part in this update
        :return: the indices of the blocks all of whose parameters do, and the other parameters that do, in the
            parameter group's order
        """
        blocks: list[int] = []
        in_blocks: set[int] = set()
        for block, (_, weight, bias) in enumerate(self.blocks):
            if is_live(weight) and (bias is None or is_live(bias)):
                blocks.append(block)
                in_blocks.update(id(param) for param in (weight, bias) if param is not None)
        diagonal = [param for param in self.param_groups[0]["params"] if id(param) not in in_blocks and is_live(param)]
        return blocks, diagonal

    def _captured_outputs(self, blocks: list[int]) -> tuple[list[tuple[int, nn.Module, int]], list[th.Tensor]]:
        """
        :param blocks: the indices of the blocks to index
        :return: an index (block, module, call) of their captured layer calls, and their outputs in the same order
        """
        index, outputs = [], []
        for block in blocks:
            module = self.blocks[block][0]
            for call, (layer_input, output, versions) in enumerate(self._calls.get(module, [])):
                if (layer_input._version, output._version) != versions:
                    raise RuntimeError(
                        f"K-FAC: the input or output of {module} was modified in place after the forward pass (an "
                        "in-place activation such as nn.ReLU(inplace=True)?): its gradient and statistics would be "
                        "wrong; use out-of-place operations around K-FAC layers"
                    )
                index.append((block, module, call))
                outputs.append(output)
        return index, outputs

    def backward(self, loss: th.Tensor, fisher_loss: th.Tensor, batch_size: int) -> None:
        """
        Accumulate ∇loss into ``.grad`` and update the statistics from the Fisher loss (use instead of ``loss.backward()``).

        Both losses are functions of the forward pass captured inside ``capture()``, on ``batch_size`` rows;
        ``fisher_loss`` is a *mean* of negative log-likelihoods of targets sampled from the model. Each loss is
        backpropagated only down to the layers' outputs ȳ: a layer's gradient is then ȳᵀ·x (one matrix product)
        and its factors come from x and the Fisher loss's ȳ, so the Fisher pass costs no weight gradients.

        :param loss: the scalar loss to minimise
        :param fisher_loss: the scalar Fisher loss
        :param batch_size: the number of samples (rows) of the forward pass
        """
        blocks, free = self._partition(lambda param: param.requires_grad)
        if blocks and not self._captured_outputs(blocks)[0]:
            # (Checked before the first update's demotion, which would take every uncaptured layer for a shared one)
            raise ValueError("K-FAC.backward: no call of a K-FAC layer was captured: run the forward pass inside capture()")
        unchecked = [block for block in blocks if self.blocks[block][0] not in self._checked_layers]
        if unchecked:
            self._demote_blocks_with_other_uses(loss, unchecked)
            blocks, free = self._partition(lambda param: param.requires_grad)
        index, outputs = self._captured_outputs(blocks)
        # A layer may see several rows per sample (output locations, a sequence, set elements): the statistics
        # treat them as rows of the sample, but the count must be whole for `batch_size` to be the samples'
        for _, module, call in index:
            layer_input = self._calls[module][call][0]
            row_count = layer_input.shape[0] if isinstance(module, nn.Conv2d) else layer_input.numel() // layer_input.shape[-1]
            if row_count % batch_size:
                raise ValueError(
                    f"K-FAC.backward: {module} saw {layer_input.shape[0]} inputs of shape {tuple(layer_input.shape[1:])}, "
                    f"not a whole number of rows for each of the batch's {batch_size} samples"
                )
        if not outputs and not free:
            return  # nothing trainable (every layer frozen): nothing to accumulate
        loss_grads = th.autograd.grad(loss, [*outputs, *free], retain_graph=True, allow_unused=True)
        fisher_grads = th.autograd.grad(fisher_loss, [*outputs, *free], allow_unused=True)
        rows: dict[int, tuple[list[th.Tensor], list[th.Tensor]]] = {}
        layer_rows = self._captured_rows(index)
        with th.no_grad():
            block_grads = self._block_gradients(index, layer_rows, loss_grads[: len(outputs)])
            for (block, module, _), inputs, fisher_grad in zip(index, layer_rows, fisher_grads[: len(outputs)], strict=True):
                if fisher_grad is not None:
                    block_inputs, block_output_grads = rows.setdefault(block, ([], []))
                    block_inputs.append(inputs)
                    block_output_grads.append(self._grad_rows(module, fisher_grad))
            for block, block_grad in block_grads.items():
                _, weight, bias = self.blocks[block]
                if bias is None:
                    self._accumulate_grad(weight, block_grad.reshape(weight.shape))
                else:
                    self._accumulate_grad(weight, block_grad[:, :-1].reshape(weight.shape))
                    self._accumulate_grad(bias, block_grad[:, -1])
            for param, grad in zip(free, loss_grads[len(outputs) :], strict=True):
                if grad is not None:
                    self._accumulate_grad(param, grad)
            self._record(rows, free, list(fisher_grads[len(outputs) :]), batch_size)
        self._calls.clear()

    @staticmethod
    def _accumulate_grad(param: nn.Parameter, grad: th.Tensor) -> None:
        if param.grad is None:
            param.grad = grad.contiguous()
        else:
            param.grad.add_(grad)

    @th.no_grad()
    def _record(
        self,
        rows: dict[int, tuple[list[th.Tensor], list[th.Tensor]]],
        free: list[nn.Parameter],
        free_grads: list[th.Tensor | None],
        batch_size: int,
    ) -> None:
        """
        Update the running factors from the layers' input rows and Fisher output-gradient rows, and the free
        parameters' Fisher diagonals from their Fisher-loss gradients.

        Per-sample output gradients are ``batch_size`` times the captured ones (the Fisher loss is a batch mean),
        and with rows over samples and locations: A = mean_rows(a aᵀ) and G = batch_size · Σ_rows g gᵀ; for a
        convolution this is the KFC factorisation with the number T of output locations carried by G
        (E[vec ∇W vec ∇Wᵀ] ≈ T·E[ggᵀ] ⊗ E[aaᵀ] under spatial homogeneity). For a free parameter,
        batch_size·(mean gradient)² estimates its Fisher diagonal without bias, because the score of sampled
        targets has mean zero (and the samples are independent: ``sample_independently``). Statistics that are not
        finite are not recorded (with a warning).

        :param rows: for each block, its layer-input rows and Fisher output-gradient rows (one list entry per call)
        :param free: the parameters with a diagonal preconditioner in this update
        :param free_grads: their Fisher loss's gradients (None where unused)
        :param batch_size: the number of samples of the forward pass
        """
        updates: list[tuple[nn.Parameter, str, th.Tensor]] = []
        for block, (inputs, output_grads) in rows.items():
            layer_rows = inputs[0] if len(inputs) == 1 else th.cat(inputs)
            grad_rows = output_grads[0] if len(output_grads) == 1 else th.cat(output_grads)
            weight = self.blocks[block][1]
            updates.append((weight, "A", layer_rows.T @ layer_rows / layer_rows.shape[0]))
            updates.append((weight, "G", batch_size * (grad_rows.T @ grad_rows)))
        for param, grad in zip(free, free_grads, strict=True):
            if grad is not None:
                updates.append((param, "diag", batch_size * grad.detach() ** 2))
        if not updates:
            return
        # One finiteness check for all statistics; only when it fails, find the culprits
        if not bool(th.isfinite(th.stack(th._foreach_norm([new for _, _, new in updates]))).all()):
            bad = {id(param) for param, _, new in updates if not bool(th.isfinite(new).all())}
            warnings.warn(f"K-FAC: {len(bad)} non-finite statistics were not recorded", RuntimeWarning, stacklevel=3)
            updates = [update for update in updates if id(update[0]) not in bad]
        counted: set[int] = set()
        for param, key, new in updates:
            state = self.state[param]
            if id(param) not in counted:
                counted.add(id(param))
                state["stat_updates"] = state.get("stat_updates", 0) + 1
            # Debiased running average: decay min(stat_decay, 1 - 1/t), so early statistics are plain means
            if key in state:
                state[key].lerp_(new, 1.0 - min(self.stat_decay, 1.0 - 1.0 / state["stat_updates"]))
            else:
                state[key] = new

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

        :param matrix: a symmetric matrix
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

        :param state: a block's optimizer state (its weight's), holding the running factors A and G
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
        state.pop("inverse_A", None)
        return True

    def state_dict(self) -> dict[str, Any]:
        """
        The optimizer state without the damped inverses, which ``_damped_inverses`` rebuilds from the
        eigendecompositions when they are missing: they would be a third of a checkpoint's K-FAC state.

        :return: the state to save
        """
        state_dict = super().state_dict()
        state_dict["state"] = {
            index: {key: value for key, value in entries.items() if key not in _REBUILT_STATE}
            for index, entries in state_dict["state"].items()
        }
        return state_dict

    @staticmethod
    def _damped_inverses(state: dict[str, Any], damping: float) -> tuple[th.Tensor, th.Tensor]:
        """
        :param state: a block's optimizer state, with its eigendecompositions
        :param damping: λ
        :return: (A + π√λ I)⁻¹ and (G + √λ/π I)⁻¹, built from the eigendecompositions and kept until they or λ change
        """
        if state.get("inverse_damping") != damping or "inverse_A" not in state:
            pi, root = state["pi"], math.sqrt(damping)
            basis_a, basis_g = state["Q_A"], state["Q_G"]
            state["inverse_A"] = (basis_a / (state["eig_A"] + pi * root)) @ basis_a.T
            state["inverse_G"] = (basis_g / (state["eig_G"] + root / pi)) @ basis_g.T
            state["inverse_damping"] = damping
        return state["inverse_A"], state["inverse_G"]

    def _precondition(
        self, params: list[th.Tensor], grads: list[th.Tensor], damping: float, refresh: bool
    ) -> tuple[list[th.Tensor], list[th.Tensor]]:
        """
        Δ = F̂⁻¹ ∇ blockwise: (G + √λ/π I)⁻¹ ∇W (A + π√λ I)⁻¹ for each layer, ∇ / (diag + λ) for free parameters.

        A block without statistics or eigendecomposition gets the damped gradient ∇/λ (F̂ = λI).

        :param params: the parameters with a gradient, in the order of the parameter group
        :param grads: their gradients
        :param damping: λ
        :param refresh: whether to recompute the eigendecompositions
        :return: Δ for each parameter, in the same order, and the terms of ∇ᵀΔ (one per block or free parameter)
        """
        by_param = {param: grad for param, grad in zip(params, grads, strict=True)}
        blocks, free = self._partition(lambda param: param in by_param)
        quadratic_terms = []
        failed = 0
        for block in blocks:
            _, weight, bias = self.blocks[block]
            state = self.state[weight]
            grad_w = by_param[weight].reshape(weight.shape[0], -1)
            grad = grad_w if bias is None else th.cat([grad_w, by_param[bias].unsqueeze(1)], dim=1)
            if "A" in state and (refresh or "Q_A" not in state):
                failed += not self._update_eigenbasis(state)
            if "Q_A" in state:
                # The inverse of the damped Kronecker product is the Kronecker product of the damped inverses
                inverse_a, inverse_g = self._damped_inverses(state, damping)
                direction = inverse_g @ grad @ inverse_a
            else:
                direction = grad / damping
            quadratic_terms.append(th.vdot(direction.flatten(), grad.flatten()))
            if bias is None:
                by_param[weight] = direction.reshape(weight.shape)
            else:
                by_param[weight] = direction[:, :-1].reshape(weight.shape)
                by_param[bias] = direction[:, -1]
        for param in free:
            state = self.state[param]
            grad = by_param[param]
            by_param[param] = grad / (state["diag"] + damping) if "diag" in state else grad / damping
            quadratic_terms.append(th.vdot(by_param[param].flatten(), grad.flatten()))
        if failed:
            warnings.warn(
                f"K-FAC: {failed} eigendecompositions failed; those layers keep their previous basis or use the damped "
                "gradient",
                RuntimeWarning,
                stacklevel=3,
            )
        return list(by_param.values()), quadratic_terms

    @th.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """
        One K-FAC step with the trust-region scale (see the class docstring).

        A non-finite gradient or step leaves the parameters (and the momentum) unchanged, with a warning. As in
        torch's optimizers, a parameter without a gradient (frozen, or not reached by the loss) is left as it is.

        :param closure: optional closure re-evaluating the loss
        :return: the closure's loss, if any
        """
        loss = None
        if closure is not None:
            with th.enable_grad():
                loss = closure()
        group = self.param_groups[0]
        params: list[th.Tensor] = [param for param in group["params"] if param.grad is not None]
        grads = [param.grad for param in params if param.grad is not None]
        if not params:
            return loss
        lr, damping, kl_clip, momentum = group["lr"], group["damping"], group["kl_clip"], group["momentum"]
        if group["weight_decay"]:
            grads = list(th._foreach_add(grads, params, alpha=group["weight_decay"]))
        grad_norm = th.linalg.vector_norm(th.stack(th._foreach_norm(grads))).item()
        # A skipped step has no diagnostics (rather than the previous step's)
        self.step_scale = self.kl_estimate = float("nan")
        if not math.isfinite(grad_norm) or not math.isfinite(lr):
            warnings.warn("K-FAC: non-finite gradient or learning rate, the step is skipped", RuntimeWarning, stacklevel=2)
            return loss
        # Clipping multiplies the gradient, hence Δ, by a constant: it is applied to the scale, not to the tensors
        clip = 1.0 if self.max_grad_norm is None else min(1.0, self.max_grad_norm / (grad_norm + 1e-6))
        first = self.state[group["params"][0]]
        step = first.get("step_count", 0) + 1

        if step <= self.cold_iters:
            # Cold start: the gradient itself at lr/3 while the statistics warm up
            directions, scale, lr = grads, clip, lr / 3.0
            self.step_scale = 1.0
        else:
            refresh = (step - self.cold_iters - 1) % self.inverse_update_freq == 0
            directions, quadratic_terms = self._precondition(params, grads, damping, refresh)
            # ΔᵀF̂Δ = Δᵀ∇ since Δ = F̂⁻¹∇ (with the clipped gradient c·∇, the quadratic is c²·Δᵀ∇)
            quadratic = clip**2 * th.stack(quadratic_terms).sum().item()
            if not math.isfinite(quadratic) or quadratic < 0:
                warnings.warn("K-FAC: non-finite step, the step is skipped", RuntimeWarning, stacklevel=2)
                return loss
            # ν = min(1, sqrt(2·kl_clip / (lr² ΔᵀF̂Δ))): the quadratic KL ½ lr² ν² ΔᵀF̂Δ stays ≤ kl_clip (ACKTR, Sec. 3.1)
            trust = 1.0 if quadratic == 0 or lr <= 0 else min(1.0, math.sqrt(2.0 * kl_clip / (lr**2 * quadratic)))
            self.step_scale = trust
            self.kl_estimate = 0.5 * lr**2 * trust**2 * quadratic
            scale = clip * trust

        if momentum > 0:
            buffers = []
            for param in params:
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = th.zeros_like(param)
                buffers.append(state["momentum_buffer"])
            th._foreach_mul_(buffers, momentum)
            th._foreach_add_(buffers, directions, alpha=scale)
            th._foreach_add_(params, buffers, alpha=-lr * (1.0 - momentum))
        else:
            th._foreach_add_(params, directions, alpha=-lr * scale)
        first["step_count"] = step
        return loss
