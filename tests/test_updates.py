"""
The update rules themselves: the backtracking line search, TRPO's undo of a failed search, the Fisher sub-sample,
the critic's undo of a non-finite update and its minibatches, the rollout's Gaussian draw and time-limit bootstrap,
NPG's step (with the conjugate gradient converged and capped), the surrogate away from θ_old, a trial step to a
policy that torch refuses, and the direction of the KL that the trust region bounds.

Each test pins down a behaviour that a plausible one-line slip in the source would change.
"""

import warnings
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import DummyVecEnv

import sb3_trust.trpo.trpo as trpo_module
from sb3_trust import NPG, TRPO
from sb3_trust.common import natural_gradient
from sb3_trust.common.fisher import FisherVectorProduct, flat_gradient, flat_parameters
from sb3_trust.common.line_search import LineSearchResult, backtracking_line_search
from sb3_trust.common.on_policy import normalized_advantages
from sb3_trust.common.surrogate import ImportanceSampledSurrogate
from tests.test_fisher import dense_kl_hessian

TINY = dict(policy_kwargs=dict(net_arch=[4]), seed=0)


def collect(model: NPG) -> None:
    """Fill the model's rollout buffer once, as learn() would before its first train()."""
    model._setup_learn(model.n_steps * model.n_envs)
    model.collect_rollouts(model.env, model._init_callback(None), model.rollout_buffer, model.n_steps)


class ScriptedEvaluations:
    """An ``evaluate`` for the line search that records the step sizes and answers (objective, KL) from a table."""

    def __init__(self, table: list[tuple[float, float]]) -> None:
        self.table = table
        self.calls: list[float] = []

    def __call__(self, step_size: float) -> tuple[float, float]:
        self.calls.append(step_size)
        return self.table[len(self.calls) - 1]


def test_line_search_shrinks_past_a_kl_violation_then_accepts() -> None:
    max_step_size, rho = 0.37, 0.6
    # Too far at α₀ (KL > δ, although the objective improves), within δ and improving at ρα₀
    evaluate = ScriptedEvaluations([(2.0, 0.05), (1.5, 0.008), (9.0, 0.0)])
    result = backtracking_line_search(evaluate, max_step_size, 1.0, 0.01, rho, 10)
    assert result.accepted
    assert result.step_size == rho * max_step_size
    assert result.n_evaluations == 2
    assert evaluate.calls == [max_step_size, rho * max_step_size]
    assert (result.objective, result.kl) == (1.5, 0.008)


def test_line_search_accepts_a_kl_of_exactly_delta_and_nothing_above() -> None:
    max_kl = 0.01
    evaluate = ScriptedEvaluations([(2.0, max_kl * (1 + 1e-3)), (1.5, max_kl)])
    result = backtracking_line_search(evaluate, 0.37, 1.0, max_kl, 0.6, 10)
    assert result.accepted and result.n_evaluations == 2 and result.kl == max_kl


def test_line_search_fails_when_the_objective_never_improves() -> None:
    max_step_size, rho, objective_before = 0.37, 0.6, 1.0
    # KL always within δ: only the improvement check can reject these (equal is not an improvement, NaN neither)
    table = [(objective_before, 0.001), (float("nan"), 0.001), (0.5, 0.0), (objective_before, 0.0), (float("inf"), 0.0)]
    evaluate = ScriptedEvaluations(table)
    result = backtracking_line_search(evaluate, max_step_size, objective_before, 0.01, rho, len(table))
    assert result.accepted is False
    assert result.n_evaluations == len(table)
    assert evaluate.calls == pytest.approx([max_step_size * rho**k for k in range(len(table))], rel=1e-15, abs=0.0)
    # The last step size tried is reported
    assert result.step_size == evaluate.calls[-1]


def test_trpo_restores_the_parameters_after_a_failed_line_search(monkeypatch: pytest.MonkeyPatch) -> None:
    model = TRPO("MlpPolicy", make_vec_env("Pendulum-v1", n_envs=1, seed=0), n_steps=64, batch_size=64, **TINY)
    collect(model)
    before = [param.detach().clone() for param in model.actor_parameters]
    moved = []

    def failing_search(evaluate: Any, max_step_size: float, *args: Any) -> LineSearchResult:
        # Evaluating a step moves the parameters; then report that nothing was accepted
        objective, kl = evaluate(max_step_size)
        moved.append(any(not th.equal(old, new) for old, new in zip(before, model.actor_parameters, strict=True)))
        return LineSearchResult(max_step_size, objective, kl, 1, False)

    monkeypatch.setattr(trpo_module, "backtracking_line_search", failing_search)
    model.train()
    assert moved == [True]
    for old, new in zip(before, model.actor_parameters, strict=True):
        assert th.equal(old, new)
    logged = model.logger.name_to_value
    assert logged["train/is_line_search_success"] == 0.0
    assert logged["train/step_size"] == 0.0


