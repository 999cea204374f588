"""``python -m sb3_trust.train`` (what ``make train`` runs) and its reading of the zoo entries."""

from pathlib import Path

import pytest

from sb3_trust.train import main, normalize_kwargs, split_run_keys


def test_train_evaluates_and_saves_with_the_normalization(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # HalfCheetah-v5's entry normalizes: the statistics are saved beside the checkpoint
    arguments = ["--algo", "trpo", "--env", "HalfCheetah-v5", "--timesteps", "256", "--eval-episodes", "1"]
    mean_return = main([*arguments, "--output", str(tmp_path)])
    checkpoint = tmp_path / "trpo_HalfCheetah-v5_seed0.zip"
    assert checkpoint.exists() and checkpoint.with_suffix(".vecnormalize.pkl").exists()
    output = capsys.readouterr().out
    assert f"Mean return over 1 episodes: {mean_return:.1f}" in output and str(checkpoint.resolve()) in output


def test_train_says_when_the_env_has_no_entry(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="No entry for Acrobot-v1"):
        main(["--algo", "npg", "--env", "Acrobot-v1", "--timesteps", "64", "--eval-episodes", "1", "--output", str(tmp_path)])


def test_run_keys_of_a_zoo_entry() -> None:
    entry = {"n_envs": 4, "normalize": "{'norm_obs': True, 'norm_reward': False}", "gamma": 0.9}
    run = split_run_keys(entry, "X-v0")
    assert entry == {"gamma": 0.9} and run["n_envs"] == 4
    assert normalize_kwargs(run["normalize"]) == {"norm_obs": True, "norm_reward": False}
    assert normalize_kwargs(True) == {} and normalize_kwargs(False) is None
    with pytest.raises(ValueError, match="env_wrapper"):
        split_run_keys({"env_wrapper": "x"}, "X-v0")
