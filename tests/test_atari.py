"""Atari games: the zoo's `atari` entries through ``python -m sb3_trust.train`` and rl-zoo3, K-FAC on NatureCNN."""

import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import ale_py  # noqa: F401  (the tests extra installs it: a missing emulator must fail here, not skip)
import gymnasium as gym
import pytest
import torch as th
from stable_baselines3.common.atari_wrappers import AtariWrapper
from stable_baselines3.common.torch_layers import NatureCNN

from sb3_trust import ACKTR, PPOKL, train
from sb3_trust.train import main

GAME = "PongNoFrameskip-v4"


# K-FAC's eigendecomposition of NatureCNN's 3137 x 3137 factor is among what the shared fixture keeps on one thread
pytestmark = pytest.mark.usefixtures("single_thread")


def test_train_uses_the_atari_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    evaluate_policy = train.evaluate_policy
    modes: list[bool] = []

    def recording_evaluate(*args: Any, **kwargs: Any) -> Any:
        modes.append(kwargs["deterministic"])
        return evaluate_policy(*args, **kwargs)

    monkeypatch.setattr(train, "evaluate_policy", recording_evaluate)
    main(["--algo", "acktr", "--env", GAME, "--timesteps", "320", "--eval-episodes", "1", "--output", str(tmp_path)])
    model = ACKTR.load(tmp_path / f"acktr_{GAME}_seed0.zip")
    # SB3's AtariWrapper (84 x 84 grey frames), 4 of them stacked, channels first; 16 environments, NatureCNN
    assert model.observation_space.shape == (4, 84, 84) and model.n_envs == 16
    assert isinstance(model.policy.features_extractor, NatureCNN)
    assert model.lr_schedule(0.5) == pytest.approx(0.125)  # lin_0.25
    assert all(th.isfinite(param).all() for param in model.policy.parameters())
    assert modes == [False]  # sampled actions on Atari, as rl-zoo3 evaluates


def test_module_prefixed_ids_of_games_are_recognised() -> None:
    assert train.is_atari_game("ale_py:ALE/Pong-v5") and train.is_atari_game(GAME)
    assert train.registered_id("ale_py:ALE/Pong-v5") == "ALE/Pong-v5"
    assert not train.is_atari_game("gymnasium.envs.classic_control:CartPole-v1")


