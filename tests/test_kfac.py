"""K-FAC: the Kronecker factors against exact Fisher blocks, the preconditioned step, the trust region, failures."""

import copy
import math

import pytest
import torch as th
from torch import nn
from torch.nn import functional as F

from sb3_trust.common.kfac import KFAC


def _categorical_fisher_pass(
    optimizer: KFAC, model: nn.Module, inputs: th.Tensor, generator: th.Generator
) -> tuple[th.Tensor, th.Tensor]:
    """
    One K-FAC backward pass (sampled-Fisher statistics for a categorical output, gradient of a squared loss).

    :return: the sampled actions and the per-sample score gradients with respect to the logits (softmax - onehot)
    """
    with optimizer.capture():
        logits = model(inputs)
    probs = th.softmax(logits.detach(), dim=-1)
    actions = th.multinomial(probs, 1, generator=generator).squeeze(-1)
    fisher_loss = -th.log_softmax(logits, dim=-1).gather(1, actions.unsqueeze(1)).mean()
    optimizer.zero_grad()
    optimizer.backward((logits**2).mean(), fisher_loss, batch_size=len(inputs))
    return actions, probs - nn.functional.one_hot(actions, probs.shape[1]).to(probs.dtype)


def _with_ones(inputs: th.Tensor) -> th.Tensor:
    return th.cat([inputs, th.ones_like(inputs[:, :1])], dim=1)


def _exact_blocks(layer: nn.Linear, support: th.Tensor) -> tuple[th.Tensor, th.Tensor]:
    """
    Exact Fisher block of [W, b] (row-major vec) and its exact K-FAC approximation for x uniform on ``support``.

    The per-sample score is (p - e_a) ⊗ x̄ and E_a[(p - e_a)(p - e_a)ᵀ] = diag(p) - ppᵀ.
    """
    with th.no_grad():
        probs = th.softmax(layer(support), dim=-1)
    covariances = th.stack([th.diag(p) - th.outer(p, p) for p in probs])
    inputs = _with_ones(support)
    outer_inputs = th.einsum("ni,nj->nij", inputs, inputs)
    exact = th.stack([th.kron(cov, xx) for cov, xx in zip(covariances, outer_inputs, strict=True)]).mean(0)
    return exact, th.kron(covariances.mean(0), outer_inputs.mean(0))


def _make_linear(weight_scale: float) -> nn.Linear:
    th.manual_seed(0)
    layer = nn.Linear(3, 3).double()
    with th.no_grad():
        layer.weight.mul_(weight_scale)
        layer.bias.copy_(th.tensor([0.5, -0.3, 0.1], dtype=th.float64))
    return layer


SUPPORT = th.tensor([[1.0, 0.0, -1.0], [0.5, 1.0, 0.0], [-1.0, 0.5, 0.5], [0.0, -1.0, 1.0]], dtype=th.float64)


def test_factors_are_the_sampled_statistics() -> None:
    layer = _make_linear(1.0)
    optimizer = KFAC(layer)
    generator = th.Generator().manual_seed(0)
    inputs = th.randn(50, 3, dtype=th.float64, generator=generator)
    _, scores = _categorical_fisher_pass(optimizer, layer, inputs, generator)
    factor_a, factor_g = optimizer.kronecker_factors(layer)
    # A = E[x̄x̄ᵀ], G = E[ggᵀ] with g the per-sample score gradient (not the batch-mean one)
    assert th.allclose(factor_a, _with_ones(inputs).T @ _with_ones(inputs) / 50)
    assert th.allclose(factor_g, scores.T @ scores / 50)


def test_kronecker_block_equals_fisher_block_when_inputs_and_gradients_are_independent() -> None:
    # W = 0: the output distribution, hence the score g, does not depend on x
    layer = _make_linear(0.0)
    exact, kronecker = _exact_blocks(layer, SUPPORT)
    assert th.allclose(exact, kronecker, atol=1e-12)

    optimizer = KFAC(layer, stat_decay=0.5)
    generator = th.Generator().manual_seed(1)
    inputs = SUPPORT[th.randint(len(SUPPORT), (40_000,), generator=generator)]
    _, scores = _categorical_fisher_pass(optimizer, layer, inputs, generator)
    factor_a, factor_g = optimizer.kronecker_factors(layer)
    estimate = th.kron(factor_g, factor_a)
    # Dense Fisher from the per-sample gradients vec_row(g x̄ᵀ) = g ⊗ x̄ of the same samples
    per_sample = th.einsum("ni,nj->nij", scores, _with_ones(inputs)).reshape(len(inputs), -1)
    dense = per_sample.T @ per_sample / len(inputs)
    assert th.allclose(estimate, dense, atol=0.02)
    assert th.allclose(estimate, exact, atol=0.02)


def test_kronecker_gap_when_inputs_and_gradients_are_dependent() -> None:
    layer = _make_linear(3.0)
    exact, kronecker = _exact_blocks(layer, SUPPORT)
    gap = (th.linalg.matrix_norm(exact - kronecker) / th.linalg.matrix_norm(exact)).item()
    assert 0.05 < gap < 1.0

    optimizer = KFAC(layer)
    generator = th.Generator().manual_seed(2)
    inputs = SUPPORT[th.randint(len(SUPPORT), (40_000,), generator=generator)]
    _categorical_fisher_pass(optimizer, layer, inputs, generator)
    factor_a, factor_g = optimizer.kronecker_factors(layer)
    # The estimate converges to the Kronecker product of the expectations, not to the exact block
    assert th.allclose(th.kron(factor_g, factor_a), kronecker, atol=0.02)
    assert th.linalg.matrix_norm(th.kron(factor_g, factor_a) - exact) > 0.5 * th.linalg.matrix_norm(exact - kronecker)


def _tiny_network() -> nn.Sequential:
    th.manual_seed(3)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def _prepared(
    lr: float, kl_clip: float, damping: float = 0.1, momentum: float = 0.0, weight_decay: float = 0.0
) -> tuple[nn.Sequential, KFAC, list[th.Tensor]]:
    network = _tiny_network()
    optimizer = KFAC(
        network,
        lr=lr,
        momentum=momentum,
        damping=damping,
        kl_clip=kl_clip,
        eigenvalue_min=1e-15,
        weight_decay=weight_decay,
    )
    generator = th.Generator().manual_seed(4)
    inputs = th.randn(64, 3, dtype=th.float64, generator=generator)
    _categorical_fisher_pass(optimizer, network, inputs, generator)
    optimizer.zero_grad()
    (network(inputs) ** 2).mean().backward()
    grads = [param.grad.clone() for param in network.parameters()]  # type: ignore[union-attr]
    return network, optimizer, grads


