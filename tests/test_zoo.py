"""rl-zoo3 integration: train and enjoy through the wrapper, with the shipped hyperparameter files."""

import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("rl_zoo3")

from stable_baselines3.common.env_util import make_vec_env

from sb3_trust import NPG, PPOKL, TRPO
from sb3_trust.train import ALGORITHMS, CONFIG_DIR, RUN_KEYS, load_hyperparameters, split_run_keys
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


@pytest.mark.parametrize("algo", ["acktr", "npg", "ppokl", "trpo"])
def test_train_and_enjoy_through_rl_zoo(algo: str, tmp_path: Path) -> None:
    # enjoy loads the model with learning_rate=0 (rl-zoo3's custom_objects): every constructor must accept it
    main(["train", "--algo", algo, "--env", "CartPole-v1", "-n", "1024", "-f", str(tmp_path), "--seed", "1"])
    saved = tmp_path / algo / "CartPole-v1_1" / "CartPole-v1.zip"
    assert saved.exists()
    assert ALGORITHMS[algo].load(saved).n_envs == load_hyperparameters(algo, "CartPole-v1")["n_envs"]
    main(["enjoy", "--algo", algo, "--env", "CartPole-v1", "-f", str(tmp_path), "-n", "20", "--no-render"])
    main(["record_video", "--algo", algo, "--env", "CartPole-v1", "-f", str(tmp_path), "-n", "20"])
    assert len(list((tmp_path / algo / "CartPole-v1_1" / "videos").glob("*.mp4"))) == 1


def test_unlisted_env_trains_with_the_default_entry(tmp_path: Path) -> None:
    # Acrobot-v1 has no entry in zoo_configs/trpo.yml: rl-zoo3 takes the file's `default` one, or gives up
    main(["train", "--algo", "trpo", "--env", "Acrobot-v1", "-n", "1024", "-f", str(tmp_path), "-tb", str(tmp_path / "tb")])
    assert (tmp_path / "trpo" / "Acrobot-v1_1" / "Acrobot-v1.zip").exists()
    # rl-zoo3's -tb (the zoo extra brings tensorboard): one run named after the class
    assert len(list((tmp_path / "tb" / "Acrobot-v1").glob("TRPO_1/events.out.tfevents.*"))) == 1


@pytest.mark.parametrize("algo", ["acktr", "npg", "ppokl", "trpo"])
def test_shipped_default_entries(algo: str) -> None:
    # rl-zoo3 needs n_timesteps when -n is not given; the rest must build a model on an environment without an entry
    hyperparameters = load_hyperparameters(algo, "default")
    assert hyperparameters["n_timesteps"] == 1e6 and hyperparameters["policy"] == "MlpPolicy"
    run = split_run_keys(hyperparameters, "default")
    ALGORITHMS[algo](run["policy"], make_vec_env("Acrobot-v1", n_envs=int(run.get("n_envs", 1))), **hyperparameters)


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
    # argparse's abbreviations, which rl-zoo3's parser accepts
    for spelling in (["--conf", "a.yml"], ["--c=a.yml"], ["-con", "a.yml"]):
        assert _option_value(spelling, "--conf-file", "-conf") == "a.yml"
    assert _option_value(["--al", "npg"], "--algo") == "npg"
    assert _option_value(["-", "--", "--algo", "npg"], "--algo") is None
    # argparse keeps the last of repeated options
    assert _option_value(["--algo", "ppo", "--env", "x", "--algo", "npg"], "--algo") == "npg"


