import warnings
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from gymnasium import spaces
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.envs import SimpleMultiObsEnv
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from stable_baselines3.common.vec_env import DummyVecEnv
from torch import nn

from sb3_trust import PPOKL
from sb3_trust.common import on_policy
from sb3_trust.common.distributions import detach_distribution, mean_kl
from sb3_trust.ppokl import adapt_kl_coef
from sb3_trust.ppokl import ppokl as ppokl_module

SMALL = dict(n_steps=64, batch_size=32, n_epochs=2, policy_kwargs=dict(net_arch=[16]), seed=0)
RULE = dict(target_kl=0.01, tolerance=1.5, factor=2.0, kl_coef_min=1e-4, kl_coef_max=1e4)


@pytest.mark.parametrize(
    "kl, expected",
    [
        (0.016, 2.0),  # above 1.5·d_targ: β doubles
        (0.015, 1.0),  # on the band's edge: unchanged (the paper's inequalities are strict)
        (0.010, 1.0),  # inside
        (0.0067, 1.0),  # inside, just above d_targ / 1.5
        (0.0066, 0.5),  # below d_targ / 1.5: β halves
        (0.0, 0.5),
    ],
)
def test_adaptation_rule_matches_the_paper(kl: float, expected: float) -> None:
    assert adapt_kl_coef(1.0, kl, **RULE) == expected


@pytest.mark.parametrize(
    "kl, expected",
    [
        (0.031, 5.0),  # above 3·d_targ: β × 5
        (0.02, 1.0),  # above 1.5·d_targ but inside the wider band: unchanged
        (0.005, 1.0),  # below d_targ / 1.5 but inside the wider band: unchanged
        (0.0033, 0.2),  # below d_targ / 3: β / 5
    ],
)
def test_adaptation_rule_uses_the_given_tolerance_and_factor(kl: float, expected: float) -> None:
    # Not the paper's 1.5 and 2: a rule that hard-codes either gives another β here
    rule = {**RULE, "tolerance": 3.0, "factor": 5.0}
    assert adapt_kl_coef(1.0, kl, **rule) == pytest.approx(expected, rel=1e-12)


def test_adaptation_rule_is_bounded_and_repeats() -> None:
    kl_coef = 1.0
    for _ in range(20):
        kl_coef = adapt_kl_coef(kl_coef, 1.0, **RULE)
    assert kl_coef == RULE["kl_coef_max"]
    for _ in range(40):
        kl_coef = adapt_kl_coef(kl_coef, 0.0, **RULE)
    assert kl_coef == RULE["kl_coef_min"]


class RolloutKLRecorder:
    """Freezes π_old at the end of each rollout, to measure the analytic KL of the following update."""

    def __init__(self, model: PPOKL) -> None:
        self.model, self.records = model, []
        original_train = model.train

        def train() -> None:
            samples = next(model.rollout_buffer.get(batch_size=None))
            with th.no_grad():
                old = detach_distribution(model.policy.get_distribution(samples.observations))
            kl_coef = model.kl_coef
            original_train()
            with th.no_grad():
                kl = mean_kl(old, model.policy.get_distribution(samples.observations)).item()
            self.records.append((kl_coef, kl, model.kl_coef, dict(model.logger.name_to_value)))

        model.train = train  # type: ignore[method-assign]


@pytest.mark.parametrize("target_kl, direction", [(1e-7, 2.0), (10.0, 0.5)])
def test_kl_coef_adapts_after_each_update_from_the_rollout_kl(target_kl: float, direction: float) -> None:
    model = PPOKL("MlpPolicy", make_vec_env("Pendulum-v1", n_envs=2, seed=0), target_kl=target_kl, **SMALL)
    recorder = RolloutKLRecorder(model)
    model.learn(3 * 128)
    assert len(recorder.records) == 3
    for kl_coef_before, kl, kl_coef_after, logged in recorder.records:
        assert logged["train/kl_divergence"] == pytest.approx(kl, rel=1e-5)  # the analytic KL on the rollout
        assert kl_coef_after == pytest.approx(kl_coef_before * direction)
        assert logged["train/kl_coef"] == kl_coef_after and logged["train/kl_coef_used"] == kl_coef_before
        for key in ("policy_gradient_loss", "kl_penalty", "value_loss", "entropy_loss", "approx_kl", "explained_variance"):
            assert f"train/{key}" in logged