def test_train_refuses_an_atari_game_without_an_atari_entry(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--algo", "trpo", "--env", GAME, "--timesteps", "320", "--output", str(tmp_path)])
    assert "no 'atari' entry" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_rl_zoo_checks_leave_module_prefixed_ids_to_rl_zoo(tmp_path: Path) -> None:
    from sb3_trust.zoo import check_atari_entry

    config = tmp_path / "trpo.yml"
    config.write_text("CartPole-v1: {n_envs: 2}\n")
    with pytest.raises(SystemExit, match="no 'atari' entry"):
        check_atari_entry(config, GAME)
    check_atari_entry(config, f"ale_py:{GAME}")  # rl-zoo3 refuses it with its own message


def test_rl_zoo_trains_with_the_atari_entry(tmp_path: Path) -> None:
    pytest.importorskip("rl_zoo3")
    from sb3_trust import zoo

    zoo.main(["train", "--algo", "ppokl", "--env", GAME, "-n", "1024", "-f", str(tmp_path)])
    model = PPOKL.load(tmp_path / "ppokl" / f"{GAME}_1" / f"{GAME}.zip")
    assert (model.n_envs, model.n_steps, model.batch_size) == (8, 128, 256)
    assert model.observation_space.shape == (4, 84, 84)
    with pytest.raises(SystemExit, match="no 'atari' entry"):
        zoo.main(["train", "--algo", "trpo", "--env", GAME, "-n", "1024", "-f", str(tmp_path)])


def test_repeated_frame_skip_is_named() -> None:
    atari_wrapper = ["stable_baselines3.common.atari_wrappers.AtariWrapper"]
    # ALE's v5 games skip 4 frames themselves, v4 without NoFrameskip 2-4 at random: with the wrapper's 4, 8-16
    for game in ("ALE/Pong-v5", "ale_py:ALE/Pong-v5", "Pong-v4"):
        warning = train.repeated_frame_skip(game, {"env_wrapper": atari_wrapper})
        assert warning is not None and "NoFrameskip" in warning and "frameskip: 1" in warning
    assert train.repeated_frame_skip(GAME, {"env_wrapper": atari_wrapper}) is None
    assert train.repeated_frame_skip("ALE/Pong-v5", {"env_wrapper": atari_wrapper, "env_kwargs": {"frameskip": 1}}) is None
    assert train.repeated_frame_skip("ALE/Pong-v5", {}) is None  # the game's own skip alone, no wrapper
    no_skip = [{"stable_baselines3.common.atari_wrappers.AtariWrapper": {"frame_skip": 1}}]
    assert train.repeated_frame_skip("ALE/Pong-v5", {"env_wrapper": no_skip}) is None
    assert train.repeated_frame_skip("CartPole-v1", {"env_wrapper": atari_wrapper}) is None


def test_both_scripts_warn_of_a_repeated_frame_skip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sb3_trust import zoo

    config = tmp_path / "ppokl.yml"
    config.write_text("atari:\n  env_wrapper:\n    - stable_baselines3.common.atari_wrappers.AtariWrapper\n")
    with pytest.warns(UserWarning, match="repeats it 4 times more"):
        zoo.check_atari_entry(config, "ALE/Pong-v5")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        zoo.check_atari_entry(config, "ALE/Pong-v5", {"env_kwargs": {"frameskip": 1}})
        zoo.check_atari_entry(config, GAME)
    # An entry the check cannot read is left to rl-zoo3, which says what is wrong when it builds the environment
    config.write_text("atari:\n  env_wrapper:\n    - no_such_module.Wrapper\n")
    zoo.check_atari_entry(config, "ALE/Pong-v5")
    # What rl-zoo3's command line puts over the entry: -params, then --env-kwargs (in any spelling its parser takes)
    for arguments in (
        ["--env", "x", "--env-kwargs", "frameskip:1", "mode:'a'", "-n", "5"],
        ["--env", "x", "--env-kwargs=frameskip:1", "--env-kw", "frameskip:1", "mode:'a'"],
        ["--env", "x", "-params", "env_kwargs:dict(frameskip=0)", "--env-kwargs", "frameskip:1", "mode:'a'"],
    ):
        assert zoo._entry_overrides(arguments)["env_kwargs"] == {"frameskip": 1, "mode": "a"}
    assert zoo._entry_overrides(["--env", "x"]) == {}
    overrides = zoo._entry_overrides(["-params", "env_kwargs:dict(frameskip=1)", "n_envs:2"])
    assert overrides == {"env_kwargs": {"frameskip": 1}, "n_envs": 2}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config.write_text("atari:\n  env_wrapper:\n    - stable_baselines3.common.atari_wrappers.AtariWrapper\n")
        zoo.check_atari_entry(config, "ALE/Pong-v5", overrides)
    wrapper = zoo._entry_overrides(["-params", "env_wrapper:'stable_baselines3.common.atari_wrappers.AtariWrapper'"])
    config.write_text("atari:\n  policy: CnnPolicy\n")
    with pytest.warns(UserWarning, match="repeats it 4 times more"):
        zoo.check_atari_entry(config, "ALE/Pong-v5", wrapper)

    # python -m sb3_trust.train warns before it builds anything (the run itself is the first test's)
    monkeypatch.setattr(train, "build_env", lambda *args, **kwargs: (_ for _ in ()).throw(RuntimeError("built")))
    with pytest.warns(UserWarning, match="repeats it 4 times more"), pytest.raises(RuntimeError, match="built"):
        main(["--algo", "acktr", "--env", "ALE/Pong-v5", "--output", str(tmp_path)])


# --- Tests added by mutation testing ---


class CustomAtariWrapper(AtariWrapper):
    """A variant of SB3's AtariWrapper, as an entry may name one: it repeats actions the same way."""


def test_a_subclass_of_atari_wrapper_repeats_the_frames_too() -> None:
    warning = train.repeated_frame_skip("ALE/Pong-v5", {"env_wrapper": ["tests.test_atari.CustomAtariWrapper"]})
    assert warning is not None and "repeats it 4 times more" in warning


def test_a_game_registered_by_its_module_prefix_is_recognised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # "module:EnvId" imports the module, which registers the game, before the registry is asked
    (tmp_path / "sb3_trust_test_games.py").write_text(
        "import gymnasium as gym\n"
        "gym.register('SbTrustPong-v0', entry_point='ale_py.env:AtariEnv', kwargs={'game': 'pong', 'frameskip': 1})\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert train.is_atari_game("sb3_trust_test_games:SbTrustPong-v0")
    finally:
        gym.registry.pop("SbTrustPong-v0", None)
        sys.modules.pop("sb3_trust_test_games", None)


def test_the_command_registers_the_games_itself(tmp_path: Path) -> None:
    # A fresh process, where nothing imported ale_py: the game is still known to be one (trpo.yml has no atari entry)
    command = [sys.executable, "-m", "sb3_trust.train", "--algo", "trpo", "--env", GAME, "--output", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "no 'atari' entry" in result.stderr, result.stderr


def test_the_rl_zoo_check_registers_the_games_itself(tmp_path: Path) -> None:
    config = tmp_path / "trpo.yml"
    config.write_text("CartPole-v1: {n_envs: 2}\n")
    code = "import sys, pathlib; from sb3_trust import zoo; zoo.check_atari_entry(pathlib.Path(sys.argv[1]), sys.argv[2])"
    result = subprocess.run([sys.executable, "-c", code, str(config), GAME], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "no 'atari' entry" in result.stderr, result.stderr


def test_the_rl_zoo_check_reads_the_entry_that_rl_zoo_reads(tmp_path: Path) -> None:
    from sb3_trust.zoo import check_atari_entry

    wrapper = "env_wrapper: [stable_baselines3.common.atari_wrappers.AtariWrapper]"
    config = tmp_path / "ppokl.yml"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # A game's own entry needs no atari entry, and wins over it
        config.write_text(f"ALE/Pong-v5: {{env_kwargs: {{frameskip: 1}}, {wrapper}}}\n")
        check_atari_entry(config, "ALE/Pong-v5")
        config.write_text(f"ALE/Pong-v5: {{env_kwargs: {{frameskip: 1}}, {wrapper}}}\natari: {{{wrapper}}}\n")
        check_atari_entry(config, "ALE/Pong-v5")
        # The command line's env_kwargs replace the entry's
        config.write_text(f"atari: {{env_kwargs: {{frameskip: 4}}, {wrapper}}}\n")
        check_atari_entry(config, "ALE/Pong-v5", {"env_kwargs": {"frameskip": 1}})
        # A file that does not exist is left to rl-zoo3
        check_atari_entry(tmp_path / "missing.yml", GAME)
    # An empty file has no atari entry either
    config.write_text("")
    with pytest.raises(SystemExit, match="no 'atari' entry"):
        check_atari_entry(config, GAME)


def test_the_wrapper_checks_what_the_command_line_puts_over_the_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("rl_zoo3")
    import rl_zoo3.train

    from sb3_trust import zoo

    monkeypatch.setattr(rl_zoo3.train, "train", lambda: None)
    monkeypatch.setattr(sys, "argv", sys.argv)
    # ppokl.yml's atari entry wraps the game in AtariWrapper: ALE/Pong-v5 repeats actions itself, unless told not to
    with pytest.warns(UserWarning, match="repeats it 4 times more"):
        zoo.main(["train", "--algo", "ppokl", "--env", "ALE/Pong-v5"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        zoo.main(["train", "--algo", "ppokl", "--env", "ALE/Pong-v5", "--env-kwargs", "frameskip:1"])