def _dense_damped_inverse(optimizer: KFAC, layer: nn.Module, damping: float) -> tuple[th.Tensor, th.Tensor]:
    """(A + π√λ I)⁻¹ and (G + √λ/π I)⁻¹ computed directly."""
    factor_a, factor_g = optimizer.kronecker_factors(layer)
    pi = math.sqrt((th.trace(factor_a) / len(factor_a)).item() / (th.trace(factor_g) / len(factor_g)).item())
    root = math.sqrt(damping)
    eye_a, eye_g = th.eye(len(factor_a), dtype=factor_a.dtype), th.eye(len(factor_g), dtype=factor_g.dtype)
    return th.linalg.inv(factor_a + pi * root * eye_a), th.linalg.inv(factor_g + root / pi * eye_g)


def test_preconditioned_step_equals_dense_kronecker_inverse() -> None:
    damping = 0.1
    network, optimizer, grads = _prepared(lr=1.0, kl_clip=1e9, damping=damping)
    before = [param.detach().clone() for param in network.parameters()]
    optimizer.step()
    assert optimizer.step_scale == 1.0
    for index, layer in ((0, network[0]), (2, network[2])):
        inverse_a, inverse_g = _dense_damped_inverse(optimizer, layer, damping)
        gradient = th.cat([grads[index], grads[index + 1].unsqueeze(1)], dim=1)
        # Column-major vec: vec(G⁻¹ Γ A⁻¹) = (A⁻¹ ⊗ G⁻¹) vec(Γ)
        expected = (th.kron(inverse_a, inverse_g) @ gradient.T.flatten()).reshape(gradient.shape[1], -1).T
        step = th.cat([before[index] - layer.weight, (before[index + 1] - layer.bias).unsqueeze(1)], dim=1)
        assert th.allclose(step, expected, rtol=1e-6, atol=1e-9)


def test_trust_region_bounds_the_quadratic_kl() -> None:
    damping, lr, kl_clip = 0.1, 0.25, 1e-5
    network, optimizer, _ = _prepared(lr=lr, kl_clip=kl_clip, damping=damping)
    before = [param.detach().clone() for param in network.parameters()]
    optimizer.step()
    assert optimizer.step_scale < 1.0
    # ½ lr² η² ΔᵀF̂Δ with the dense damped K-FAC Fisher, from the applied step lr·η·Δ
    quadratic = 0.0
    for index, layer in ((0, network[0]), (2, network[2])):
        inverse_a, inverse_g = _dense_damped_inverse(optimizer, layer, damping)
        fisher = th.kron(th.linalg.inv(inverse_g), th.linalg.inv(inverse_a))  # row-major vec
        step = th.cat([before[index] - layer.weight, (before[index + 1] - layer.bias).unsqueeze(1)], dim=1).flatten()
        quadratic += 0.5 * (step @ fisher @ step).item()
    assert quadratic <= kl_clip * (1 + 1e-6)
    assert quadratic == pytest.approx(kl_clip, rel=1e-6)
    assert optimizer.kl_estimate == pytest.approx(quadratic, rel=1e-6)

    # A small step is not scaled
    _, optimizer, _ = _prepared(lr=1e-4, kl_clip=1.0, damping=damping)
    optimizer.step()
    assert optimizer.step_scale == 1.0
    assert optimizer.kl_estimate < 1.0