@pytest.mark.parametrize("target_kl, direction", [(1e-7, 3.0), (10.0, 1 / 3)])
def test_kl_coef_adapts_by_the_configured_factor(target_kl: float, direction: float) -> None:
    # kl_coef_factor and kl_tolerance reach the rule: β moves by 3 per update, not the paper's 2
    settings = {**SMALL, "target_kl": target_kl, "kl_coef_factor": 3.0, "kl_tolerance": 1.2}
    model = PPOKL("MlpPolicy", make_vec_env("Pendulum-v1", n_envs=2, seed=0), **settings)
    recorder = RolloutKLRecorder(model)
    model.learn(3 * 128)
    assert len(recorder.records) == 3
    for kl_coef_before, _, kl_coef_after, logged in recorder.records:
        assert kl_coef_after == pytest.approx(kl_coef_before * direction)
        assert logged["train/kl_coef"] == kl_coef_after
    assert model.kl_coef == pytest.approx(direction**3)


def _after_one_update(target_kl: float) -> PPOKL:
    model = PPOKL("MlpPolicy", make_vec_env("Pendulum-v1", n_envs=2, seed=0), target_kl=target_kl, **SMALL)
    model.learn(128)
    return model


def test_kl_coef_reads_the_rollout_kl_at_the_band_edges() -> None:
    # The same seed moves the policy by the same d whatever the target (β starts at 1 either way): targets 1% on
    # either side of d/1.5 and 1.5·d pin the KL that the rule reads to within 1% of the logged rollout KL
    kl = _after_one_update(1.0).logger.name_to_value["train/kl_divergence"]
    assert _after_one_update(1.01 * kl / 1.5).kl_coef == 1.0
    assert _after_one_update(0.99 * kl / 1.5).kl_coef == 2.0
    assert _after_one_update(0.99 * 1.5 * kl).kl_coef == 1.0
    assert _after_one_update(1.01 * 1.5 * kl).kl_coef == 0.5


def test_kl_coef_reads_the_configured_tolerance() -> None:
    # The first update moves the policy by the same d whatever the target and band: d_targ = 2·d lies inside the band
    # of tolerance 4 (β stays) but below d_targ / 1.5 (β halves), so the rule must be given kl_tolerance
    kl = _after_one_update(1.0).logger.name_to_value["train/kl_divergence"]
    for kl_tolerance, kl_coef in ((4.0, 1.0), (1.5, 0.5)):
        model = PPOKL(
            "MlpPolicy", make_vec_env("Pendulum-v1", n_envs=2, seed=0), target_kl=2 * kl, kl_tolerance=kl_tolerance, **SMALL
        )
        model.learn(128)
        assert model.kl_coef == kl_coef


def test_kl_coef_stays_when_no_minibatch_moved_the_policy() -> None:
    model = PPOKL("MlpPolicy", make_vec_env("CartPole-v1", n_envs=1, seed=0), target_kl=10.0, **SMALL)
    model.learn(64)
    kl_coef = model.kl_coef
    model.rollout_buffer.advantages[:] = np.nan  # every minibatch's loss is non-finite
    with pytest.warns(RuntimeWarning, match="minibatches skipped"):
        model.train()
    # With target_kl = 10 any real update would halve β; a skipped one must leave it as it was
    assert model.kl_coef == kl_coef