def test_fisher_products_use_the_sub_sample(monkeypatch: pytest.MonkeyPatch) -> None:
    n_steps, factor = 128, 4
    model = NPG(
        "MlpPolicy",
        make_vec_env("Pendulum-v1", n_envs=1, seed=0),
        n_steps=n_steps,
        batch_size=n_steps,
        sub_sampling_factor=factor,
        cg_max_steps=64,
        **TINY,
    )
    n_actor = sum(param.numel() for param in model.actor_parameters)
    assert model.cg_max_steps >= n_actor
    collect(model)
    # The whole rollout's policy gradient, computed apart from train() (the mean does not depend on the row order)
    whole = ImportanceSampledSurrogate(model.policy, next(model.rollout_buffer.get(batch_size=None)), True)
    whole_gradient = flat_gradient(whole.evaluate().objective, model.actor_parameters).detach()

    batch_sizes: list[int] = []
    indices: list[th.Tensor] = []
    sub_observations: list[th.Tensor] = []
    solves: list[tuple[th.Tensor, th.Tensor, th.Tensor]] = []

    class RecordingFisher(FisherVectorProduct):
        def __init__(self, distribution: Any, params: Any, damping: float) -> None:
            super().__init__(distribution, params, damping)
            batch_sizes.append(distribution.distribution.mean.shape[0])

    original_distribution_on = ImportanceSampledSurrogate.distribution_on

    def recording_distribution_on(self: ImportanceSampledSurrogate, rows: th.Tensor) -> Any:
        # The rows index the surrogate's own (shuffled) copy of the rollout
        indices.append(rows)
        sub_observations.append(self.observations[rows])
        return original_distribution_on(self, rows)

    original_direction = model._natural_gradient_direction

    def recording_direction(gradient: th.Tensor, fisher: FisherVectorProduct) -> Any:
        # Still at θ_old here: the dense Fisher of the sub-sample the products were built on
        assert sub_observations, "the Fisher-vector products were built on the whole rollout, not a sub-sample"
        hessian = dense_kl_hessian(model.policy, sub_observations[-1], model.actor_parameters)
        direction, quadratic_form = original_direction(gradient, fisher)
        solves.append((gradient.detach().clone(), hessian.detach(), direction.detach().clone()))
        return direction, quadratic_form

    monkeypatch.setattr(natural_gradient, "FisherVectorProduct", RecordingFisher)
    monkeypatch.setattr(ImportanceSampledSurrogate, "distribution_on", recording_distribution_on)
    monkeypatch.setattr(model, "_natural_gradient_direction", recording_direction)
    model.train()

    assert batch_sizes == [n_steps // factor]
    assert len(indices) == 1 and len(th.unique(indices[0])) == n_steps // factor
    gradient, hessian, direction = solves[0]
    # The gradient is the whole rollout's; only F comes from the sub-sample
    assert th.allclose(gradient, whole_gradient, rtol=1e-5, atol=1e-6 * whole_gradient.abs().max().item())
    damped = hessian.double() + model.cg_damping * th.eye(n_actor, dtype=th.float64)
    expected = th.linalg.solve(damped, gradient.double())
    assert th.allclose(direction.double(), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_non_finite_critic_update_is_undone(monkeypatch: pytest.MonkeyPatch) -> None:
    model = TRPO("MlpPolicy", make_vec_env("Pendulum-v1", n_envs=1, seed=0), n_steps=64, batch_size=32, **TINY)
    model.learn(64)
    optimizer = model.policy.optimizer
    assert optimizer.state, "the critic optimizer should have moment estimates after an update"
    before = [param.detach().clone() for param in model.critic_parameters]
    original_step = optimizer.lean_step

    def overflowing_step(*args: Any, **kwargs: Any) -> Any:
        # An overflow inside the optimizer: one critic weight becomes inf
        result = original_step(*args, **kwargs)
        with th.no_grad():
            model.critic_parameters[0].view(-1)[0] = float("inf")
        return result

    monkeypatch.setattr(optimizer, "lean_step", overflowing_step)
    with pytest.warns(RuntimeWarning, match="Critic update undone"):
        model.train()
    for old, new in zip(before, model.critic_parameters, strict=True):
        assert th.equal(old, new)
    # The moment estimates are restarted with the undo
    assert not optimizer.state


def test_rollout_gaussian_draw_scales_by_sigma() -> None:
    # log σ = 0 hides σ² in place of σ: move it away from 0
    model = TRPO("MlpPolicy", make_vec_env("Pendulum-v1", n_envs=2, seed=0), n_steps=1024, batch_size=128, **TINY)
    with th.no_grad():
        model.policy.log_std.fill_(-0.7)
    collect(model)
    buffer = model.rollout_buffer
    observations = th.as_tensor(buffer.observations.reshape(-1, 3))
    actions = th.as_tensor(buffer.actions.reshape(-1, 1))
    with th.no_grad():
        distribution = model.policy.get_distribution(observations).distribution
    assert th.allclose(distribution.stddev, th.tensor(np.exp(-0.7), dtype=th.float32))
    standardised = ((actions - distribution.mean) / distribution.stddev).flatten()
    assert len(standardised) == 2048
    assert abs(standardised.mean().item()) < 0.1
    assert abs(standardised.var().item() - 1.0) < 0.1


class CountingEnv(gym.Env):
    """Observes how many steps its episode has run and is rewarded that count; only a time limit ends it."""

    observation_space = gym.spaces.Box(0.0, 10.0, (1,), dtype=np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, (1,), dtype=np.float32)

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self.count = 0
        return np.array([0.0], dtype=np.float32), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        self.count += 1
        return np.array([self.count], dtype=np.float32), float(self.count), False, False, {}


def test_truncated_episodes_bootstrap_with_the_discounted_terminal_value() -> None:
    gamma, n_steps, limits = 0.9, 20, (5, 4)
    env = DummyVecEnv([lambda limit=limit: gym.wrappers.TimeLimit(CountingEnv(), limit) for limit in limits])
    model = TRPO("MlpPolicy", env, n_steps=n_steps, batch_size=n_steps, gamma=gamma, **TINY)
    collect(model)

    expected = np.empty((n_steps, len(limits)), dtype=np.float32)
    for env_index, limit in enumerate(limits):
        counts = np.arange(n_steps) % limit + 1
        expected[:, env_index] = counts
        # The critic's value of the observation the time limit cut the episode at, as the rollout computes it
        with th.no_grad():
            terminal_value = model.policy.predict_values(model.policy.obs_to_tensor(np.array([limit], np.float32))[0])
        column = expected[:, env_index]
        column[counts == limit] += gamma * terminal_value.item()
    assert np.array_equal(model.rollout_buffer.rewards, expected)
    # A sanity check that the bootstrap is not negligible here
    assert not np.allclose(model.rollout_buffer.rewards[4, 0], 5.0)


def test_npg_step_and_logged_gain_match_a_dense_solve() -> None:
    # Without advantage normalisation L(θ_old) = mean advantage ≠ 0, so the gain and L(θ_new) differ
    model = NPG(
        "MlpPolicy",
        make_vec_env("Pendulum-v1", n_envs=1, seed=0),
        n_steps=64,
        batch_size=64,
        cg_max_steps=64,
        normalize_advantage=False,
        target_kl=0.01,
        **TINY,
    )
    actor = model.actor_parameters
    n_actor = sum(param.numel() for param in actor)
    assert model.cg_max_steps >= n_actor
    collect(model)
    samples = next(model.rollout_buffer.get(batch_size=None))
    surrogate = ImportanceSampledSurrogate(model.policy, samples, normalize_advantage=False)
    evaluation = surrogate.evaluate()
    objective_before = evaluation.objective.item()
    assert abs(objective_before) > 1e-3
    gradient = flat_gradient(evaluation.objective, actor).double()
    hessian = dense_kl_hessian(model.policy, samples.observations, actor).detach().double()
    theta_old = flat_parameters(actor)

    model.train()

    damped = hessian + model.cg_damping * th.eye(n_actor, dtype=th.float64)
    direction = th.linalg.solve(damped, gradient)
    # The step is sized with the damped quadratic form sᵀ(F + λI)s
    step_size = np.sqrt(2.0 * model.target_kl / th.dot(direction, damped @ direction).item())
    expected = step_size * direction
    delta = (flat_parameters(actor) - theta_old).double()
    assert th.allclose(delta, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    logged = model.logger.name_to_value
    assert logged["train/step_size"] == pytest.approx(step_size, rel=1e-4)
    with th.no_grad():
        gain = surrogate.evaluate().objective.item() - objective_before
    assert gain > 0
    assert logged["train/policy_objective"] == pytest.approx(gain, rel=1e-4)


def test_npg_with_a_capped_conjugate_gradient_takes_and_logs_its_iterate() -> None:
    cg_max_steps = 3
    model = NPG(
        "MlpPolicy",
        make_vec_env("Pendulum-v1", n_envs=1, seed=0),
        n_steps=64,
        batch_size=64,
        cg_max_steps=cg_max_steps,
        cg_tolerance=0.0,
        **TINY,
    )
    actor = model.actor_parameters
    collect(model)
    samples = next(model.rollout_buffer.get(batch_size=None))
    gradient = flat_gradient(ImportanceSampledSurrogate(model.policy, samples, True).evaluate().objective, actor).double()
    hessian = dense_kl_hessian(model.policy, samples.observations, actor).detach().double()
    damped = hessian + model.cg_damping * th.eye(len(gradient), dtype=th.float64)
    theta_old = flat_parameters(actor)

    model.train()

    # Textbook conjugate gradient from x = 0, stopped after cg_max_steps products
    x, residual = th.zeros_like(gradient), gradient.clone()
    direction = residual.clone()
    for _ in range(cg_max_steps):
        alpha = th.dot(residual, residual) / th.dot(direction, damped @ direction)
        x, new_residual = x + alpha * direction, residual - alpha * (damped @ direction)
        direction = new_residual + th.dot(new_residual, new_residual) / th.dot(residual, residual) * direction
        residual = new_residual
    expected = np.sqrt(2.0 * model.target_kl / th.dot(x, damped @ x).item()) * x
    delta = (flat_parameters(actor) - theta_old).double()
    assert th.allclose(delta, expected, rtol=1e-3, atol=1e-3 * expected.abs().max().item())
    logged = model.logger.name_to_value
    assert logged["train/cg_iterations"] == cg_max_steps
    assert logged["train/cg_residual"] == pytest.approx(th.linalg.norm(gradient - damped @ x).item(), rel=1e-3)


def test_surrogate_away_from_theta_old_is_the_importance_weighted_mean_advantage() -> None:
    # At θ_old the ratio is 1 and only its gradient matters to a step; away from it, the value decides the line
    # search: mean(π_θ(a|s) / π_old(a|s) · Â), with Â standardised by the (unbiased) standard deviation
    model = NPG("MlpPolicy", make_vec_env("Pendulum-v1", n_envs=1, seed=0), n_steps=64, batch_size=64, **TINY)
    collect(model)
    samples = next(model.rollout_buffer.get(batch_size=None))
    surrogate = ImportanceSampledSurrogate(model.policy, samples, normalize_advantage=True)
    with th.no_grad():
        old_mean, old_std = model.policy.get_distribution(samples.observations).distribution.mean, model.policy.log_std.exp()
        for param in model.actor_parameters:
            param.add_(0.3 * th.randn_like(param))
        new_mean, new_std = model.policy.get_distribution(samples.observations).distribution.mean, model.policy.log_std.exp()
        objective = surrogate.evaluate().objective.item()

    def log_density(mean: th.Tensor, std: th.Tensor) -> th.Tensor:
        actions = samples.actions.double()
        terms = -0.5 * ((actions - mean.double()) / std.double()) ** 2 - th.log(std.double()) - 0.5 * np.log(2 * np.pi)
        return terms.sum(dim=1)

    advantages = samples.advantages.double()
    advantages = (advantages - advantages.mean()) / advantages.std(correction=1)
    ratio = th.exp(log_density(new_mean, new_std) - log_density(old_mean, old_std))
    assert abs(ratio.log()).max() > 0.1  # far enough from θ_old for a linearised ratio to differ
    assert objective == pytest.approx((ratio * advantages).mean().item(), rel=1e-4)


def test_trpo_logs_the_surrogate_gain_of_its_accepted_step() -> None:
    # As NPG's: L(θ_new) − L(θ_old), which differs from L(θ_new) without advantage normalisation
    env = make_vec_env("Pendulum-v1", n_envs=1, seed=0)
    model = TRPO("MlpPolicy", env, n_steps=64, batch_size=64, normalize_advantage=False, **TINY)
    collect(model)
    surrogate = ImportanceSampledSurrogate(model.policy, next(model.rollout_buffer.get(batch_size=None)), False)
    objective_before = surrogate.evaluate().objective.item()
    assert abs(objective_before) > 1e-3
    model.train()
    logged = model.logger.name_to_value
    assert logged["train/is_line_search_success"] == 1.0
    with th.no_grad():
        gain = surrogate.evaluate().objective.item() - objective_before
    assert gain > 0 and logged["train/policy_objective"] == pytest.approx(gain, rel=1e-4)


def test_logged_value_loss_is_the_last_critic_epoch_s_mean(monkeypatch: pytest.MonkeyPatch) -> None:
    env = make_vec_env("Pendulum-v1", n_envs=1, seed=0)
    model = TRPO("MlpPolicy", env, n_steps=64, batch_size=16, n_critic_updates=3, learning_rate=0.1, **TINY)
    collect(model)
    losses: list[float] = []
    minibatch_targets: list[th.Tensor] = []
    regression_step = model._critic_regression_step

    def recording_step() -> Any:
        step = regression_step()

        def recorded(inputs: Any, targets: th.Tensor) -> th.Tensor:
            loss = step(inputs, targets)
            losses.append(loss.item())
            minibatch_targets.append(targets.detach().clone())
            return loss

        return recorded

    monkeypatch.setattr(model, "_critic_regression_step", recording_step)
    model.train()
    assert len(losses) == 3 * 4  # epochs × minibatches
    # Each epoch's minibatches partition the rollout: batch_size rows each, every return once
    returns = th.sort(th.as_tensor(model.rollout_buffer.returns).flatten()).values
    assert all(len(targets) == 16 for targets in minibatch_targets)
    for epoch in range(3):
        assert th.equal(th.sort(th.cat(minibatch_targets[4 * epoch : 4 * epoch + 4]).flatten()).values, returns)
    logged = model.logger.name_to_value["train/value_loss"]
    assert logged == pytest.approx(np.mean(losses[-4:]), rel=1e-5)
    assert logged != pytest.approx(np.mean(losses), rel=1e-2)


def test_logged_explained_variance_is_of_the_rollout_values_for_its_returns() -> None:
    model = TRPO("MlpPolicy", make_vec_env("Pendulum-v1", n_envs=1, seed=0), n_steps=64, batch_size=64, **TINY)
    collect(model)
    values, returns = model.rollout_buffer.values.flatten(), model.rollout_buffer.returns.flatten()
    expected = 1 - np.var(returns - values) / np.var(returns)
    model.train()
    assert model.logger.name_to_value["train/explained_variance"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("algo", [NPG, TRPO])
def test_step_to_a_policy_torch_refuses_is_not_taken(algo: type[NPG]) -> None:
    # A step that drives log σ to -1e4 makes σ underflow to 0, which torch's Normal refuses with a ValueError: the
    # update must be skipped (NPG) or the line search must reject the trial (TRPO), never crash or keep the step
    model = algo("MlpPolicy", "Pendulum-v1", n_steps=64, batch_size=64, policy_kwargs=dict(net_arch=[8]), seed=0)
    model.learn(64)
    surrogate = ImportanceSampledSurrogate(model.policy, next(model.rollout_buffer.get(batch_size=None)), True)
    before = model._actor_parameters_vector().clone()
    direction = th.cat([th.full_like(p, -1e4 if p is model.policy.log_std else 0.0).flatten() for p in model.actor_parameters])
    assert bool(th.isfinite(before + direction).all())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step = model._take_step(surrogate, direction, 1.0, surrogate.evaluate().objective.item())
    assert not step.accepted and step.step_size == 0.0
    assert th.equal(model._actor_parameters_vector(), before)
    if algo is NPG:
        assert any("not finite" in str(warning.message) for warning in caught)


@pytest.mark.parametrize("algo", [NPG, TRPO])
def test_logged_kl_is_the_closed_form_kl_from_old_to_new(algo: type[NPG]) -> None:
    # The trust region is KL(π_old ‖ π_new); the reverse direction differs at third order in the step, so a large
    # δ and a moving σ tell the two apart. Checked with the Gaussian's closed form, not with our mean_kl.
    model = algo(
        "MlpPolicy", make_vec_env("Pendulum-v1", n_envs=1, seed=0), n_steps=256, batch_size=256, target_kl=1.0, **TINY
    )
    collect(model)
    observations = th.as_tensor(model.rollout_buffer.observations.reshape(-1, 3))
    with th.no_grad():
        old = model.policy.get_distribution(observations).distribution
        mean_old, std_old = old.loc.clone(), old.scale.clone()
    model.train()
    with th.no_grad():
        new = model.policy.get_distribution(observations).distribution
        mean_new, std_new = new.loc, new.scale

    def gaussian_kl(mean_p: th.Tensor, std_p: th.Tensor, mean_q: th.Tensor, std_q: th.Tensor) -> float:
        per_dimension = th.log(std_q / std_p) + (std_p**2 + (mean_p - mean_q) ** 2) / (2 * std_q**2) - 0.5
        return per_dimension.sum(dim=1).mean().item()

    forward = gaussian_kl(mean_old, std_old, mean_new, std_new)
    reverse = gaussian_kl(mean_new, std_new, mean_old, std_old)
    assert forward > 0.1
    assert abs(forward - reverse) > 0.02 * forward, "the step does not tell the two directions apart"
    assert model.logger.name_to_value["train/kl_divergence"] == pytest.approx(forward, rel=1e-4)


class TerminatingEnv(gym.Env):
    """Rewarded its step count; terminates (no time limit) at its third step."""

    observation_space = gym.spaces.Box(0.0, 10.0, (1,), dtype=np.float32)
    action_space = gym.spaces.Box(-0.1, 0.1, (1,), dtype=np.float32)

    def __init__(self) -> None:
        self.received: list[np.ndarray] = []

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self.count = 0
        return np.array([0.0], dtype=np.float32), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        self.received.append(np.array(action))
        self.count += 1
        return np.array([self.count], dtype=np.float32), float(self.count), self.count == 3, False, {}


def test_terminated_episodes_are_not_bootstrapped() -> None:
    # only a time limit's cut adds γ V(s_T); a real termination keeps its reward
    env = DummyVecEnv([TerminatingEnv])
    model = TRPO("MlpPolicy", env, n_steps=12, batch_size=12, n_critic_updates=1, **TINY)
    collect(model)
    assert np.array_equal(model.rollout_buffer.rewards[:, 0], (np.arange(12) % 3 + 1).astype(np.float32))


def test_returns_stop_at_episode_ends() -> None:
    # with gae_lambda = 1 the returns are the discounted sums of each episode's rewards: no value of the next
    # episode's states leaks in, neither inside the rollout (episode starts) nor after its last, terminal step (dones)
    env = DummyVecEnv([TerminatingEnv])
    model = TRPO("MlpPolicy", env, n_steps=12, batch_size=12, n_critic_updates=1, gamma=0.9, gae_lambda=1.0, **TINY)
    with th.no_grad():
        model.policy.value_net.bias.fill_(1.0)  # V ≠ 0 everywhere (at a zero observation too), so that a leak shows
    collect(model)
    episode = [1 + 0.9 * 2 + 0.81 * 3, 2 + 0.9 * 3, 3.0]
    assert np.allclose(model.rollout_buffer.returns[:, 0], episode * 4, atol=1e-4)


def test_box_actions_are_clipped_for_the_env_but_stored_unclipped() -> None:
    # σ = 1 against bounds ±0.1: most draws fall outside; the env sees them clipped, the buffer the draws
    env = DummyVecEnv([TerminatingEnv])
    model = TRPO("MlpPolicy", env, n_steps=64, batch_size=64, n_critic_updates=1, **TINY)
    collect(model)
    received = np.concatenate(env.envs[0].unwrapped.received)
    assert np.all(np.abs(received) <= 0.1 + 1e-7)
    stored = model.rollout_buffer.actions.flatten()
    assert np.mean(np.abs(stored) > 0.1) > 0.5
    assert np.allclose(np.clip(stored, -0.1, 0.1), received)


@pytest.mark.parametrize("n_rows", [1, 2, 3, 64])
def test_normalized_advantages(n_rows: int) -> None:
    # SB3's rule, used by the surrogate, PPOKL's minibatches and ACKTR: standardised with the unbiased std as soon as
    # there are two rows; a single row has no spread and is left as it is
    advantages = th.randn(n_rows, generator=th.Generator().manual_seed(n_rows)) * 3.0 + 1.0
    normalized = normalized_advantages(advantages)
    if n_rows == 1:
        assert th.equal(normalized, advantages)
        return
    values = advantages.double().numpy()
    expected = (values - values.mean()) / (values.std(ddof=1) + 1e-8)
    assert np.allclose(normalized.double().numpy(), expected, rtol=1e-5, atol=1e-6)