def test_momentum_averages_the_bounded_steps() -> None:
    # θ moves by lr·(1 - μ)·u with u ← μ·u + ηΔ (baselines): the first step is (1 - μ) times the momentum-free one,
    # and repeated identical steps approach the momentum-free step, never exceeding it
    plain, plain_optimizer, _ = _prepared(lr=0.25, kl_clip=1e-3)
    heavy, heavy_optimizer, _ = _prepared(lr=0.25, kl_clip=1e-3, momentum=0.5)
    start = [param.detach().clone() for param in plain.parameters()]
    plain_optimizer.step()
    bounded_step = [old - param.detach() for old, param in zip(start, plain.parameters(), strict=True)]
    for expected_fraction in (0.5, 0.75, 0.875):
        before = [param.detach().clone() for param in heavy.parameters()]
        heavy_optimizer.step()  # the same gradient and statistics each time
        for old, param, bounded in zip(before, heavy.parameters(), bounded_step, strict=True):
            assert th.allclose(old - param, expected_fraction * bounded, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_cold_iterations_take_the_raw_gradient(momentum: float) -> None:
    network = _tiny_network()
    optimizer = KFAC(network, lr=0.3, momentum=momentum, cold_iters=1)
    generator = th.Generator().manual_seed(5)
    inputs = th.randn(16, 3, dtype=th.float64, generator=generator)
    _categorical_fisher_pass(optimizer, network, inputs, generator)
    optimizer.zero_grad()
    (network(inputs) ** 2).mean().backward()
    grads = [param.grad.clone() for param in network.parameters()]  # type: ignore[union-attr]
    before = [param.detach().clone() for param in network.parameters()]
    optimizer.step()
    # lr/3, through the momentum's (1 - momentum) factor like every step (the buffer starts at zero)
    for old, param, grad in zip(before, network.parameters(), grads, strict=True):
        assert th.allclose(old - param, (1.0 - momentum) * 0.1 * grad)
    # The next step is a K-FAC step: not parallel to the gradient
    optimizer.zero_grad()
    (network(inputs) ** 2).mean().backward()
    grad = network[0].weight.grad.clone()  # type: ignore[union-attr]
    old = network[0].weight.detach().clone()
    optimizer.step()
    step = (old - network[0].weight).flatten()
    cosine = th.nn.functional.cosine_similarity(step, grad.flatten(), dim=0)
    assert cosine < 0.999


@pytest.mark.parametrize("cause", ["gradient", "learning rate"])
def test_non_finite_gradient_or_learning_rate_leaves_parameters_unchanged(cause: str) -> None:
    network, optimizer, _ = _prepared(lr=0.25, kl_clip=1e-3)
    optimizer.step()
    assert math.isfinite(optimizer.step_scale) and math.isfinite(optimizer.kl_estimate)
    if cause == "gradient":
        network[0].weight.grad[0, 0] = float("nan")  # type: ignore[index]
    else:
        optimizer.param_groups[0]["lr"] = float("inf")  # e.g. from a learning-rate schedule
    before = [param.detach().clone() for param in network.parameters()]
    with pytest.warns(RuntimeWarning, match="non-finite gradient or learning rate"):
        optimizer.step()
    for old, param in zip(before, network.parameters(), strict=True):
        assert th.equal(old, param)
    # No diagnostics of a step that was not taken (not the previous step's)
    assert math.isnan(optimizer.step_scale) and math.isnan(optimizer.kl_estimate)


def test_zero_learning_rate_leaves_parameters_unchanged() -> None:
    # rl-zoo3's enjoy loads every model with learning_rate=0
    network, optimizer, _ = _prepared(lr=0.0, kl_clip=1e-3)
    before = [param.detach().clone() for param in network.parameters()]
    optimizer.step()
    for old, param in zip(before, network.parameters(), strict=True):
        assert th.equal(old, param)


def test_non_finite_statistics_are_not_recorded() -> None:
    network = _tiny_network()
    optimizer = KFAC(network)
    inputs = th.randn(8, 3, dtype=th.float64)
    inputs[0, 0] = float("nan")
    with optimizer.capture():
        logits = network(inputs)
    with pytest.warns(RuntimeWarning, match="non-finite statistics"):
        optimizer.backward(logits[1:].sum(), -th.log_softmax(logits, dim=-1)[:, 0].mean(), batch_size=8)
    assert "A" not in optimizer.state[network[0].weight]


def test_failed_eigendecomposition_falls_back_to_the_damped_gradient(monkeypatch: pytest.MonkeyPatch) -> None:
    damping = 0.1
    network, optimizer, grads = _prepared(lr=0.25, kl_clip=1e-3, damping=damping)
    before = [param.detach().clone() for param in network.parameters()]

    def failing_eigh(matrix: th.Tensor) -> tuple[th.Tensor, th.Tensor]:
        raise th.linalg.LinAlgError("forced failure")

    monkeypatch.setattr(th.linalg, "eigh", failing_eigh)
    with pytest.warns(RuntimeWarning, match="eigendecompositions failed"):
        optimizer.step()
    # F̂ = λI for every block: the step is -lr·η·∇/λ, parallel to the gradient
    scale = optimizer.step_scale
    assert 0 < scale <= 1
    for old, param, grad in zip(before, network.parameters(), grads, strict=True):
        assert th.isfinite(param).all()
        assert th.allclose(old - param, 0.25 * scale * grad / damping)


class WithLogStd(nn.Module):
    """A Gaussian's mean as a K-FAC layer, and its log σ as a free parameter (as SB3's policies hold it)."""

    def __init__(self) -> None:
        super().__init__()
        self.mean = nn.Linear(2, 1)
        self.log_std = nn.Parameter(th.zeros(1))


def test_free_parameters_get_a_diagonal_preconditioner() -> None:
    th.manual_seed(0)
    model = WithLogStd()
    optimizer = KFAC(model)
    assert [id(param) for param in optimizer.diagonal_params] == [id(model.log_std)]
    inputs = th.randn(4000, 2)
    # Fisher of a Gaussian's log σ is 2: each pass's batch_size·(mean score)² estimates it without bias, as 2·χ²₁; the
    # debiased running average of 64 passes (stat_decay 0.99 averages them evenly) has a standard deviation of 0.35
    for _ in range(64):
        with optimizer.capture():
            distribution = th.distributions.Normal(model.mean(inputs), model.log_std.exp())
        fisher_loss = -distribution.log_prob(distribution.sample()).mean()
        optimizer.backward((distribution.mean**2).mean(), fisher_loss, batch_size=len(inputs))
    assert 2.0 - 1.2 < optimizer.state[model.log_std]["diag"].item() < 2.0 + 1.2
    before = model.log_std.detach().clone()
    optimizer.zero_grad()
    (model.log_std**2 + 1.0).sum().backward()
    model.log_std.grad.fill_(1.0)  # type: ignore[union-attr]
    optimizer.step()
    assert bool((model.log_std < before).all())  # a descent step against the positive gradient


def test_free_parameter_step_is_the_gradient_over_its_damped_fisher_diagonal() -> None:
    th.manual_seed(0)
    model = WithLogStd()
    optimizer = KFAC(model, lr=0.1, momentum=0.0, damping=0.01, kl_clip=1e6)  # a trust region that never binds
    inputs = th.randn(1000, 2)
    with optimizer.capture():
        distribution = th.distributions.Normal(model.mean(inputs), model.log_std.exp())
    optimizer.backward((distribution.mean**2).mean(), -distribution.log_prob(distribution.sample()).mean(), len(inputs))
    diagonal = optimizer.state[model.log_std]["diag"].item()
    before = model.log_std.detach().clone()
    optimizer.zero_grad()
    model.log_std.grad = th.ones(1)
    model.mean.weight.grad, model.mean.bias.grad = th.zeros_like(model.mean.weight), th.zeros_like(model.mean.bias)
    optimizer.step()
    assert optimizer.step_scale == 1.0
    # Δ = ∇ / (diag F + λ): damped by λ itself, not by √λ as the factored blocks' π-split damping
    assert (before - model.log_std).item() == pytest.approx(0.1 / (diagonal + 0.01), rel=1e-5)


def test_trust_region_counts_the_free_parameters_in_the_quadratic_kl() -> None:
    # The quadratic KL of the applied step adds the free parameter's diagonal block (diag F + λ)·s² to the layer's
    # damped Kronecker block: with a binding trust region it equals kl_clip only if the free term of ΔᵀF̂Δ is Δᵀ∇
    damping, lr, kl_clip = 0.1, 0.5, 1e-4
    th.manual_seed(0)
    model = WithLogStd().double()
    optimizer = KFAC(model, lr=lr, momentum=0.0, damping=damping, kl_clip=kl_clip, eigenvalue_min=1e-15)
    generator = th.Generator().manual_seed(5)
    inputs = th.randn(256, 2, dtype=th.float64, generator=generator)
    targets = inputs[:, :1] + 0.8 * th.randn(256, 1, dtype=th.float64, generator=generator)
    with optimizer.capture():
        distribution = th.distributions.Normal(model.mean(inputs), model.log_std.exp())
    fisher_loss = -distribution.log_prob(distribution.sample()).mean()
    # A likelihood loss: both the layer and log σ have a gradient
    optimizer.backward(-distribution.log_prob(targets).mean(), fisher_loss, batch_size=len(inputs))
    diagonal = optimizer.state[model.log_std]["diag"]
    assert abs(diagonal.item() + damping - 1.0) > 0.2  # the free block's curvature is not the identity's
    before = [param.detach().clone() for param in (model.mean.weight, model.mean.bias, model.log_std)]
    optimizer.step()
    assert 0 < optimizer.step_scale < 1.0
    inverse_a, inverse_g = _dense_damped_inverse(optimizer, model.mean, damping)
    layer_step = _block_matrix(before[0] - model.mean.weight, before[1] - model.mean.bias)
    free_step = before[2] - model.log_std
    free_quadratic = 0.5 * ((diagonal + damping) * free_step**2).sum().item()
    quadratic = _dense_quadratic(inverse_a, inverse_g, layer_step) + free_quadratic
    assert 0.1 * quadratic < free_quadratic < 0.9 * quadratic  # both blocks weigh in the sum
    assert quadratic == pytest.approx(kl_clip, rel=1e-6)
    assert optimizer.kl_estimate == pytest.approx(quadratic, rel=1e-6)


def test_only_free_parameters_trainable() -> None:
    # Fine-tuning the exploration noise alone: no layer is captured, the diagonal preconditioner does everything
    th.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 1))
    model.register_parameter("log_std", nn.Parameter(th.zeros(1)))
    with th.no_grad():
        model[0].weight.zero_()
        model[0].bias.zero_()
    model[0].requires_grad_(False)
    optimizer = KFAC(model)
    inputs = th.randn(64, 2)
    before = model.log_std.detach().clone()
    with optimizer.capture():
        distribution = th.distributions.Normal(model(inputs), model.log_std.exp())
    loss = -distribution.log_prob(th.zeros(64, 1)).mean()  # the targets are the mean itself: a smaller σ fits them
    optimizer.backward(loss, -distribution.log_prob(distribution.sample()).mean(), batch_size=64)
    assert model.log_std.grad is not None and model[0].weight.grad is None
    optimizer.step()
    assert bool((model.log_std < before).all())