def test_kl_coef_survives_save_and_load(tmp_path: Any) -> None:
    env = make_vec_env("CartPole-v1", n_envs=2, seed=0)
    model = PPOKL("MlpPolicy", env, target_kl=1e-7, **SMALL)
    model.learn(256)
    assert model.kl_coef == 4.0
    model.save(tmp_path / "model")
    loaded = PPOKL.load(tmp_path / "model", env=env)
    assert loaded.kl_coef == 4.0
    recorder = RolloutKLRecorder(loaded)
    loaded.learn(128, reset_num_timesteps=False)
    assert recorder.records[0][0] == 4.0 and loaded.kl_coef == 8.0
    obs = np.stack([env.observation_space.sample() for _ in range(8)])
    assert np.array_equal(
        PPOKL.load(tmp_path / "model").predict(obs, deterministic=True)[0], model.predict(obs, deterministic=True)[0]
    )


@pytest.mark.parametrize("clip_range, matches", [(None, True), (0.01, False)])
def test_zero_penalty_without_clipping_is_the_importance_sampling_gradient(clip_range: Any, matches: bool) -> None:
    settings = {**SMALL, "normalize_advantage": False, "vf_coef": 0.0, "ent_coef": 0.0, "clip_range": clip_range}
    model = PPOKL("MlpPolicy", make_vec_env("Pendulum-v1", n_envs=2, seed=0), **settings)
    model.learn(128)  # fills the buffer and moves the policy away from the one that collected it
    model.kl_coef = 0.0
    samples = next(model.rollout_buffer.get(batch_size=None))
    with th.no_grad():
        old_distribution = detach_distribution(model.policy.get_distribution(samples.observations))
        # Move the policy so the ratios are not all 1 (the clip then matters)
        for param in model.policy.parameters():
            param.add_(0.1 * th.randn_like(param))
    indices = th.arange(len(samples.actions))
    clip = None if model.clip_range is None else model.clip_range(1.0)
    loss, _ = model._minibatch_loss(samples, samples.actions, old_distribution, indices, clip, None)
    params = [p for p in model.policy.parameters() if p.requires_grad]
    ours = th.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)

    log_prob = model.policy.get_distribution(samples.observations).log_prob(samples.actions)
    plain = -(th.exp(log_prob - samples.old_log_prob) * samples.advantages).mean()
    expected = th.autograd.grad(plain, params, allow_unused=True, materialize_grads=True)
    close = all(th.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(ours, expected, strict=True))
    assert close == matches