def test_the_users_conf_file_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import rl_zoo3.train

    from sb3_trust import zoo

    given: list[list[str]] = []
    monkeypatch.setattr(rl_zoo3.train, "train", lambda: given.append(sys.argv[1:]))
    monkeypatch.setattr(sys, "argv", sys.argv)
    # The default comes first, so that a --conf-file in any spelling after it wins: argparse keeps the last value
    zoo.main(["train", "--algo", "npg", "--env", "X-v0"])
    assert given[-1] == ["--conf-file", str(CONFIG_DIR / "npg.yml"), "--algo", "npg", "--env", "X-v0"]
    # A file of the user's needs no shipped one
    monkeypatch.setattr(zoo, "CONFIG_DIR", tmp_path / "not-installed")
    zoo.main(["train", "--algo", "npg", "--conf", "mine.yml"])
    assert given[-1] == ["--algo", "npg", "--conf", "mine.yml"]
    monkeypatch.undo()

    # The end to end check: the user's file, given as argparse's abbreviation --conf, is the one that is used
    custom = tmp_path / "mine.yml"
    entry = "{n_timesteps: 64, policy: MlpPolicy, n_steps: 64, batch_size: 64, n_critic_updates: 1}"
    custom.write_text(f"CartPole-v1: {entry}\n")
    main(["train", "--algo", "npg", "--env", "CartPole-v1", "--conf", str(custom), "-f", str(tmp_path)])
    assert NPG.load(tmp_path / "npg" / "CartPole-v1_1" / "CartPole-v1.zip").n_steps == 64


@pytest.mark.parametrize("algo", ["acktr", "npg", "ppokl", "trpo"])
def test_search_spaces_give_valid_models(algo: str) -> None:
    import optuna

    from sb3_trust.zoo import SAMPLERS, convert_sampled_params

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for env_id, n_envs in (("CartPole-v1", 3), ("HalfCheetah-v5", 1)):
        env = make_vec_env(env_id, n_envs=n_envs)
        n_actions = env.action_space.shape[0] if env_id == "HalfCheetah-v5" else 0
        for _ in range(4):
            trial = study.ask()
            hyperparameters = SAMPLERS[algo](trial, n_actions, n_envs, {})
            # What rl-zoo3 rebuilds from a stored trial is what the trial ran with
            assert convert_sampled_params(trial.params) == hyperparameters
            # The reports show, as rl-zoo3's samplers record them, the values trained with (batch_size after its cap)
            used = {key: hyperparameters[key] for key in ("gamma", "n_steps", "batch_size") if key in hyperparameters}
            assert trial.user_attrs == used and "gamma" in used and ("batch_size" in used) == (algo != "acktr")
            ALGORITHMS[algo]("MlpPolicy", env, _init_setup_model=False, **hyperparameters)._setup_model()
            study.tell(trial, 0.0)


def test_hyperparameter_search_through_rl_zoo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sb3_trust import zoo

    sampled: list[dict] = []

    def tiny_search(trial: Any, n_actions: int, n_envs: int, additional_args: dict) -> dict:
        # The real spaces are checked above; this one keeps the two trials short
        hyperparameters = dict(learning_rate=trial.suggest_float("learning_rate", 1e-4, 1e-3), n_steps=64, batch_size=64)
        sampled.append(hyperparameters)
        return {**hyperparameters, "n_critic_updates": 1, "policy_kwargs": dict(net_arch=[8])}

    from rl_zoo3.hyperparams_opt import HYPERPARAMS_SAMPLER

    monkeypatch.setitem(zoo.SAMPLERS, "npg", tiny_search)
    monkeypatch.setitem(HYPERPARAMS_SAMPLER, "npg", tiny_search)  # so that rl-zoo3's table is restored afterwards too
    # Acrobot-v1 has no entry in zoo_configs/npg.yml: the search starts from the file's `default` one
    arguments = ["--algo", "npg", "--env", "Acrobot-v1", "-optimize", "--n-trials", "2", "-n", "256", "--seed", "0"]
    search = ["--n-evaluations", "1", "--eval-episodes", "1", "--sampler", "random", "--pruner", "none", "-f", str(tmp_path)]
    main(["train", *arguments, *search, "--optimization-log-path", str(tmp_path / "trials")])
    assert len(sampled) == 2
    # rl-zoo3 writes the study's report, and each trial's evaluations where --optimization-log-path says
    report = next(tmp_path.rglob("report_Acrobot-v1_2-trials-256-random-none*.csv"))
    assert len(report.read_text().splitlines()) == 3  # header and two trials
    assert sorted(path.name for path in (tmp_path / "trials").iterdir()) == ["trial_0", "trial_1"]