@pytest.mark.parametrize("uncaptured_update", [0, 1])
def test_a_forward_pass_outside_capture_is_refused(uncaptured_update: int) -> None:
    th.manual_seed(0)
    model = nn.Linear(3, 2)
    optimizer = KFAC(model)
    inputs = th.randn(8, 3)
    for update in range(uncaptured_update + 1):
        if update < uncaptured_update:
            with optimizer.capture():
                output = model(inputs)
        else:
            output = model(inputs)
        loss, fisher_loss = output.pow(2).mean(), (output - th.randn_like(output)).pow(2).mean()
        if update < uncaptured_update:
            optimizer.backward(loss, fisher_loss, batch_size=8)
            optimizer.step()
        else:
            with pytest.raises(ValueError, match="inside capture"):
                optimizer.backward(loss, fisher_loss, batch_size=8)
    assert len(optimizer.blocks) == 1  # not demoted to a diagonal preconditioner


def test_ordinary_backward_does_not_touch_the_statistics() -> None:
    network, optimizer, _ = _prepared(lr=0.25, kl_clip=1e-3)
    factor_a, factor_g = (factor.clone() for factor in optimizer.kronecker_factors(network[2]))
    inputs = th.randn(16, 3, dtype=th.float64)
    with optimizer.capture():
        output = network(inputs)
    output.sum().backward()
    assert th.equal(factor_g, optimizer.kronecker_factors(network[2])[1])
    assert th.equal(factor_a, optimizer.kronecker_factors(network[2])[0])