class TwoDimBoxEnv(gym.Env):
    """Random observations, a 2-d action rewarded for tracking them: the KL must sum over action dimensions."""

    observation_space = spaces.Box(-1.0, 1.0, (3,), np.float32)
    action_space = spaces.Box(-1.0, 1.0, (2,), np.float32)

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self.n_steps = 0
        self.obs = self.np_random.uniform(-1.0, 1.0, 3).astype(np.float32)
        return self.obs, {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        reward = -0.1 * float(np.sum((action - self.obs[:2]) ** 2))
        self.n_steps += 1
        self.obs = self.np_random.uniform(-1.0, 1.0, 3).astype(np.float32)
        return self.obs, reward, False, self.n_steps >= 16, {}


def _raise_not_implemented(*args: Any) -> th.Tensor:
    raise NotImplementedError


@pytest.mark.parametrize("kl_estimate", ["analytic", "sample"])
def test_minibatch_loss_and_gradient_match_the_written_out_loss(kl_estimate: str, monkeypatch: pytest.MonkeyPatch) -> None:
    kl_coef, clip_range, clip_range_vf, ent_coef, vf_coef = 0.7, 0.1, 0.2, 0.05, 0.5
    settings = {**SMALL, "clip_range": clip_range, "clip_range_vf": clip_range_vf, "ent_coef": ent_coef, "vf_coef": vf_coef}
    model = PPOKL("MlpPolicy", DummyVecEnv([TwoDimBoxEnv] * 2), normalize_advantage=True, **settings)
    model.learn(128)  # fills the rollout buffer
    model.kl_coef = kl_coef
    policy = model.policy
    samples = next(model.rollout_buffer.get(batch_size=None))

    def heads(obs: th.Tensor) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
        # Mean, σ and value straight from the networks, bypassing SB3's distribution classes
        latent_pi, latent_vf = policy.mlp_extractor(policy.extract_features(obs))
        mean = policy.action_net(latent_pi)
        return mean, th.exp(policy.log_std).expand_as(mean), policy.value_net(latent_vf).flatten()

    generator = th.Generator().manual_seed(0)
    with th.no_grad():
        old_distribution = detach_distribution(policy.get_distribution(samples.observations))
        old_mean, old_std, _ = heads(samples.observations)
        # Log-probabilities under π_old, as train() sees them: the ratios then measure only the perturbation below
        samples = samples._replace(old_log_prob=th.distributions.Normal(old_mean, old_std).log_prob(samples.actions).sum(1))
        for param in policy.parameters():
            param.add_(0.1 * th.randn(param.shape, generator=generator))
        policy.log_std.add_(th.tensor([0.1, -0.1]))  # σ moves both ways, so KL(old‖new) ≠ KL(new‖old)
    indices = th.randperm(len(samples.actions), generator=generator)[:32]
    if kl_estimate == "sample":
        # As for a distribution without a closed-form KL: _mean_kl must fall back to the sample estimate
        monkeypatch.setattr(ppokl_module, "mean_kl", _raise_not_implemented)
    loss, terms = model._minibatch_loss(samples, samples.actions, old_distribution, indices, clip_range, clip_range_vf)

    mean, std, values = heads(samples.observations[indices])
    old, new = th.distributions.Normal(old_mean[indices], old_std[indices]), th.distributions.Normal(mean, std)
    advantages = samples.advantages[indices]
    advantages = (advantages - advantages.mean()) / (advantages.std(correction=1) + 1e-8)  # torch's default std: Bessel
    log_ratio = new.log_prob(samples.actions[indices]).sum(1) - samples.old_log_prob[indices]
    ratio = th.exp(log_ratio)
    clip_fraction = ((ratio - 1).abs() > clip_range).float().mean().item()
    assert 0 < clip_fraction < 1  # both branches of the clipped objective are exercised
    policy_loss = -th.min(ratio * advantages, th.clamp(ratio, 1 - clip_range, 1 + clip_range) * advantages).mean()
    if kl_estimate == "analytic":
        kl = th.distributions.kl_divergence(old, new).sum(1).mean()
        reverse_kl = th.distributions.kl_divergence(new, old).sum(1).mean()
        assert abs(kl.item() - reverse_kl.item()) > 0.05 * kl.item()
    else:
        kl = th.mean(ratio - 1 - log_ratio)
        assert abs(kl.item() - th.mean(-log_ratio).item()) > 0.05 * kl.item()
    old_values = samples.old_values[indices]
    assert 0 < ((values - old_values).abs() > clip_range_vf).float().mean() < 1  # the value clip bites on some rows
    clipped_values = old_values + th.clamp(values - old_values, -clip_range_vf, clip_range_vf)
    value_loss = th.mean((samples.returns[indices] - clipped_values) ** 2)
    entropy_loss = -new.entropy().sum(1).mean()
    expected = policy_loss + kl_coef * kl + vf_coef * value_loss + ent_coef * entropy_loss
    assert kl_coef * kl.item() > 0.01 * abs(expected.item())  # the penalty is not negligible in the loss

    th.testing.assert_close(loss, expected, rtol=1e-6, atol=0.0)
    assert terms["clip"] == pytest.approx(clip_fraction)
    assert terms["kl_penalty"] == pytest.approx(kl_coef * kl.item(), rel=1e-6)
    assert terms["pg"] == pytest.approx(policy_loss.item(), rel=1e-6)
    assert terms["value"] == pytest.approx(value_loss.item(), rel=1e-6)
    params = [p for p in policy.parameters() if p.requires_grad]
    ours = th.autograd.grad(loss, params, retain_graph=True)
    hand_written = th.autograd.grad(expected, params)
    for a, b in zip(ours, hand_written, strict=True):
        th.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("env_id", ["Pendulum-v1", "CartPole-v1"])
def test_every_action_space_and_gsde(env_id: str) -> None:
    from tests.test_algorithms import action_space_envs

    for make_env in action_space_envs().values():
        PPOKL("MlpPolicy", DummyVecEnv([make_env] * 2), **SMALL).learn(128)
    model = PPOKL("MlpPolicy", make_vec_env(env_id, n_envs=2, seed=0), use_sde=env_id == "Pendulum-v1", **SMALL)
    model.learn(128)
    assert all(th.isfinite(p).all() for p in model.policy.parameters())


def test_dict_observations_and_clipping_options() -> None:
    env = DummyVecEnv([lambda: SimpleMultiObsEnv(random_start=False)])
    model = PPOKL("MultiInputPolicy", env, clip_range=0.2, clip_range_vf=0.5, **SMALL)
    model.learn(128)
    assert model.logger.name_to_value["train/clip_range"] == 0.2
    assert "train/clip_fraction" in model.logger.name_to_value


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(target_kl=0.0), "target_kl"),
        (dict(kl_coef=0.0), "kl_coef"),
        (dict(kl_coef=-1.0), "kl_coef"),
        (dict(kl_tolerance=1.0), "kl_tolerance"),
        (dict(kl_coef_factor=0.5), "kl_coef_factor"),
        (dict(kl_coef_factor=float("inf")), "kl_coef_factor"),
        (dict(kl_tolerance=float("inf")), "kl_tolerance"),
        (dict(gamma=1.5), "gamma"),
        (dict(gae_lambda=float("nan")), "gae_lambda"),
        (dict(kl_coef_min=2.0, kl_coef_max=1.0), "kl_coef_min"),
        (dict(kl_coef=1e5), "kl_coef"),
        (dict(batch_size=1), "greater than 1"),  # as SB3's PPO: one sample has no advantages to normalize
        (dict(n_steps=1, batch_size=2), "normalize_advantage=False"),  # nor has a one-step rollout
        (dict(clip_range=-0.1), "clip_range"),
        (dict(clip_range_vf=0.0), "clip_range_vf"),
        (dict(max_grad_norm=-0.5), "max_grad_norm"),
        (dict(target_kl=float("inf")), "target_kl"),
        (dict(n_epochs=2.0), "n_epochs"),
        (dict(target_kl=None), "target_kl` is the mean KL per update"),  # PPO's default means something else
    ],
)
def test_bad_parameters_fail_at_construction(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PPOKL("MlpPolicy", "CartPole-v1", **kwargs)


class DropoutExtractor(BaseFeaturesExtractor):
    """Features with dropout: a policy whose training-mode outputs are random."""

    def __init__(self, observation_space: spaces.Box, features_dim: int = 16) -> None:
        super().__init__(observation_space, features_dim)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(observation_space.shape)), features_dim), nn.Dropout(0.5))

    def forward(self, observations: th.Tensor) -> th.Tensor:
        return self.net(observations)