class RecordingTrial:
    """An optuna trial stand-in that answers the lower bound of every range and records the ranges."""

    def __init__(self) -> None:
        self.params: dict[str, Any] = {}
        self.ranges: dict[str, tuple[float, float]] = {}

    def suggest_float(self, name: str, low: float, high: float, log: bool = False) -> float:
        self.ranges[name] = (low, high)
        self.params[name] = low
        return low

    def suggest_int(self, name: str, low: int, high: int) -> int:
        self.params[name] = low
        return low

    def suggest_categorical(self, name: str, choices: list) -> Any:
        self.params[name] = choices[0]
        return choices[0]

    def set_user_attr(self, key: str, value: Any) -> None:
        pass


@pytest.mark.parametrize("n_actions, dimensions", [(6, 6), (0, 1)])
def test_natural_gradient_search_space_scales_the_trust_region_by_the_action_dimensions(
    n_actions: int, dimensions: int
) -> None:
    # sb3-contrib's TRPO range (0.001, 0.1) per dimension is d times wider in our joint-KL convention
    from sb3_trust.zoo import sample_natural_gradient_params

    trial = RecordingTrial()
    sample_natural_gradient_params(trial, n_actions, 1, {})
    assert trial.ranges["target_kl"] == pytest.approx((0.001 * dimensions, 0.1 * dimensions))
    assert trial.ranges["cg_damping"] == pytest.approx((0.01 * dimensions, 1.0 * dimensions))


def test_registration_installs_our_converter() -> None:
    # rl-zoo3 rebuilds a stored trial's arguments with HYPERPARAMS_CONVERTER: ours caps batch_size at n_steps
    from rl_zoo3.hyperparams_opt import HYPERPARAMS_CONVERTER

    from sb3_trust.zoo import SAMPLERS, convert_sampled_params, register_algorithms

    register_algorithms()
    assert all(HYPERPARAMS_CONVERTER[algo] is convert_sampled_params for algo in SAMPLERS)


# --- Tests added by mutation testing ---


def test_main_registers_everything_before_rl_zoo_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    import rl_zoo3.train
    from rl_zoo3.hyperparams_opt import HYPERPARAMS_CONVERTER, HYPERPARAMS_SAMPLER, convert_onpolicy_params, sample_trpo_params
    from rl_zoo3.utils import ALGOS

    from sb3_trust import zoo

    register_algorithms()
    # sb3-contrib's TRPO keeps its search space and its converter under its new name
    assert HYPERPARAMS_SAMPLER["trpo_contrib"] is sample_trpo_params
    assert HYPERPARAMS_CONVERTER["trpo_contrib"] is convert_onpolicy_params
    # As in a fresh process: rl-zoo3's tables without our algorithms, until the wrapper's main adds them
    for table in (ALGOS, HYPERPARAMS_SAMPLER, HYPERPARAMS_CONVERTER):
        for algo in zoo.SAMPLERS:
            monkeypatch.delitem(table, algo)
    seen: list[dict[str, tuple]] = []

    def fake_train() -> None:
        tables = (ALGOS, HYPERPARAMS_SAMPLER, HYPERPARAMS_CONVERTER)
        seen.append({algo: tuple(table.get(algo) for table in tables) for algo in zoo.SAMPLERS})

    monkeypatch.setattr(rl_zoo3.train, "train", fake_train)
    monkeypatch.setattr(sys, "argv", sys.argv)
    zoo.main(["train", "--algo", "npg", "--env", "X-v0"])
    expected = {algo: (ALGORITHMS[algo], zoo.SAMPLERS[algo], zoo.convert_sampled_params) for algo in zoo.SAMPLERS}
    assert seen == [expected]