def test_convolution_factors_have_the_patch_dimension() -> None:
    th.manual_seed(0)
    network = nn.Sequential(nn.Conv2d(2, 3, kernel_size=3, stride=2, padding=1), nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
    optimizer = KFAC(network)
    _categorical_fisher_pass(optimizer, network, th.randn(10, 2, 8, 8), th.Generator().manual_seed(0))
    factor_a, factor_g = optimizer.kronecker_factors(network[0])
    assert factor_a.shape == (2 * 3 * 3 + 1, 2 * 3 * 3 + 1) and factor_g.shape == (3, 3)
    # The bias column of A is the mean of the ones column: 1
    assert factor_a[-1, -1].item() == pytest.approx(1.0)
    network.zero_grad()
    network(th.randn(10, 2, 8, 8)).sum().backward()
    optimizer.step()
    assert all(th.isfinite(param).all() for param in network.parameters())


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(lr=-0.1),
        dict(lr=float("inf")),
        dict(damping=-1.0),
        dict(kl_clip=0.0),
        dict(stat_decay=1.0),
        dict(stat_decay=0.0),
        dict(inverse_update_freq=0),
        dict(inverse_update_freq=2.5),
        dict(cold_iters=1.5),
        dict(momentum=1.0),
        dict(eigenvalue_min=0.0),
        dict(eigenvalue_min=float("inf")),
        dict(weight_decay=float("nan")),
        dict(max_grad_norm=0.0),
    ],
)
def test_bad_hyperparameters(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        KFAC(nn.Linear(2, 2), **kwargs)


def test_convolution_factors_carry_the_number_of_locations_in_g() -> None:
    # KFC: A = mean over samples and locations of the patches' outer products, G = mean over samples of the sum over
    # locations of the per-sample scores' outer products, so G ⊗ A has the scale of the summed per-sample Fisher
    th.manual_seed(2)
    conv = nn.Conv2d(2, 3, kernel_size=1).double()
    optimizer = KFAC(conv)
    n_samples, inputs = 7, th.randn(7, 2, 2, 2, dtype=th.float64)
    with optimizer.capture():
        outputs = conv(inputs)
    logits = outputs.permute(0, 2, 3, 1).reshape(-1, 3)  # a categorical over 3 classes at each of 4 locations
    targets = th.multinomial(th.softmax(logits.detach(), dim=-1), 1, generator=th.Generator().manual_seed(0))
    per_sample_nll = -th.log_softmax(logits, dim=-1).gather(1, targets).reshape(n_samples, 4).sum(dim=1)
    optimizer.backward(outputs.sum() * 0.0, per_sample_nll.mean(), batch_size=n_samples)
    factor_a, factor_g = optimizer.kronecker_factors(conv)
    scores = (th.softmax(logits.detach(), dim=-1) - nn.functional.one_hot(targets.squeeze(1), 3)).reshape(n_samples, 4, 3)
    patches = th.cat([inputs.permute(0, 2, 3, 1).reshape(-1, 2), th.ones(n_samples * 4, 1, dtype=th.float64)], dim=1)
    assert th.allclose(factor_a, patches.T @ patches / (n_samples * 4))
    assert th.allclose(factor_g, th.einsum("nli,nlj->ij", scores, scores) / n_samples)


def test_tied_weights_get_a_diagonal_preconditioner() -> None:
    encoder, decoder = nn.Linear(3, 3, bias=False), nn.Linear(3, 3)
    decoder.weight = encoder.weight
    model = nn.Sequential(encoder, nn.Tanh(), decoder)
    optimizer = KFAC(model)
    assert [module for module, _, _ in optimizer.blocks] == []
    assert {id(param) for param in optimizer.diagonal_params} == {id(encoder.weight), id(decoder.bias)}


def test_weights_used_outside_their_layer_call_still_train() -> None:
    # nn.MultiheadAttention applies its out_proj (an nn.Linear) functionally, without calling it
    th.manual_seed(0)
    attention, head = nn.MultiheadAttention(4, 2, batch_first=True), nn.Linear(4, 2)
    model = nn.ModuleDict(dict(attention=attention, head=head))
    optimizer = KFAC(model, lr=0.1)
    inputs = th.randn(8, 3, 4)
    before = attention.out_proj.weight.detach().clone()
    with optimizer.capture():
        logits = head(attention(inputs, inputs, inputs)[0].mean(dim=1))
    reference = th.autograd.grad((logits**2).mean(), attention.out_proj.weight, retain_graph=True)[0]
    fisher_loss = -th.log_softmax(logits, dim=-1)[:, 0].mean()
    with pytest.warns(RuntimeWarning, match="used outside their layer"):
        optimizer.backward((logits**2).mean(), fisher_loss, batch_size=8)
    assert th.allclose(attention.out_proj.weight.grad, reference)  # type: ignore[arg-type]
    assert any(param is attention.out_proj.weight for param in optimizer.diagonal_params)
    assert [module for module, _, _ in optimizer.blocks] == [head]
    optimizer.step()
    assert not th.equal(before, attention.out_proj.weight)


def test_a_layer_called_and_also_used_functionally_gets_its_whole_gradient() -> None:
    class Reused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer, self.head = nn.Linear(3, 3), nn.Linear(3, 2)

        def forward(self, inputs: th.Tensor) -> th.Tensor:
            hidden = th.tanh(self.layer(inputs))
            return self.head(nn.functional.linear(hidden, self.layer.weight))  # a second use, without the layer's call

    th.manual_seed(0)
    model = Reused()
    optimizer = KFAC(model)
    inputs = th.randn(8, 3)
    with optimizer.capture():
        logits = model(inputs)
    reference = th.autograd.grad((logits**2).mean(), model.layer.weight, retain_graph=True)[0]
    with pytest.warns(RuntimeWarning, match="used outside their layer"):
        optimizer.backward((logits**2).mean(), -th.log_softmax(logits, dim=-1)[:, 0].mean(), batch_size=8)
    assert th.allclose(model.layer.weight.grad, reference, atol=1e-6)  # type: ignore[arg-type]
    assert [module for module, _, _ in optimizer.blocks] == [model.head]


def test_a_parametrized_bias_is_not_a_block() -> None:
    class Doubled(nn.Module):
        def forward(self, bias: th.Tensor) -> th.Tensor:
            return 2.0 * bias

    layer = nn.Linear(3, 2)
    nn.utils.parametrize.register_parametrization(layer, "bias", Doubled())
    optimizer = KFAC(layer)
    assert optimizer.blocks == [] and len(optimizer.diagonal_params) == 2


def test_in_place_change_of_a_captured_output_is_refused() -> None:
    # backward() reads each layer's output; an in-place activation would overwrite it with the activation's
    network = nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=True), nn.Linear(4, 2))
    optimizer = KFAC(network)
    inputs = th.randn(8, 3)
    with optimizer.capture():
        output = network(inputs)
    with pytest.raises(RuntimeError, match="in place"):
        optimizer.backward(output.pow(2).mean(), output.mean(), batch_size=8)
    # The same network with an out-of-place activation is accepted
    network[1] = nn.ReLU()
    network.zero_grad()
    with optimizer.capture():
        output = network(inputs)
    optimizer.backward(output.pow(2).mean(), output.mean(), batch_size=8)
    assert all(param.grad is not None and bool(param.grad.abs().sum() > 0) for param in network.parameters())


