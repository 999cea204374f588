"""``python -m sb3_trust.train`` (what ``make train`` runs) and its reading of the zoo entries."""

import warnings
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from stable_baselines3.common.callbacks import ConvertCallback, ProgressBarCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.vec_env import VecFrameStack, VecNormalize

from sb3_trust import NPG, TRPO, train
from sb3_trust.train import TRAIN_RUN_KEYS, keyword_arguments, main, normalize_kwargs, split_run_keys


def test_train_evaluates_and_saves_with_the_normalization(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # HalfCheetah-v5's entry normalizes: the statistics are saved beside the checkpoint
    arguments = ["--algo", "trpo", "--env", "HalfCheetah-v5", "--timesteps", "256", "--eval-episodes", "1"]
    mean_return = main([*arguments, "--output", str(tmp_path)])
    checkpoint = tmp_path / "trpo_HalfCheetah-v5_seed0.zip"
    assert checkpoint.exists() and checkpoint.with_suffix(".vecnormalize.pkl").exists()
    output = capsys.readouterr().out
    assert f"Mean return over 1 episodes: {mean_return:.1f}" in output and str(checkpoint.resolve()) in output


def test_train_never_overwrites_an_earlier_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    arguments = ["--algo", "trpo", "--env", "HalfCheetah-v5", "--timesteps", "64", "--eval-episodes", "1"]
    main([*arguments, "--output", str(tmp_path)])
    first = tmp_path / "trpo_HalfCheetah-v5_seed0.zip"
    saved = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    assert set(saved) == {first.name, "trpo_HalfCheetah-v5_seed0.vecnormalize.pkl"}
    # An earlier run's statistics alone also keep their name
    (tmp_path / "trpo_HalfCheetah-v5_seed0_2.vecnormalize.pkl").write_bytes(b"user data")
    capsys.readouterr()
    main([*arguments, "--seed", "0", "--output", str(tmp_path)])
    second = tmp_path / "trpo_HalfCheetah-v5_seed0_3.zip"
    assert second.exists() and second.with_suffix(".vecnormalize.pkl").exists()
    assert f"Checkpoint: {second.resolve()}" in capsys.readouterr().out
    for name, content in saved.items():
        assert (tmp_path / name).read_bytes() == content
    assert (tmp_path / "trpo_HalfCheetah-v5_seed0_2.vecnormalize.pkl").read_bytes() == b"user data"


def test_an_interrupted_run_is_saved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    learn = TRPO.learn

    def interrupted_learn(self: TRPO, *args: Any, **kwargs: Any) -> TRPO:
        learn(self, 64)
        raise KeyboardInterrupt

    monkeypatch.setattr(TRPO, "learn", interrupted_learn)
    with pytest.raises(SystemExit) as stop:
        main(["--algo", "trpo", "--env", "HalfCheetah-v5", "--timesteps", "1000000", "--output", str(tmp_path)])
    assert stop.value.code == 130
    checkpoint = tmp_path / "trpo_HalfCheetah-v5_seed0.zip"
    assert checkpoint.with_suffix(".vecnormalize.pkl").exists()
    assert TRPO.load(checkpoint).num_timesteps == 2048  # one rollout of the entry's 2 envs × 1024 steps
    assert f"Interrupted after 2048 steps, not evaluated. Checkpoint: {checkpoint.resolve()}" in capsys.readouterr().out


def test_an_interrupted_run_closes_its_progress_bar(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    learn = TRPO.learn
    callbacks: list[Any] = []

    def interrupted_learn(self: TRPO, total_timesteps: int, callback: Any = None, **kwargs: Any) -> TRPO:
        callbacks.append(callback)

        def ctrl_c(local_vars: dict[str, Any], global_vars: dict[str, Any]) -> bool:
            raise KeyboardInterrupt

        return learn(self, total_timesteps, callback=[callback, ConvertCallback(ctrl_c)])

    monkeypatch.setattr(TRPO, "learn", interrupted_learn)
    with pytest.raises(SystemExit):
        main(["--algo", "trpo", "--env", "CartPole-v1", "--timesteps", "100000", "--output", str(tmp_path), "--progress-bar"])
    assert isinstance(callbacks[0], ProgressBarCallback) and callbacks[0].pbar.disable


def test_checkpoint_names_count_up_from_the_highest(tmp_path: Path) -> None:
    stem = "trpo_ALE/Pong.v5_seed0"  # a folder in the id, and a dot in the name
    first = train.unused_checkpoint_path(tmp_path, stem)
    assert first == tmp_path / "trpo_ALE" / "Pong.v5_seed0.zip" and first.exists()  # reserved
    (tmp_path / "trpo_ALE" / "Pong.v5_seed0_7.vecnormalize.pkl").touch()
    assert train.unused_checkpoint_path(tmp_path, stem).name == "Pong.v5_seed0_8.zip"
    assert train.unused_checkpoint_path(tmp_path, stem).name == "Pong.v5_seed0_9.zip"
    # Names of other runs do not count
    (tmp_path / "trpo_ALE" / "Pong.v5_seed01_40.zip").touch()
    assert train.unused_checkpoint_path(tmp_path, stem).name == "Pong.v5_seed0_10.zip"


def test_train_says_when_the_env_has_no_entry(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="No entry for Acrobot-v1 .*: npg runs with its 'default' entry"):
        main(["--algo", "npg", "--env", "Acrobot-v1", "--timesteps", "64", "--eval-episodes", "1", "--output", str(tmp_path)])


def test_train_reads_the_entry_of_a_module_prefixed_id(tmp_path: Path) -> None:
    # gym.make reads "module:EnvId" as: import the module, make EnvId; the zoo entry is EnvId's (2 envs here)
    env_id = "gymnasium.envs.classic_control:CartPole-v1"
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "No entry" warning
        main(["--algo", "trpo", "--env", env_id, "--timesteps", "64", "--eval-episodes", "1", "--output", str(tmp_path)])
    model = TRPO.load(tmp_path / "trpo_CartPole-v1_seed0.zip")
    assert model.n_envs == 2 and model.n_steps == 512


def _train_with_config(config_dir: Path, monkeypatch: pytest.MonkeyPatch, env_id: str, *extra: str) -> NPG:
    """
    :param config_dir: folder of an ``npg.yml`` made for the test
    :param monkeypatch: to make it the shipped folder
    :param env_id: the environment to train on
    :param extra: more command-line arguments
    :return: the saved model
    """
    monkeypatch.setattr(train, "CONFIG_DIR", config_dir)
    # A new output folder for each run (a second run in one folder would be saved under another name)
    output = config_dir / f"run{len(list(config_dir.glob('run*')))}"
    main(["--algo", "npg", "--env", env_id, "--timesteps", "32", "--eval-episodes", "1", "--output", str(output), *extra])
    return NPG.load(output / f"npg_{env_id}_seed0.zip")


def test_train_reads_rl_zoo_linear_schedules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "npg.yml").write_text("CartPole-v1: {n_steps: 32, batch_size: 32, learning_rate: lin_1e-3}\n")
    model = _train_with_config(tmp_path, monkeypatch, "CartPole-v1")
    assert model.lr_schedule(1.0) == pytest.approx(1e-3) and model.lr_schedule(0.25) == pytest.approx(2.5e-4)
    with pytest.raises(ValueError, match="lin_<value>"):
        train.linear_schedules({"learning_rate": "exp_1e-3"})


def test_train_falls_back_to_the_default_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "npg.yml").write_text("default: {n_envs: 2, n_steps: 16, batch_size: 32, n_critic_updates: 1}\n")
    with pytest.warns(UserWarning, match="'default' entry"):
        model = _train_with_config(tmp_path, monkeypatch, "CartPole-v1")
    assert (model.n_envs, model.n_steps) == (2, 16)
    # Without a default entry: the class defaults
    (tmp_path / "npg.yml").write_text("Pendulum-v1: {n_envs: 2}\n")
    with pytest.warns(UserWarning, match="class defaults"):
        model = _train_with_config(tmp_path, monkeypatch, "CartPole-v1", "--timesteps", "2048")
    assert (model.n_envs, model.n_steps) == (1, 2048)