def test_rl_zoo_s_defaults_apply_without_algo_or_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import rl_zoo3.train

    from sb3_trust import zoo

    given: list[list[str]] = []
    monkeypatch.setattr(rl_zoo3.train, "train", lambda: given.append(sys.argv[1:]))
    monkeypatch.setattr(sys, "argv", sys.argv)
    # rl-zoo3's --algo is ppo by default: rl-zoo3 finds its file itself
    zoo.main(["train", "--env", "X-v0"])
    # its --env is CartPole-v1 by default, no Atari game: trpo.yml needs no atari entry for it
    zoo.main(["train", "--algo", "trpo"])
    assert given == [["--env", "X-v0"], ["--conf-file", str(CONFIG_DIR / "trpo.yml"), "--algo", "trpo"]]
    with pytest.raises(SystemExit, match="usage"):
        zoo.main([])


def test_command_lines_that_cannot_be_read_are_left_to_rl_zoo() -> None:
    from sb3_trust.zoo import _entry_overrides, _option_value

    assert _option_value(["--env", "x", "--algo"], "--algo") is None  # an option without its value
    assert _entry_overrides(["--env-kwargs", "frameskip"]) == {}  # not key:value: rl-zoo3 reports it


class SpaceRecordingTrial(RecordingTrial):
    """A RecordingTrial that also records every space: (low, high, log) ranges and categorical choices."""

    def __init__(self) -> None:
        super().__init__()
        self.spaces: dict[str, tuple] = {}

    def suggest_float(self, name: str, low: float, high: float, log: bool = False) -> float:
        self.spaces[name] = (low, high, log)
        return super().suggest_float(name, low, high, log)

    def suggest_int(self, name: str, low: int, high: int, log: bool = False) -> int:
        self.spaces[name] = (low, high, log)
        return super().suggest_int(name, low, high)

    def suggest_categorical(self, name: str, choices: list) -> Any:
        self.spaces[name] = tuple(choices)
        return super().suggest_categorical(name, choices)


def _spaces(sampler: Any) -> dict[str, tuple]:
    """
    :param sampler: an rl-zoo3 style sampler
    :return: the spaces it samples from, for one action dimension
    """
    trial = SpaceRecordingTrial()
    sampler(trial, 1, 1, {})
    return trial.spaces


def test_search_spaces_are_the_documented_ones() -> None:
    from rl_zoo3.hyperparams_opt import sample_a2c_params, sample_ppo_params, sample_trpo_params

    from sb3_trust.zoo import sample_acktr_params, sample_natural_gradient_params, sample_ppokl_params

    def without(spaces: dict[str, tuple], *keys: str) -> dict[str, tuple]:
        return {key: value for key, value in spaces.items() if key not in keys}

    # NPG and TRPO: rl-zoo3's TRPO space (target_kl is the same for one action dimension), with cg_damping added
    ours = _spaces(sample_natural_gradient_params)
    assert without(ours, "batch_size_pow", "cg_damping") == without(_spaces(sample_trpo_params), "batch_size_pow")
    # PPOKL: rl-zoo3's PPO space without the clipping, d_targ over the PPO paper's 0.003 to 0.03
    ours = _spaces(sample_ppokl_params)
    assert without(ours, "batch_size_pow", "target_kl") == without(_spaces(sample_ppo_params), "batch_size_pow", "clip_range")
    assert ours["target_kl"] == (0.003, 0.03, True)
    # ACKTR: A2C's loss settings, K-FAC's step around the paper's 0.25 and its trust region around baselines' 0.001
    ours = _spaces(sample_acktr_params)
    a2c = _spaces(sample_a2c_params)
    for key in ("one_minus_gamma", "one_minus_gae_lambda", "ent_coef", "max_grad_norm", "net_arch", "activation_fn"):
        assert ours[key] == a2c[key], key
    assert ours["learning_rate"][0] < 0.25 < ours["learning_rate"][1]
    assert ours["kfac_kl_clip"][0] < 0.001 < ours["kfac_kl_clip"][1]


def test_the_last_option_wins_in_either_spelling() -> None:
    from sb3_trust.zoo import _option_value

    # argparse keeps the last value, whether given as `--name value` or `--name=value`
    assert _option_value(["--algo=ppo", "--algo=npg"], "--algo") == "npg"
    assert _option_value(["--algo", "ppo", "--algo=npg"], "--algo") == "npg"
    assert _option_value(["--algo=ppo", "--algo", "npg"], "--algo") == "npg"