class _ActorCritic(nn.Module):
    """A Gaussian policy head and a value head on a shared trunk, with a free ``log_std``."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(3, 5), nn.Tanh())
        self.mean = nn.Linear(5, 2)
        self.value = nn.Linear(5, 1)
        self.log_std = nn.Parameter(th.tensor([0.1, -0.2]))

    def forward(self, inputs: th.Tensor) -> tuple[th.Tensor, th.Tensor]:
        hidden = self.trunk(inputs)
        return self.mean(hidden), self.value(hidden).flatten()


def test_backward_gives_autograd_gradients_and_the_fisher_statistics() -> None:
    # KFAC.backward stops at the layers' outputs and forms the weight gradients itself: they equal autograd's, and
    # the statistics are those of the Fisher loss's per-sample output gradients
    th.manual_seed(0)
    model, reference = _ActorCritic().double(), _ActorCritic().double()
    reference.load_state_dict(model.state_dict())
    generator = th.Generator().manual_seed(6)
    inputs, actions = th.randn(12, 3, generator=generator).double(), th.randn(12, 2, generator=generator).double()
    returns, noise = th.randn(12, generator=generator).double(), th.randn(12, 2, generator=generator).double()

    def loss_of(model: _ActorCritic, mean: th.Tensor, values: th.Tensor) -> th.Tensor:
        log_prob = th.distributions.Normal(mean, model.log_std.exp()).log_prob(actions).sum(-1)
        return -(returns * log_prob).mean() + ((values - returns) ** 2).mean()

    optimizer = KFAC(model)
    with optimizer.capture():
        mean, values = model(inputs)
    fisher_log_prob = th.distributions.Normal(mean, model.log_std.exp()).log_prob(mean.detach() + noise).sum(-1)
    optimizer.backward(loss_of(model, mean, values), -fisher_log_prob.mean(), batch_size=12)

    loss_of(reference, *reference(inputs)).backward()
    for param, reference_param in zip(model.parameters(), reference.parameters(), strict=True):
        assert th.allclose(param.grad, reference_param.grad, rtol=1e-10, atol=1e-12)  # type: ignore[arg-type]
    # The mean head's G: per-sample scores of the Gaussian mean, -(â - μ)/σ² = -noise/σ², averaged as outer products
    scores = -noise / model.log_std.detach().exp() ** 2
    factor_a, factor_g = optimizer.kronecker_factors(model.mean)
    hidden = model.trunk(inputs).detach()
    assert th.allclose(factor_g, scores.T @ scores / 12, rtol=1e-10)
    assert th.allclose(factor_a, _with_ones(hidden).T @ _with_ones(hidden) / 12, rtol=1e-10)
    # log_std is a free parameter: batch_size·(mean Fisher-loss gradient)² is its diagonal statistic
    variance = model.log_std.detach().exp() ** 2
    log_std_score = (1 - noise**2 / variance).mean(0)  # d/dlog σ of -log N(μ + ε; μ, σ), averaged over the batch
    assert th.allclose(optimizer.state[model.log_std]["diag"], 12 * log_std_score**2, rtol=1e-10)
    # The value head gets no Fisher term here (its loss term is absent): no statistics for it
    assert "A" not in optimizer.state[model.value.weight]

    # A forward pass on another number of rows is refused
    with optimizer.capture():
        mean, _ = model(inputs[:5])
    with pytest.raises(ValueError, match="rows"):
        optimizer.backward(mean.sum(), mean.sum(), batch_size=12)


def test_backward_of_a_convolution_gives_autograd_gradients() -> None:
    th.manual_seed(1)
    network = nn.Sequential(nn.Conv2d(2, 3, kernel_size=3, stride=2, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(48, 2))
    network = network.double()
    reference = copy.deepcopy(network)
    inputs = th.randn(6, 2, 8, 8, dtype=th.float64)
    targets = th.randn(6, 2, dtype=th.float64)
    optimizer = KFAC(network)
    with optimizer.capture():
        outputs = network(inputs)
    optimizer.backward(((outputs - targets) ** 2).mean(), -th.log_softmax(outputs, dim=-1)[:, 1].mean(), batch_size=6)
    ((reference(inputs) - targets) ** 2).mean().backward()
    for param, reference_param in zip(network.parameters(), reference.parameters(), strict=True):
        assert th.allclose(param.grad, reference_param.grad, rtol=1e-10, atol=1e-12)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(4, 3, kernel_size=8, stride=4),
        nn.Conv2d(4, 3, kernel_size=(3, 2), stride=(2, 1), padding=(1, 2)),
        nn.Conv2d(4, 3, kernel_size=3, padding=1, bias=False),
        nn.Conv2d(4, 3, kernel_size=3, stride=2, dilation=2, padding=1),
    ],
)
def test_convolution_rows_are_unfold_patches(conv: nn.Conv2d) -> None:
    inputs = th.randn(5, 4, 17, 13)
    patches = F.unfold(inputs, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
    expected = patches.transpose(1, 2).reshape(-1, patches.shape[1])
    rows = KFAC._layer_rows(conv, inputs, has_bias=conv.bias is not None)
    if conv.bias is not None:
        assert th.equal(rows[:, -1], th.ones(len(rows)))
        rows = rows[:, :-1]
    assert th.equal(rows, expected)
    # Each row times the flattened kernel is the convolution's output at its location
    outputs = (rows @ conv.weight.detach().reshape(conv.out_channels, -1).T).reshape(5, -1, conv.out_channels)
    reference = F.conv2d(inputs, conv.weight.detach(), None, conv.stride, conv.padding, conv.dilation)
    assert th.allclose(outputs, reference.flatten(2).transpose(1, 2), atol=1e-5)


def _block_matrix(weight: th.Tensor, bias: th.Tensor) -> th.Tensor:
    """[W, b] as one (out, in + 1) matrix, the layout of a block's factors."""
    return th.cat([weight, bias.unsqueeze(1)], dim=1)


def _dense_direction(inverse_a: th.Tensor, inverse_g: th.Tensor, gradient: th.Tensor) -> th.Tensor:
    """(G⁻¹ ⊗ A⁻¹) applied to a block's gradient with the dense Kronecker product (column-major vec)."""
    return (th.kron(inverse_a, inverse_g) @ gradient.T.flatten()).reshape(gradient.shape[1], -1).T


def _dense_quadratic(inverse_a: th.Tensor, inverse_g: th.Tensor, step: th.Tensor) -> float:
    """½ sᵀF̂s with the dense damped K-FAC Fisher block (row-major vec)."""
    fisher = th.kron(th.linalg.inv(inverse_g), th.linalg.inv(inverse_a))
    return 0.5 * (step.flatten() @ fisher @ step.flatten()).item()


