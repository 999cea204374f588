"""rl-zoo3 integration: train and enjoy through the wrapper, with the shipped hyperparameter files."""

from pathlib import Path

import pytest

pytest.importorskip("rl_zoo3")

from stable_baselines3.common.env_util import make_vec_env

from sb3_trust import NPG, PPOKL, TRPO
from sb3_trust.train import ALGORITHMS, CONFIG_DIR, RUN_KEYS, load_hyperparameters
from sb3_trust.zoo import main, register_algorithms


def test_registration_keeps_the_contrib_trpo() -> None:
    from rl_zoo3.utils import ALGOS

    register_algorithms()
    assert ALGOS["trpo"] is TRPO and ALGOS["npg"] is NPG and ALGOS["ppokl"] is PPOKL
    assert ALGOS["trpo_contrib"].__module__.startswith("sb3_contrib")


@pytest.mark.parametrize("algo", ["npg", "ppokl", "trpo"])
def test_shipped_configs_build_models(algo: str) -> None:
    for env_id in ("CartPole-v1", "Pendulum-v1", "HalfCheetah-v5"):
        hyperparameters = load_hyperparameters(algo, env_id)
        assert hyperparameters, f"{env_id} missing from {CONFIG_DIR / algo}.yml"
        n_envs = hyperparameters.get("n_envs", 1)
        for key in RUN_KEYS:
            hyperparameters.pop(key, None)
        ALGORITHMS[algo]("MlpPolicy", make_vec_env(env_id, n_envs=n_envs), **hyperparameters)


def test_train_and_enjoy_through_rl_zoo(tmp_path: Path) -> None:
    main(["train", "--algo", "npg", "--env", "CartPole-v1", "-n", "1024", "-f", str(tmp_path), "--seed", "1"])
    saved = tmp_path / "npg" / "CartPole-v1_1" / "CartPole-v1.zip"
    assert saved.exists()
    assert NPG.load(saved).n_steps == load_hyperparameters("npg", "CartPole-v1")["n_steps"]
    main(["enjoy", "--algo", "npg", "--env", "CartPole-v1", "-f", str(tmp_path), "-n", "50", "--no-render"])


def test_default_configs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from sb3_trust import zoo

    assert zoo.default_config("npg") == CONFIG_DIR / "npg.yml"
    contrib = zoo.default_config("trpo_contrib")
    assert contrib is not None and contrib.name == "trpo.yml" and contrib.exists()
    assert zoo.default_config("ppo") is None
    monkeypatch.setattr(zoo, "CONFIG_DIR", tmp_path)
    with pytest.raises(SystemExit, match="conf-file"):
        zoo.default_config("trpo")


def test_option_values_in_both_spellings() -> None:
    from sb3_trust.zoo import _option_value

    assert _option_value(["--algo", "npg", "--env", "x"], "--algo") == "npg"
    assert _option_value(["--algo=ppokl"], "--algo") == "ppokl"
    assert _option_value(["-conf", "a.yml"], "--conf-file", "-conf") == "a.yml"
    assert _option_value(["--env", "x"], "--algo") is None