class MarkerPolicy(ActorCriticPolicy):
    """A policy class that only a dotted path names (not the default MlpPolicy's)."""


def test_train_applies_env_and_monitor_kwargs_and_a_policy_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    entry = (
        "FrozenLake-v1:\n"
        "  env_kwargs: {map_name: 8x8}\n"
        "  monitor_kwargs: \"dict(info_keywords=('prob',))\"\n"
        "  policy: tests.test_train.MarkerPolicy\n"
        "  n_steps: 32\n"
        "  batch_size: 32\n"
        "  n_critic_updates: 1\n"
    )
    (tmp_path / "npg.yml").write_text(entry)
    calls: list[dict[str, Any]] = []

    def recording_make_vec_env(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return make_vec_env(*args, **kwargs)

    monkeypatch.setattr(train, "make_vec_env", recording_make_vec_env)
    model = _train_with_config(tmp_path, monkeypatch, "FrozenLake-v1")
    assert calls[0]["env_kwargs"] == {"map_name": "8x8"} and calls[0]["monitor_kwargs"] == {"info_keywords": ("prob",)}
    assert model.observation_space.n == 64 and model.policy_class is MarkerPolicy  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--timesteps", "0"], "--timesteps must be at least 1, got 0"),
        (["--timesteps", "-5"], "--timesteps must be at least 1, got -5"),
        (["--eval-episodes", "0"], "--eval-episodes must be at least 1, got 0"),
    ],
)
def test_train_refuses_empty_runs(
    arguments: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as error:
        main(["--algo", "npg", "--env", "CartPole-v1", "--output", str(tmp_path), *arguments])
    assert error.value.code == 2 and message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_run_keys_of_a_zoo_entry() -> None:
    entry = {"n_envs": 4, "normalize": "{'norm_obs': True, 'norm_reward': False}", "gamma": 0.9}
    run = split_run_keys(entry, "X-v0")
    assert entry == {"gamma": 0.9} and run["n_envs"] == 4
    assert normalize_kwargs(run["normalize"]) == {"norm_obs": True, "norm_reward": False}
    assert normalize_kwargs(True) == {} and normalize_kwargs(False) is None
    # rl-zoo3's own files write the arguments as a dict(...) expression
    assert normalize_kwargs("dict(norm_obs=True, norm_reward=False)") == {"norm_obs": True, "norm_reward": False}
    assert keyword_arguments(None, "env_kwargs") == {}  # an empty `env_kwargs:` entry
    for key in ("vec_env_wrapper", "callback"):
        with pytest.raises(ValueError, match=key):
            split_run_keys({key: "x"}, "X-v0", TRAIN_RUN_KEYS)
    # The environment's and the monitor's keyword arguments are run keys, not the algorithm's; a reader that does not
    # apply them (the default: sb3_trust.benchmark) refuses them rather than ignoring them
    entry = {"env_kwargs": {"g": 9.0}, "monitor_kwargs": "dict(info_keywords=())", "gamma": 0.9}
    run = split_run_keys(dict(entry), "X-v0", TRAIN_RUN_KEYS)
    assert run == {"env_kwargs": {"g": 9.0}, "monitor_kwargs": "dict(info_keywords=())"}
    assert keyword_arguments(run["monitor_kwargs"], "monitor_kwargs") == {"info_keywords": ()}
    with pytest.raises(ValueError, match="env_kwargs"):
        split_run_keys(dict(entry), "X-v0")
    with pytest.raises(TypeError, match="mapping"):
        keyword_arguments([1], "env_kwargs")


def test_env_wrappers_in_rl_zoo_forms() -> None:
    assert train.wrapper_class(None) is None
    wrap = train.wrapper_class(
        [{"gymnasium.wrappers.TimeLimit": {"max_episode_steps": 7}}, "gymnasium.wrappers.FlattenObservation"]
    )
    assert wrap is not None
    env = wrap(gym.make("CartPole-v1"))
    assert isinstance(env, gym.wrappers.FlattenObservation) and isinstance(env.env, gym.wrappers.TimeLimit)
    assert env.env._max_episode_steps == 7
    single = train.wrapper_class("gymnasium.wrappers.FlattenObservation")
    assert single is not None and isinstance(single(gym.make("CartPole-v1")), gym.wrappers.FlattenObservation)
    with pytest.raises(TypeError, match="dotted path"):
        train.wrapper_class([3])


def test_train_applies_env_wrapper_and_frame_stack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "npg.yml").write_text(
        "CartPole-v1:\n"
        "  env_wrapper: [{gymnasium.wrappers.TimeAwareObservation: {flatten: true}}]\n"
        "  frame_stack: 3\n"
        "  n_steps: 32\n"
        "  batch_size: 32\n"
        "  n_critic_updates: 1\n"
    )
    calls: list[dict[str, Any]] = []

    def recording_make_vec_env(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return make_vec_env(*args, **kwargs)

    monkeypatch.setattr(train, "make_vec_env", recording_make_vec_env)
    model = _train_with_config(tmp_path, monkeypatch, "CartPole-v1", "--timesteps", "64")
    # CartPole's 4 numbers and the time, 3 frames of them
    assert model.observation_space.shape == (15,)
    assert isinstance(calls[0]["wrapper_class"](gym.make("CartPole-v1")), gym.wrappers.TimeAwareObservation)


def test_train_evaluates_on_a_fresh_environment_with_the_training_statistics(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    evaluated: list[Any] = []

    def recording_evaluate(model: Any, env: Any, **kwargs: Any) -> tuple[float, float]:
        evaluated.append((model.get_vec_normalize_env(), env))
        assert kwargs["deterministic"] is True
        return 0.0, 0.0

    monkeypatch.setattr(train, "evaluate_policy", recording_evaluate)
    main(["--algo", "trpo", "--env", "HalfCheetah-v5", "--timesteps", "256", "--output", str(tmp_path)])
    ((training, evaluation),) = evaluated
    assert isinstance(evaluation, VecNormalize) and evaluation.num_envs == 1 and training.num_envs == 2
    assert not evaluation.training and not evaluation.norm_reward
    assert np.array_equal(evaluation.obs_rms.mean, training.obs_rms.mean) and evaluation.obs_rms is not training.obs_rms


def test_the_algorithm_s_gamma_wins_over_the_normalization_s() -> None:
    # As in rl-zoo3: VecNormalize discounts its return statistics with the algorithm's gamma when the entry sets one
    run = {"normalize": {"gamma": 0.5}}
    for gamma, expected in ((0.9, 0.9), (None, 0.5)):
        env = train.build_env("Pendulum-v1", run, 0, gamma)
        assert isinstance(env, VecNormalize) and env.gamma == expected
        env.close()


def test_the_saved_statistics_discount_with_the_entry_s_gamma(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The same, through the script: the entry's gamma reaches the environment whose statistics are saved
    entry = "Pendulum-v1: {n_steps: 32, batch_size: 32, n_critic_updates: 1, gamma: 0.9, normalize: true}\n"
    (tmp_path / "npg.yml").write_text(entry)
    monkeypatch.setattr(train, "CONFIG_DIR", tmp_path)
    main(
        [
            "--algo",
            "npg",
            "--env",
            "Pendulum-v1",
            "--timesteps",
            "32",
            "--eval-episodes",
            "1",
            "--output",
            str(tmp_path / "out"),
        ]
    )
    statistics = tmp_path / "out" / "npg_Pendulum-v1_seed0.vecnormalize.pkl"
    assert VecNormalize.load(str(statistics), make_vec_env("Pendulum-v1")).gamma == 0.9


def test_statistics_alone_of_the_unnumbered_run_reserve_its_name(tmp_path: Path) -> None:
    # `<stem>.vecnormalize.pkl` is run 1 even without its `.zip`: the next checkpoint is `_2`, not `<stem>.zip`
    (tmp_path / "x.vecnormalize.pkl").write_bytes(b"stats of run 1")
    assert train.unused_checkpoint_path(tmp_path, "x").name == "x_2.zip"


def test_a_name_taken_after_the_listing_is_not_overwritten(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a concurrent run creates x.zip between our listing and our open(): exclusive creation moves on to x_2.zip
    (tmp_path / "x.zip").write_bytes(b"other run")
    monkeypatch.setattr(train.os, "listdir", lambda path: [])
    assert train.unused_checkpoint_path(tmp_path, "x").name == "x_2.zip"
    assert (tmp_path / "x.zip").read_bytes() == b"other run"


def _train_npg_on_cartpole(tmp_path: Path, *extra: str) -> None:
    arguments = ["--algo", "npg", "--env", "CartPole-v1", "--timesteps", "32", "--eval-episodes", "1"]
    train.main([*arguments, "--output", str(tmp_path / "out"), *extra])


def test_train_evaluates_on_the_offset_seed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the evaluation environment is seeded seed + EVAL_SEED_OFFSET, not with the training seed
    seeds: list[int] = []
    build_env = train.build_env

    def recording_build_env(env_id: str, run: dict, seed: int, *args: Any, **kwargs: Any) -> Any:
        seeds.append(seed)
        return build_env(env_id, run, seed, *args, **kwargs)

    monkeypatch.setattr(train, "build_env", recording_build_env)
    (tmp_path / "npg.yml").write_text("CartPole-v1: {n_steps: 32, batch_size: 32, n_critic_updates: 1}\n")
    monkeypatch.setattr(train, "CONFIG_DIR", tmp_path)
    _train_npg_on_cartpole(tmp_path, "--seed", "3")
    assert seeds == [3, 3 + train.EVAL_SEED_OFFSET]


def test_an_atari_game_with_its_own_entry_does_not_get_the_atari_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the `atari` entry is only the fallback of a game without one (the game is faked to keep this cheap)
    (tmp_path / "npg.yml").write_text(
        "CartPole-v1: {n_steps: 32, batch_size: 32, n_critic_updates: 1}\n"
        "atari: {n_steps: 16, batch_size: 16, n_critic_updates: 1}\n"
    )
    monkeypatch.setattr(train, "CONFIG_DIR", tmp_path)
    monkeypatch.setattr(train, "is_atari_game", lambda env_id: True)
    _train_npg_on_cartpole(tmp_path)
    assert NPG.load(tmp_path / "out" / "npg_CartPole-v1_seed0.zip").n_steps == 32


def test_linear_schedules_of_the_clip_ranges() -> None:
    # rl-zoo3's `lin_<value>` is understood for clip_range and clip_range_vf too (PPOKL's atari entry uses it)
    converted = train.linear_schedules({"clip_range": "lin_0.1", "clip_range_vf": "lin_0.4"})
    assert converted["clip_range"](0.5) == pytest.approx(0.05) and converted["clip_range_vf"](0.25) == pytest.approx(0.1)


# --- Tests added by mutation testing ---


def _write_npg_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, entry: str) -> None:
    """
    :param tmp_path: folder of the ``npg.yml`` made for the test, which becomes the shipped folder
    :param monkeypatch: to make it the shipped folder
    :param entry: CartPole-v1's entry, as a YAML flow mapping's content
    """
    (tmp_path / "npg.yml").write_text(f"CartPole-v1: {{{entry}}}\n")
    monkeypatch.setattr(train, "CONFIG_DIR", tmp_path)


def test_train_takes_the_algorithm_in_any_case(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # `make train` passes the Makefile's --algo TRPO: the name is case-insensitive
    _write_npg_config(tmp_path, monkeypatch, "n_steps: 32, batch_size: 32, n_critic_updates: 1")
    arguments = ["--algo", "NPG", "--env", "CartPole-v1", "--timesteps", "32", "--eval-episodes", "1"]
    main([*arguments, "--output", str(tmp_path / "out")])
    assert NPG.load(tmp_path / "out" / "npg_CartPole-v1_seed0.zip").n_steps == 32


def test_train_runs_the_entry_s_n_timesteps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Without --timesteps, the entry's n_timesteps (a !!float in the zoo files) is the length of the run
    _write_npg_config(tmp_path, monkeypatch, "n_timesteps: !!float 64, n_steps: 32, batch_size: 32, n_critic_updates: 1")
    main(["--algo", "npg", "--env", "CartPole-v1", "--eval-episodes", "1", "--output", str(tmp_path / "out")])
    assert NPG.load(tmp_path / "out" / "npg_CartPole-v1_seed0.zip").num_timesteps == 64


def test_train_evaluates_10_episodes_unless_told(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # docs/rl_zoo.rst: evaluated for --eval-episodes episodes, 10 by default
    episodes: list[int] = []

    def recording_evaluate(model: Any, env: Any, **kwargs: Any) -> tuple[float, float]:
        episodes.append(kwargs["n_eval_episodes"])
        return 0.0, 0.0

    monkeypatch.setattr(train, "evaluate_policy", recording_evaluate)
    _write_npg_config(tmp_path, monkeypatch, "n_steps: 32, batch_size: 32, n_critic_updates: 1")
    for extra in ([], ["--eval-episodes", "3"]):
        main(["--algo", "npg", "--env", "CartPole-v1", "--timesteps", "32", "--output", str(tmp_path / "out"), *extra])
    assert episodes == [10, 3]


def test_train_seeds_the_environments_and_the_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The environments get --seed and, for the evaluation, --seed + 10 000 (docs/rl_zoo.rst); the model gets --seed
    seeds: list[int] = []

    def recording_make_vec_env(*args: Any, **kwargs: Any) -> Any:
        seeds.append(kwargs["seed"])
        return make_vec_env(*args, **kwargs)

    monkeypatch.setattr(train, "make_vec_env", recording_make_vec_env)
    _write_npg_config(tmp_path, monkeypatch, "n_steps: 32, batch_size: 32, n_critic_updates: 1")
    _train_npg_on_cartpole(tmp_path, "--seed", "3")
    assert seeds == [3, 10_003]
    assert NPG.load(tmp_path / "out" / "npg_CartPole-v1_seed3.zip").seed == 3


def test_frames_are_stacked_after_the_normalization_and_the_entry_is_left_alone() -> None:
    run = {"normalize": {"norm_obs": True}, "frame_stack": 2}
    evaluation = train.build_env("CartPole-v1", run, 0, 0.9, evaluation=True)
    training = train.build_env("CartPole-v1", run, 0, None)
    # As in rl-zoo3, normalized observations are stacked: the statistics are those of one observation
    assert isinstance(training, VecFrameStack) and isinstance(training.venv, VecNormalize)
    assert training.venv.obs_rms.mean.shape == (4,) and training.observation_space.shape == (8,)
    # The evaluation environment's settings did not leak into the entry, nor into the next environment built from it
    assert run == {"normalize": {"norm_obs": True}, "frame_stack": 2}
    assert training.venv.training and training.venv.norm_reward and training.venv.gamma == 0.99
    assert isinstance(evaluation, VecFrameStack) and not evaluation.venv.training
    training.close()
    evaluation.close()


def test_checkpoint_names_match_the_stem_exactly(tmp_path: Path) -> None:
    # A dot in the stem is a dot, and only `<stem>[_N].zip` and `<stem>[_N].vecnormalize.pkl` count: not a backup
    (tmp_path / "PongXv5_seed0_40.zip").touch()
    (tmp_path / "Pong.v5_seed0_7.zip.bak").touch()
    assert train.unused_checkpoint_path(tmp_path, "Pong.v5_seed0").name == "Pong.v5_seed0.zip"
    # An output folder that does not exist yet, however deep
    assert train.unused_checkpoint_path(tmp_path / "a" / "b", "x") == tmp_path / "a" / "b" / "x.zip"


def test_hyperparameter_files_policy_kwargs_empty_and_missing(tmp_path: Path) -> None:
    # policy_kwargs strings are evaluated with torch.nn at hand, as rl-zoo3 does
    (tmp_path / "npg.yml").write_text('CartPole-v1: {policy_kwargs: "dict(net_arch=[8], activation_fn=nn.ReLU)"}\n')
    expected = {"policy_kwargs": {"net_arch": [8], "activation_fn": th.nn.ReLU}}
    assert train.load_hyperparameters("npg", "CartPole-v1", tmp_path) == expected
    (tmp_path / "npg.yml").write_text("# nothing yet\n")
    assert train.load_hyperparameters("npg", "CartPole-v1", tmp_path) == {}
    assert train.load_hyperparameters("trpo", "CartPole-v1", tmp_path) == {}  # no trpo.yml


def test_an_env_wrapper_mapping_names_one_wrapper() -> None:
    with pytest.raises(TypeError, match="dotted path"):
        train.wrapper_class([{"gymnasium.wrappers.TimeLimit": {}, "gymnasium.wrappers.FlattenObservation": {}}])


def test_a_run_interrupted_before_its_first_step_is_saved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Ctrl-C before the progress bar started (while the environments reset): no bar to close, the run is still saved
    def interrupted_learn(self: NPG, *args: Any, **kwargs: Any) -> NPG:
        raise KeyboardInterrupt

    monkeypatch.setattr(NPG, "learn", interrupted_learn)
    _write_npg_config(tmp_path, monkeypatch, "n_steps: 32, batch_size: 32, n_critic_updates: 1")
    with pytest.raises(SystemExit) as stop:
        _train_npg_on_cartpole(tmp_path, "--progress-bar")
    assert stop.value.code == 130
    assert NPG.load(tmp_path / "out" / "npg_CartPole-v1_seed0.zip").num_timesteps == 0


def test_the_configs_of_the_checkout_win_over_installed_ones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data"
    installed = data / "share" / "sb3_trust" / "zoo_configs"
    installed.mkdir(parents=True)
    monkeypatch.setattr(train.sysconfig, "get_path", lambda *args, **kwargs: str(data))
    monkeypatch.setattr(train.sys, "prefix", str(data))
    # An editable install reads the checkout's files, not those of an older `pip install .` beside it
    assert train.find_config_dir() == Path(train.__file__).resolve().parent.parent / "zoo_configs"
    # An installed package, with no checkout around it, reads the installed copy
    monkeypatch.setattr(train, "__file__", str(tmp_path / "site-packages" / "sb3_trust" / "train.py"))
    assert train.find_config_dir() == installed