def test_rollout_kl_is_measured_in_evaluation_mode() -> None:
    # β's rule reads the KL between the policies that act (evaluation mode, as the rollout ran), not two dropout draws
    policy_kwargs = dict(features_extractor_class=DropoutExtractor, net_arch=[16])
    settings = {**SMALL, "policy_kwargs": policy_kwargs}
    model = PPOKL("MlpPolicy", make_vec_env("Pendulum-v1", n_envs=2, seed=0), **settings)
    recorded: list[tuple[float, float]] = []
    original_train = model.train

    def train() -> None:
        samples = next(model.rollout_buffer.get(batch_size=None))
        model.policy.set_training_mode(False)
        with th.no_grad():
            old = detach_distribution(model.policy.get_distribution(samples.observations))
        original_train()
        model.policy.set_training_mode(False)
        with th.no_grad():
            kl = mean_kl(old, model.policy.get_distribution(samples.observations)).item()
        recorded.append((kl, model.logger.name_to_value["train/kl_divergence"]))

    model.train = train  # type: ignore[method-assign]
    model.learn(128)
    ((kl, logged),) = recorded
    assert kl > 0 and logged == pytest.approx(kl, rel=1e-5)


@pytest.mark.parametrize("env_id", ["Pendulum-v1", "CartPole-v1"])
def test_rollout_passes_in_chunks_equal_one_pass(env_id: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # π_old and the rollout KL are computed in chunks (bounding memory on image observations): with chunks of 7 rows,
    # the update and the logged KL are those of one pass
    models = []
    for chunk_size in (2048, 7):
        monkeypatch.setattr(on_policy, "EVALUATION_CHUNK_SIZE", chunk_size)
        model = PPOKL("MlpPolicy", make_vec_env(env_id, n_envs=2, seed=0), **SMALL)
        recorder = RolloutKLRecorder(model)
        model.learn(2 * 128)
        models.append((model, recorder.records))
    (whole, whole_records), (chunked, chunked_records) = models
    assert len(whole_records) == len(chunked_records) == 2
    for (_, kl, kl_coef, logged), (_, chunked_kl, chunked_kl_coef, chunked_logged) in zip(
        whole_records, chunked_records, strict=True
    ):
        # (float32 round-off of a KL of ~1e-6 on CartPole: hence the absolute tolerance)
        assert chunked_logged["train/kl_divergence"] == pytest.approx(logged["train/kl_divergence"], rel=1e-5, abs=1e-9)
        assert chunked_logged["train/kl_divergence"] == pytest.approx(chunked_kl, rel=1e-5, abs=1e-9)
        assert chunked_kl_coef == kl_coef and chunked_kl == pytest.approx(kl, rel=1e-4, abs=1e-9)
    for a, b in zip(whole.policy.parameters(), chunked.policy.parameters(), strict=True):
        assert th.allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("concatenable", [True, False])
def test_rollout_passes_are_chunked_unless_the_distribution_cannot_be_concatenated(
    concatenable: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(on_policy, "EVALUATION_CHUNK_SIZE", 7)
    if not concatenable:
        monkeypatch.setattr(ppokl_module, "can_concatenate", lambda distribution: False)
    model = PPOKL("MlpPolicy", make_vec_env("Pendulum-v1", n_envs=2, seed=0), **SMALL)
    model.learn(128)  # the rollout is collected and evaluated (in chunks) before train()
    batch_sizes: list[int] = []
    get_distribution = model.policy.get_distribution

    def recording_get_distribution(obs: th.Tensor) -> Any:
        batch_sizes.append(len(obs))
        return get_distribution(obs)

    monkeypatch.setattr(model.policy, "get_distribution", recording_get_distribution)
    model.train()
    # Without gradient: π_old and the rollout KL, in chunks of 7 rows (or one pass of 128); the minibatch losses
    # go through evaluate_actions, not get_distribution
    expected = [7] * 18 + [2] if concatenable else [7, 128]
    assert batch_sizes == expected + ([7] * 18 + [2] if concatenable else [128])


class NormalSubclass(th.distributions.Normal):
    """A distribution whose rows are not selected here (a subclass may hold other state)."""


class SubclassedNormalPolicy(ActorCriticPolicy):
    def get_distribution(self, obs: Any) -> Any:
        distribution = super().get_distribution(obs)
        gaussian = distribution.distribution
        distribution.distribution = NormalSubclass(gaussian.loc, gaussian.scale, validate_args=False)
        return distribution


def test_a_distribution_whose_rows_cannot_be_selected_trains_with_the_sampled_kl(monkeypatch: pytest.MonkeyPatch) -> None:
    # π_old in one pass, minibatch KLs from samples (mean((r - 1) - log r)), the rollout KL analytic (all rows at once)
    monkeypatch.setattr(on_policy, "EVALUATION_CHUNK_SIZE", 7)
    model = PPOKL(SubclassedNormalPolicy, make_vec_env("Pendulum-v1", n_envs=2, seed=0), **SMALL)
    recorder = RolloutKLRecorder(model)
    analytic_calls: list[int] = []
    mean_kl_of = ppokl_module.mean_kl
    monkeypatch.setattr(
        ppokl_module, "mean_kl", lambda old, new: analytic_calls.append(len(new.distribution.loc)) or mean_kl_of(old, new)
    )
    model.learn(2 * 128)
    assert len(recorder.records) == 2
    for _, kl, _, logged in recorder.records:
        assert kl > 0 and logged["train/kl_divergence"] == pytest.approx(kl, rel=1e-5)
    assert analytic_calls == [128, 128]  # only the rollout KL of each update: no minibatch was selected
    assert all(bool(th.isfinite(param).all()) for param in model.policy.parameters())


def test_an_error_inside_the_kl_is_not_taken_for_a_missing_closed_form(monkeypatch: pytest.MonkeyPatch) -> None:
    # Only "no closed form" (NotImplementedError) and "rows not selectable" switch to the sampled KL; a TypeError from
    # inside the KL itself is a bug, and surfaces
    def broken_kl(old: Any, new: Any) -> th.Tensor:
        raise TypeError("a bug inside the KL")

    monkeypatch.setattr(ppokl_module, "mean_kl", broken_kl)
    model = PPOKL("MlpPolicy", make_vec_env("Pendulum-v1", n_envs=2, seed=0), **SMALL)
    with pytest.raises(TypeError, match="a bug inside the KL"):
        model.learn(128)


def test_an_unbounded_kl_coef_max_is_accepted_and_loads(tmp_path: Any) -> None:
    PPOKL("MlpPolicy", "CartPole-v1", n_steps=64, batch_size=32, kl_coef_max=float("inf")).save(tmp_path / "model")
    assert PPOKL.load(tmp_path / "model").kl_coef_max == float("inf")


@pytest.mark.parametrize(
    "batch_size, expected, message", [(48, [48, 16], "last minibatch has 16 transitions"), (256, [64], "one minibatch")]
)
def test_a_batch_size_that_does_not_divide_the_rollout_is_trained_as_ppo_trains_it(
    batch_size: int, expected: list[int], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As SB3's PPO: a warning at construction, and each epoch ends with the shorter minibatch
    with pytest.warns(UserWarning, match=message):
        model = PPOKL("MlpPolicy", "CartPole-v1", **{**SMALL, "batch_size": batch_size})
    sizes: list[int] = []
    minibatch_loss = model._minibatch_loss
    monkeypatch.setattr(model, "_minibatch_loss", lambda *args: sizes.append(len(args[3])) or minibatch_loss(*args))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.learn(64)
    assert sizes == expected * SMALL["n_epochs"]


def test_each_epoch_partitions_the_rollout_into_minibatches_of_batch_size(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every epoch visits each of the rollout's rows exactly once, in minibatches of exactly batch_size rows, shuffled
    model = PPOKL("MlpPolicy", make_vec_env("CartPole-v1", n_envs=2, seed=0), **{**SMALL, "n_epochs": 3})
    received: list[th.Tensor] = []
    minibatch_loss = model._minibatch_loss
    monkeypatch.setattr(model, "_minibatch_loss", lambda *args: received.append(args[3].clone()) or minibatch_loss(*args))
    model.learn(128)
    n_samples, batch_size = 128, SMALL["batch_size"]
    per_epoch = n_samples // batch_size
    assert len(received) == per_epoch * 3
    epochs = [received[i : i + per_epoch] for i in range(0, len(received), per_epoch)]
    for epoch in epochs:
        assert [len(indices) for indices in epoch] == [batch_size] * per_epoch
        assert th.equal(th.sort(th.cat(epoch)).values.cpu(), th.arange(n_samples))
    orders = [th.cat(epoch).cpu() for epoch in epochs]
    assert not th.equal(orders[0], th.arange(n_samples)) and not th.equal(orders[0], orders[1])  # shuffled per epoch


def test_one_step_rollouts_train_without_advantage_normalization() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PPOKL("MlpPolicy", "CartPole-v1", n_steps=1, batch_size=1, normalize_advantage=False).learn(2)


def test_logged_losses_average_every_minibatch_of_the_update(monkeypatch: pytest.MonkeyPatch) -> None:
    # As SB3's PPO: the losses over every minibatch of every epoch (approx_kl over the last epoch only: below)
    model = PPOKL("MlpPolicy", "CartPole-v1", **{**SMALL, "n_epochs": 3})
    terms_of_each_minibatch: list[dict[str, float]] = []
    minibatch_loss = model._minibatch_loss

    def recording_loss(*args: Any) -> Any:
        loss, terms = minibatch_loss(*args)
        terms_of_each_minibatch.append(terms)
        return loss, terms

    monkeypatch.setattr(model, "_minibatch_loss", recording_loss)
    model.learn(64)
    assert len(terms_of_each_minibatch) == 6
    for key, logged_key in (("value", "value_loss"), ("pg", "policy_gradient_loss"), ("kl_penalty", "kl_penalty")):
        expected = np.mean([terms[key] for terms in terms_of_each_minibatch])
        assert model.logger.name_to_value[f"train/{logged_key}"] == pytest.approx(expected)


def test_logged_approx_kl_is_the_sample_estimate_of_the_last_epoch(monkeypatch: pytest.MonkeyPatch) -> None:
    # train/approx_kl is SB3's mean((r - 1) - log r), r = π_θ(a|s) / π_old(a|s) against the rollout's log-probabilities,
    # averaged over the last epoch's minibatches; recomputed here from the policy each minibatch starts from
    model = PPOKL("MlpPolicy", make_vec_env("Pendulum-v1", n_envs=2, seed=0), **{**SMALL, "n_epochs": 3})
    by_hand: list[tuple[float, float]] = []
    minibatch_loss = model._minibatch_loss

    def recording_loss(*args: Any) -> Any:
        samples, indices = args[0], args[3]
        with th.no_grad():  # before this minibatch's optimizer step (the default MlpPolicy has no dropout)
            log_prob = model.policy.get_distribution(samples.observations[indices]).log_prob(samples.actions[indices])
            log_ratio = log_prob - samples.old_log_prob[indices]
            by_hand.append((th.mean(th.exp(log_ratio) - 1 - log_ratio).item(), th.mean(-log_ratio).item()))
        return minibatch_loss(*args)

    monkeypatch.setattr(model, "_minibatch_loss", recording_loss)
    model.learn(128)
    assert len(by_hand) == 12
    last_epoch = np.array(by_hand[-4:])
    expected, minus_log_ratio = last_epoch.mean(axis=0)
    assert expected > 0 and abs(minus_log_ratio - expected) > 0.05 * expected  # mean(-log r) is another number
    assert model.logger.name_to_value["train/approx_kl"] == pytest.approx(expected, rel=1e-6)


def test_a_model_saved_with_one_row_minibatches_still_loads(tmp_path: Any) -> None:
    # Refused at construction as by SB3's PPO, but older saves hold it: they load and train (without normalization)
    model = PPOKL("MlpPolicy", "CartPole-v1", n_steps=8, batch_size=2, n_epochs=1)
    model.batch_size = 1
    model.save(tmp_path / "model")
    PPOKL.load(tmp_path / "model", env=make_vec_env("CartPole-v1")).learn(8)