@pytest.mark.parametrize("stat_decay, weights", [(0.9, (1 / 2, 1 / 3)), (0.5, (1 / 2, 1 / 2))])
def test_running_factors_are_debiased_averages(stat_decay: float, weights: tuple[float, float]) -> None:
    # Decay min(stat_decay, 1 - 1/t): the t-th statistics weigh 1/t until that falls below 1 - stat_decay
    network = _tiny_network()
    optimizer = KFAC(network, stat_decay=stat_decay)
    generator = th.Generator().manual_seed(7)
    expected_a = expected_g = th.zeros(0)
    for updates, weight in enumerate((1.0, *weights), start=1):
        inputs = updates * th.randn(6, 3, dtype=th.float64, generator=generator)  # a different scale each pass
        _, scores = _categorical_fisher_pass(optimizer, network, inputs, generator)
        hidden = _with_ones(th.tanh(network[0](inputs)).detach())
        new_a, new_g = hidden.T @ hidden / 6, scores.T @ scores / 6
        expected_a = new_a if updates == 1 else (1 - weight) * expected_a + weight * new_a
        expected_g = new_g if updates == 1 else (1 - weight) * expected_g + weight * new_g
        factor_a, factor_g = optimizer.kronecker_factors(network[2])
        assert optimizer.state[network[2].weight]["stat_updates"] == updates
        assert th.allclose(factor_a, expected_a, rtol=1e-12, atol=0)
        assert th.allclose(factor_g, expected_g, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("cold_iters", [0, 1])
def test_eigenbasis_is_refreshed_every_inverse_update_freq_steps(cold_iters: int) -> None:
    # The first K-FAC step after the cold ones decomposes the factors, then every inverse_update_freq-th step
    network = _tiny_network()
    optimizer = KFAC(network, lr=0.01, momentum=0.0, inverse_update_freq=3, cold_iters=cold_iters, eigenvalue_min=1e-15)
    generator = th.Generator().manual_seed(8)
    state = optimizer.state[network[2].weight]
    refreshed = []
    for step in range(1, 5 + cold_iters):
        # New statistics before every step, so a stale basis differs from the current factors'
        _categorical_fisher_pass(optimizer, network, th.randn(16, 3, dtype=th.float64, generator=generator), generator)
        previous = state["eig_A"].clone() if "eig_A" in state else None
        optimizer.step()
        if step <= cold_iters:
            assert "eig_A" not in state
            continue
        eig_a, basis_a = th.linalg.eigh(state["A"])
        eig_g, basis_g = th.linalg.eigh(state["G"])
        if previous is None or not th.equal(previous, state["eig_A"]):
            refreshed.append(step)
            assert th.allclose(state["eig_A"], eig_a.clamp_min(1e-15), rtol=1e-12, atol=1e-15)
            assert th.allclose(state["eig_G"], eig_g.clamp_min(1e-15), rtol=1e-12, atol=1e-15)
            assert th.allclose(state["Q_A"].abs(), basis_a.abs(), rtol=1e-10, atol=1e-12)
            assert th.allclose(state["Q_G"].abs(), basis_g.abs(), rtol=1e-10, atol=1e-12)
        else:
            assert not th.allclose(state["eig_A"], eig_a, rtol=1e-6)  # stale: the factors moved since
    assert refreshed == [1 + cold_iters, 4 + cold_iters]


def test_clipped_gradient_scales_the_step_and_its_quadratic() -> None:
    # Clipping multiplies ∇, hence Δ, by c = max_grad_norm / (‖∇‖ + 1e-6): the step by c and its quadratic KL by c²
    damping = 0.1
    for lr, kl_clip in ((1.0, 1e9), (0.25, 1e-5)):
        network, optimizer, grads = _prepared(lr=lr, kl_clip=kl_clip, damping=damping)
        grad_norm = th.linalg.vector_norm(th.cat([grad.flatten() for grad in grads])).item()
        optimizer.max_grad_norm = 0.1 * grad_norm
        clip = optimizer.max_grad_norm / (grad_norm + 1e-6)
        before = [param.detach().clone() for param in network.parameters()]
        optimizer.step()
        scale = optimizer.step_scale
        assert (scale == 1.0) if kl_clip > 1 else (0 < scale < 1)
        quadratic = 0.0
        for index, layer in ((0, network[0]), (2, network[2])):
            inverse_a, inverse_g = _dense_damped_inverse(optimizer, layer, damping)
            direction = _dense_direction(inverse_a, inverse_g, _block_matrix(grads[index], grads[index + 1]))
            step = _block_matrix(before[index] - layer.weight, before[index + 1] - layer.bias)
            assert th.allclose(step, lr * clip * scale * direction, rtol=1e-6, atol=1e-12)
            quadratic += _dense_quadratic(inverse_a, inverse_g, step)
        assert optimizer.kl_estimate == pytest.approx(quadratic, rel=1e-6)
        if kl_clip < 1:
            # The trust region bounds the quadratic KL of the clipped step, not of the unclipped one
            assert quadratic == pytest.approx(kl_clip, rel=1e-6)


def test_weight_decay_is_added_to_the_gradient_before_preconditioning() -> None:
    damping, weight_decay = 0.1, 0.1
    network, optimizer, grads = _prepared(lr=1.0, kl_clip=1e9, damping=damping, weight_decay=weight_decay)
    before = [param.detach().clone() for param in network.parameters()]
    optimizer.step()
    assert optimizer.step_scale == 1.0
    for index, layer in ((0, network[0]), (2, network[2])):
        inverse_a, inverse_g = _dense_damped_inverse(optimizer, layer, damping)
        weights = _block_matrix(before[index], before[index + 1])
        decayed = _block_matrix(grads[index], grads[index + 1]) + weight_decay * weights
        step = _block_matrix(before[index] - layer.weight, before[index + 1] - layer.bias)
        assert th.allclose(step, _dense_direction(inverse_a, inverse_g, decayed), rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("quadratic", [float("nan"), -1.0])
def test_non_finite_or_negative_quadratic_skips_the_step(quadratic: float, monkeypatch: pytest.MonkeyPatch) -> None:
    network, optimizer, _ = _prepared(lr=0.25, kl_clip=1e-3, momentum=0.9)
    optimizer.step()  # non-zero momentum buffers, which a skipped step must leave alone
    params = list(network.parameters())
    before = [param.detach().clone() for param in params]
    buffers = [optimizer.state[param]["momentum_buffer"].clone() for param in params]
    assert all(bool(buffer.abs().sum() > 0) for buffer in buffers)
    precondition = optimizer._precondition

    def corrupted(
        params: list[th.Tensor], grads: list[th.Tensor], damping: float, refresh: bool
    ) -> tuple[list[th.Tensor], list[th.Tensor]]:
        # Finite directions, so only the quadratic's guard can stop the step
        directions, _ = precondition(params, grads, damping, refresh)
        return directions, [th.tensor(quadratic, dtype=th.float64)]

    monkeypatch.setattr(optimizer, "_precondition", corrupted)
    with pytest.warns(RuntimeWarning, match="non-finite step"):
        optimizer.step()
    for old, param, buffer in zip(before, params, buffers, strict=True):
        assert th.equal(old, param)
        assert th.equal(buffer, optimizer.state[param]["momentum_buffer"])
    assert math.isnan(optimizer.step_scale) and math.isnan(optimizer.kl_estimate)


def _clamped_rank_one(matrix: th.Tensor, floor: float) -> th.Tensor:
    """vvᵀ with its spectrum clamped to ≥ floor, by hand: ‖v‖² on v (or floor), floor on v's complement."""
    assert th.linalg.matrix_rank(matrix).item() == 1
    norm = th.trace(matrix).item()
    projection = matrix / norm
    return floor * (th.eye(len(matrix), dtype=matrix.dtype) - projection) + max(norm, floor) * projection


def test_eigenvalues_are_clamped_before_damping() -> None:
    # One input row: every factor is rank one, so all but one eigenvalue is raised to eigenvalue_min (π too)
    damping, floor = 0.1, 0.5
    network = _tiny_network()
    optimizer = KFAC(network, lr=1.0, momentum=0.0, damping=damping, kl_clip=1e9, eigenvalue_min=floor)
    generator = th.Generator().manual_seed(9)
    _categorical_fisher_pass(optimizer, network, th.randn(1, 3, dtype=th.float64, generator=generator), generator)
    grads = [param.grad.clone() for param in network.parameters()]  # type: ignore[union-attr]
    before = [param.detach().clone() for param in network.parameters()]
    optimizer.step()
    assert optimizer.step_scale == 1.0
    root = math.sqrt(damping)
    for index, layer in ((0, network[0]), (2, network[2])):
        factor_a, factor_g = (_clamped_rank_one(factor, floor) for factor in optimizer.kronecker_factors(layer))
        pi = math.sqrt((th.trace(factor_a) / len(factor_a)).item() / (th.trace(factor_g) / len(factor_g)).item())
        inverse_a = th.linalg.inv(factor_a + pi * root * th.eye(len(factor_a), dtype=th.float64))
        inverse_g = th.linalg.inv(factor_g + root / pi * th.eye(len(factor_g), dtype=th.float64))
        step = _block_matrix(before[index] - layer.weight, before[index + 1] - layer.bias)
        expected = _dense_direction(inverse_a, inverse_g, _block_matrix(grads[index], grads[index + 1]))
        assert th.allclose(step, expected, rtol=1e-6, atol=1e-12)


def test_parameters_frozen_after_construction_stay_and_the_rest_trains() -> None:
    # As with torch's optimizers, requires_grad_(False) after the optimizer was built freezes a parameter
    network = _tiny_network()
    optimizer = KFAC(network, lr=0.1, momentum=0.9)
    generator = th.Generator().manual_seed(4)
    inputs = th.randn(16, 3, dtype=th.float64, generator=generator)
    _categorical_fisher_pass(optimizer, network, inputs, generator)
    optimizer.step()  # momentum buffers everywhere, which must not move a frozen parameter
    network[0].requires_grad_(False)
    network[2].bias.requires_grad_(False)  # the rest of a partly frozen layer gets a diagonal preconditioner
    before = [param.detach().clone() for param in network.parameters()]
    _categorical_fisher_pass(optimizer, network, inputs, generator)
    assert "diag" in optimizer.state[network[2].weight] and network[0].weight.grad is None
    optimizer.step()
    moved = [not th.equal(old, param) for old, param in zip(before, network.parameters(), strict=True)]
    assert moved == [False, False, True, False]
    # Unfrozen again, the layer is a Kronecker-factored block as before
    network.requires_grad_(True)
    _categorical_fisher_pass(optimizer, network, inputs, generator)
    optimizer.step()
    assert all(not th.equal(old, param) for old, param in zip(before, network.parameters(), strict=True))
    assert optimizer.state[network[0].weight]["stat_updates"] == 2


def test_a_layer_may_see_several_rows_per_sample() -> None:
    # A per-element encoder applied to the (samples × elements) rows gets the factors of the same layer applied to
    # (samples, elements, features): the rows of a sample are its elements either way
    th.manual_seed(0)
    elements = th.randn(8, 5, 3, dtype=th.float64)
    factors = []
    for flat in (False, True):
        th.manual_seed(1)
        encoder, head = nn.Linear(3, 4).double(), nn.Linear(4, 2).double()
        optimizer = KFAC(nn.ModuleList([encoder, head]))
        with optimizer.capture():
            encoded = encoder(elements.reshape(-1, 3)).reshape(8, 5, 4) if flat else encoder(elements)
            logits = head(th.tanh(encoded).sum(dim=1))
        optimizer.backward((logits**2).mean(), -th.log_softmax(logits, dim=-1)[:, 0].mean(), batch_size=8)
        factors.append(optimizer.kronecker_factors(encoder))
    assert all(th.allclose(left, right) for left, right in zip(*factors, strict=True))
    # A layer that saw no whole number of rows per sample is refused: `batch_size` cannot be the samples'
    with optimizer.capture():
        logits = head(th.tanh(encoder(elements[:, :2].reshape(-1, 3)[:15])).sum(dim=0, keepdim=True).expand(8, 4))
    with pytest.raises(ValueError, match="not a whole number of rows for each of the batch's 8 samples"):
        optimizer.backward(logits.pow(2).mean(), logits.mean(), batch_size=8)


def test_a_non_finite_first_loss_postpones_the_check_of_other_uses() -> None:
    # A NaN gradient compares as equal to anything: the out_proj of nn.MultiheadAttention would stay a block
    th.manual_seed(0)
    attention, head = nn.MultiheadAttention(4, 2, batch_first=True), nn.Linear(4, 2)
    optimizer = KFAC(nn.ModuleDict(dict(attention=attention, head=head)), lr=0.1)
    inputs = th.randn(8, 3, 4)
    for scale in (float("nan"), 1.0):
        with optimizer.capture():
            logits = head(attention(inputs, inputs, inputs)[0].mean(dim=1))
        fisher_loss = -th.log_softmax(logits, dim=-1)[:, 0].mean()
        optimizer.zero_grad()
        if math.isnan(scale):
            optimizer.backward(scale * (logits**2).mean(), fisher_loss, batch_size=8)
            assert len(optimizer.blocks) == 2  # not checked yet
        else:
            with pytest.warns(RuntimeWarning, match="used outside their layer"):
                optimizer.backward(scale * (logits**2).mean(), fisher_loss, batch_size=8)
    assert [module for module, _, _ in optimizer.blocks] == [head]
