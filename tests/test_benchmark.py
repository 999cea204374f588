"""The benchmark command: its sample-efficiency measure, a whole small run, and ``--resume``."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.vec_env import VecNormalize

from sb3_trust import benchmark


def test_steps_to_threshold_uses_the_moving_average() -> None:
    # Five returns of 0, then 100s: the 10-episode average first reaches 50 at the fifth 100 (t = 140), and 100
    # once the window holds only 100s (t = 190)
    episodes = [(10 * (i + 1), 0.0) for i in range(5)] + [(100 + 10 * i, 100.0) for i in range(10)]
    assert benchmark.steps_to_threshold(episodes, 50.0) == 140
    assert benchmark.steps_to_threshold(episodes, 100.0) == 190
    assert benchmark.steps_to_threshold(episodes, 101.0) is None
    assert benchmark.steps_to_threshold([], 0.0) is None
    # A 5-episode window holds only 100s from the fifth 100 on (t = 140); 2 episodes reach 50 at the first 100
    assert benchmark.steps_to_threshold(episodes, 100.0, window=5) == 140
    assert benchmark.steps_to_threshold(episodes, 50.0, window=2) == 100
    # One lucky first episode is not a whole window
    assert benchmark.steps_to_threshold([(100, 480.0)] + [(200 + i, 20.0) for i in range(20)], 475.0) is None

    # A grid point at an episode's end includes that episode; before the first one there is no value
    curve = benchmark._smoothed_curve([(10, 1.0), (20, 3.0)], np.array([5, 10, 15, 20]), 1)
    assert np.isnan(curve[0]) and list(curve[1:]) == [1.0, 1.0, 3.0]


def test_repeated_seeds_are_refused() -> None:
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--seeds", "2", "2"])


def test_the_two_sides_do_not_share_nested_arguments() -> None:
    # SB3's A2C adds its RMSprop settings to the policy_kwargs it is given
    setting = benchmark.make_setting(benchmark.PAIRS["acktr"], "CartPole-v1", {"n_steps": 8}, {}, None)
    kwargs = {**setting.peer_kwargs, "policy_kwargs": {"net_arch": [8]}}
    benchmark.build_model("stable_baselines3.A2C", setting, kwargs, seed=0, device="cpu")
    assert kwargs["policy_kwargs"] == {"net_arch": [8]}


def test_class_defaults_come_from_the_nearest_constructor() -> None:
    # NPG has no constructor of its own: its defaults are the base class's
    defaults = benchmark.class_defaults("sb3_trust.NPG")
    assert defaults["n_steps"] == 2048 and defaults["target_kl"] == 0.01
    assert benchmark.class_defaults("sb3_trust.TRPO")["line_search_shrinking_factor"] == 0.8


class MarkerPolicy(ActorCriticPolicy):
    """A policy class that only a dotted path names (not the default MlpPolicy's)."""


def test_a_dotted_policy_path_builds_that_policy() -> None:
    setting = benchmark.make_setting(benchmark.PAIRS["trpo"], "CartPole-v1", {"n_steps": 64, "batch_size": 64}, {}, None)
    setting.policy = "tests.test_benchmark.MarkerPolicy"
    model = benchmark.build_model("sb3_trust.TRPO", setting, setting.kwargs, seed=0, device="cpu")
    assert type(model.policy) is MarkerPolicy


def test_a_module_prefixed_id_reads_the_entry_of_its_env() -> None:
    prefixed = benchmark.make_setting(benchmark.PAIRS["trpo"], "gymnasium.envs.mujoco:HalfCheetah-v5", {}, {}, None)
    plain = benchmark.make_setting(benchmark.PAIRS["trpo"], "HalfCheetah-v5", {}, {}, None)
    assert prefixed.from_config and prefixed.kwargs == plain.kwargs and prefixed.n_envs == plain.n_envs == 2


def test_peer_gets_the_trust_region_in_its_per_dimension_convention() -> None:
    # zoo_configs/trpo.yml ships the zoo's HalfCheetah values times its 6 action dimensions (0.24, 0.6)
    setting = benchmark.make_setting(benchmark.PAIRS["trpo"], "HalfCheetah-v5", {}, {}, None)
    assert (setting.kwargs["target_kl"], setting.kwargs["cg_damping"]) == (0.24, 0.6)
    assert (setting.peer_kwargs["target_kl"], setting.peer_kwargs["cg_damping"]) == (0.04, 0.1)
    assert setting.peer_kwargs["n_critic_updates"] == setting.kwargs["n_critic_updates"]
    # one action dimension changes nothing: the peer gets the shared values (and both classes' default damping)
    setting = benchmark.make_setting(benchmark.PAIRS["npg"], "Pendulum-v1", {"target_kl": 0.02}, {}, None)
    assert setting.peer_kwargs == setting.kwargs and setting.peer_kwargs["target_kl"] == 0.02
    assert "cg_damping" not in setting.peer_kwargs and benchmark.class_defaults("sb3_contrib.TRPO")["cg_damping"] == 0.1
    # our class's default is converted when the config has no value (Hopper's entry sets cg_damping, not target_kl here)
    setting = benchmark.make_setting(benchmark.PAIRS["npg"], "Hopper-v5", {}, {}, None)
    assert setting.peer_kwargs["target_kl"] == float(f"{setting.kwargs['target_kl'] / 3:.12g}")
    setting = benchmark.make_setting(benchmark.PAIRS["trpo"], "Hopper-v5", {"cg_damping": 0.3}, {"target_kl": 0.5}, None)
    assert (setting.peer_kwargs["target_kl"], setting.peer_kwargs["cg_damping"]) == (0.5, 0.1)


def test_vine_sampling_and_cg_tolerance_go_to_ours_only() -> None:
    # sb3-contrib's TRPO has neither: the peer keeps its single-path sampling and its own CG tolerance
    overrides = {"sampling": "vine", "vine_n_states": 16, "vine_n_actions": 3, "vine_horizon": 50, "cg_tolerance": 1e-8}
    for algo in ("trpo", "npg"):
        setting = benchmark.make_setting(benchmark.PAIRS[algo], "CartPole-v1", {"cg_tolerance": 1e-8}, {}, None)
        assert setting.kwargs["cg_tolerance"] == 1e-8 and "cg_tolerance" not in setting.peer_kwargs
    setting = benchmark.make_setting(benchmark.PAIRS["trpo"], "CartPole-v1", overrides, {}, None)
    assert {key: setting.kwargs[key] for key in overrides} == overrides
    assert not set(overrides) & set(setting.peer_kwargs)


def _run(output: Path, *extra: str) -> int:
    common = ["--algo", "trpo", "--env", "CartPole-v1", "--seeds", "0", "--timesteps", "1024", "--jobs", "1"]
    return benchmark.main([*common, "--eval-episodes", "2", "--output", str(output), *extra])


def _per_seed_figures(report: str) -> dict[str, list[str]]:
    """
    :param report: a benchmark report
    :return: for each side, the "per seed" cells of its rows (returns table first, then the threshold table's)
    """
    figures: dict[str, list[str]] = {"ours": [], "peer": []}
    for line in report.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        side = cells[0].split(":")[0]
        if line.startswith("| ") and side in figures:
            figures[side].append(cells[2])
    assert all(cells and all(cells) for cells in figures.values()), report
    return figures


def _speed_rows(report: str) -> list[str]:
    return [line for line in report.splitlines() if line.startswith(("| train() time", "| learn() throughput"))]


def test_benchmark_speed_and_returns_then_resume(tmp_path: Path) -> None:
    assert _run(tmp_path, "--mode", "all", "--speed-updates", "1") == 0
    report = (tmp_path / "trpo_CartPole-v1_all.md").read_text()
    assert "ratio ours / peer" in report and "Ratio of the mean final eval returns" in report
    assert "Sample efficiency: timesteps to reach a return of 475" in report
    assert (tmp_path / "trpo_CartPole-v1_curve.png").stat().st_size > 0
    runs = {side: tmp_path / "runs" / f"trpo_CartPole-v1_{side}_seed0.json" for side in ("ours", "peer")}
    for side, path in runs.items():
        result = json.loads(path.read_text())
        assert result["side"] == side and result["timesteps"] == 1024 and len(result["eval_returns"]) == 2
        assert result["code"].startswith("sb3_trust ")
    assert f"Runs made by: {result['code']}: 2 run(s)" in report
    written = {side: path.stat().st_mtime_ns for side, path in runs.items()}

    # --resume reads the finished runs instead of running them again, and reports them the same way
    assert _run(tmp_path, "--mode", "returns", "--resume") == 0
    assert {side: path.stat().st_mtime_ns for side, path in runs.items()} == written
    resumed = _per_seed_figures((tmp_path / "trpo_CartPole-v1_returns.md").read_text())
    assert resumed == _per_seed_figures(report)
    assert resumed["ours"][0] == f"0: {json.loads(runs['ours'].read_text())['eval_mean']:.1f}"
    # the report can be rebuilt with another smoothing of the curves and the threshold measure
    assert _run(tmp_path, "--mode", "returns", "--resume", "--smoothing", "3") == 0
    assert "3-episode moving average" in (tmp_path / "trpo_CartPole-v1_returns.md").read_text()

    # without --resume, saved runs are not overwritten, and --mode all stops before measuring the speed
    speed = tmp_path / "trpo_CartPole-v1_speed.json"
    speed_written = speed.stat().st_mtime_ns
    for mode in ("returns", "all"):
        with pytest.raises(benchmark.SavedResultsRefused, match="--resume"):
            _run(tmp_path, "--mode", mode, "--speed-updates", "1")
    assert {side: path.stat().st_mtime_ns for side, path in runs.items()} == written
    assert speed.stat().st_mtime_ns == speed_written
    # nor is a saved speed measurement: --resume reports it without measuring again, so --mode all can resume
    with pytest.raises(benchmark.SavedResultsRefused, match="Speed measurements are already saved"):
        _run(tmp_path, "--mode", "speed", "--speed-updates", "1")
    assert _run(tmp_path, "--mode", "all", "--resume", "--speed-updates", "1") == 0
    assert speed.stat().st_mtime_ns == speed_written
    assert {side: path.stat().st_mtime_ns for side, path in runs.items()} == written
    resumed_report = (tmp_path / "trpo_CartPole-v1_all.md").read_text()
    assert _speed_rows(resumed_report) == _speed_rows(report) and _speed_rows(report)
    # the resumed report says when and by what code the timings were made, not only today's date and code
    measured = json.loads(speed.read_text())
    assert measured["code"].startswith("sb3_trust ") and measured["date"]
    assert f"measured {measured['date']}, {measured['code']}" in resumed_report

    # another command in the same folder (other seeds: no saved run of its own) leaves the reports and curves alone
    curve = tmp_path / "trpo_CartPole-v1_curve.png"
    derived = {path: path.stat().st_mtime_ns for path in (curve, tmp_path / "trpo_CartPole-v1_returns.md")}
    with pytest.raises(benchmark.SavedResultsRefused, match="--resume"):
        _run(tmp_path, "--mode", "returns", "--seeds", "5")
    assert {path: path.stat().st_mtime_ns for path in derived} == derived
    assert not (tmp_path / "runs" / "trpo_CartPole-v1_ours_seed5.json").exists()
    with pytest.raises(benchmark.SavedResultsRefused, match="other settings"):
        _run(tmp_path, "--mode", "speed", "--resume", "--speed-updates", "2")

    # a saved run made with other settings is not silently mixed in
    with pytest.raises(benchmark.SavedResultsRefused, match="other settings"):
        _run(tmp_path, "--mode", "returns", "--resume", "--hyperparams", "n_critic_updates=3")
    with pytest.raises(benchmark.SavedResultsRefused, match="other settings"):
        _run(tmp_path, "--mode", "returns", "--resume", "--eval-episodes", "3")
    with pytest.raises(benchmark.SavedResultsRefused, match="threads differ"):
        _run(tmp_path, "--mode", "returns", "--resume", "--threads", "2")


def test_speed_alternates_the_sides_update_by_update(monkeypatch: pytest.MonkeyPatch) -> None:
    # A transient slowdown of the machine must fall on both sides alike: ours, peer, ours, peer, ... per update
    calls: list[tuple[str, int]] = []

    def one_update(model: Any, updates: int, side: str, seed: int) -> benchmark.SpeedSample:
        calls.append((side, updates))
        return benchmark.SpeedSample(side, seed, 10, 0.5 if side == "ours" else 1.0, [0.1 * len(calls)])

    monkeypatch.setattr(benchmark, "build_model", lambda *args, **kwargs: SimpleNamespace(get_env=lambda: None))
    monkeypatch.setattr(benchmark, "warm_up", lambda model: None)
    monkeypatch.setattr(benchmark, "time_updates", one_update)
    collections: list[int] = []
    monkeypatch.setattr(benchmark.gc, "collect", lambda: collections.append(len(calls)))
    setting = benchmark.make_setting(benchmark.PAIRS["trpo"], "CartPole-v1", {}, {}, None)
    samples = benchmark.measure_speed(benchmark.PAIRS["trpo"], setting, [7], updates=3, device="cpu")
    assert calls == [("ours", 1), ("peer", 1)] * 3
    assert collections == [0]  # one collection per seed, before the timed updates, not before each of them
    ours, peer = samples
    assert (ours.side, ours.seed, ours.steps, ours.learn_time) == ("ours", 7, 30, 1.5)
    assert ours.train_times == pytest.approx([0.1, 0.3, 0.5]) and peer.train_times == pytest.approx([0.2, 0.4, 0.6])
    assert peer.throughput == pytest.approx(10.0)


def test_a_speed_measurement_saved_without_its_provenance_says_so(tmp_path: Path) -> None:
    path = tmp_path / "speed.json"
    sample = benchmark.SpeedSample("ours", 0, 10, 0.5, [0.1])
    path.write_text(json.dumps({"identity": {"k": 1}, "samples": [dataclasses.asdict(sample)]}))
    samples, provenance = benchmark.load_speed_samples(path, {"k": 1})  # type: ignore[misc]
    assert samples == [sample] and provenance == "date not recorded, code version not recorded"


def _result(side: str, seed: int, eval_mean: float, episodes: list | None = None, timesteps: int = 1000) -> dict:
    return {
        "side": side,
        "seed": seed,
        "eval_mean": eval_mean,
        "wall_time_s": 1.0,
        "episodes": episodes or [],
        "timesteps": timesteps,
    }


def _setting(threshold: float | None = None) -> benchmark.Setting:
    return benchmark.Setting("CartPole-v1", 1, "MlpPolicy", None, 1000, {}, {}, True, threshold=threshold)


def test_returns_report_gives_mean_std_and_the_ratio_ours_over_peer() -> None:
    # the mean over seeds (not the median: 0, 0, 3 -> 1.0) and the ratio ours / peer (1.0 / 0.5 = 2)
    results = [_result("ours", seed, value) for seed, value in enumerate((0.0, 0.0, 3.0))]
    results += [_result("peer", seed, value) for seed, value in enumerate((0.0, 0.0, 1.5))]
    report = benchmark.returns_report(benchmark.PAIRS["trpo"], _setting(), results, [], "", 10)
    assert f"1.0 ± {np.std([0, 0, 3]):.1f} (n=3)" in report and "0.5 ± " in report
    assert "**2.000**" in report


def test_threshold_ratio_is_peer_over_ours() -> None:
    # ours reaches 10 at t=100, the peer at t=400: peer / ours = 4
    fast = [(100, 10.0)]
    slow = [(100, 0.0), (400, 30.0)]
    results = [_result("ours", 0, 0.0, fast), _result("peer", 0, 0.0, slow)]
    report = benchmark.threshold_report(benchmark.PAIRS["trpo"], _setting(10.0), results, smoothing=1)
    assert "**4.000**" in report


def test_a_threshold_never_reached_gives_a_lower_bound() -> None:
    # the peer never reaches 10 in its 1000 steps: it counts as 1000, and the ratio 1000 / 100 is a lower bound
    results = [_result("ours", 0, 0.0, [(100, 10.0)]), _result("peer", 0, 0.0, [(100, 0.0)], timesteps=1000)]
    report = benchmark.threshold_report(benchmark.PAIRS["trpo"], _setting(10.0), results, smoothing=1)
    assert "**≥ 10.000" in report


def test_speed_report_ratio_is_ours_over_peer() -> None:
    # ours' train() takes 0.1 s, the peer's 0.4 s: the train-time ratio is 0.250
    samples = [benchmark.SpeedSample("ours", 0, 100, 1.0, [0.1]), benchmark.SpeedSample("peer", 0, 100, 1.0, [0.4])]
    report = benchmark.speed_report(benchmark.PAIRS["trpo"], samples, 1, 1, "now")
    train_row = next(line for line in report.splitlines() if line.startswith("| train() time"))
    assert train_row.rstrip(" |").endswith("0.250")
    # Over several updates: train() is their mean, the rollout what the rest of the wall time gives per update
    sample = benchmark.SpeedSample("ours", 0, 100, 1.0, [0.1, 0.3])
    assert sample.train_ms == pytest.approx(200.0) and sample.rollout_ms == pytest.approx(300.0)


def test_a_shorter_saved_run_is_refused(tmp_path: Path) -> None:
    # a saved run may exceed the requested timesteps by less than one rollout (learn() finishes its rollout),
    # never fall short of them
    setting = benchmark.make_setting(benchmark.PAIRS["trpo"], "CartPole-v1", {"n_steps": 64, "batch_size": 64}, {}, 1000)
    task = benchmark.RunTask("trpo", "ours", "sb3_trust.TRPO", setting, 0, 2, "cpu", 1, str(tmp_path))
    identity = benchmark._run_identity(task)
    task.result_path.parent.mkdir(parents=True)
    for timesteps, accepted in ((1000 + 63 * setting.n_envs, True), (1000 - 1, False), (1000 + 64 * setting.n_envs, False)):
        task.result_path.write_text(json.dumps({**identity, "timesteps": timesteps, "eval_returns": [0.0, 0.0]}))
        if accepted:
            assert benchmark.load_finished_run(task) is not None
        else:
            with pytest.raises(ValueError, match="timesteps"):
                benchmark.load_finished_run(task)


def test_a_saved_speed_measurement_stops_mode_all_before_it_measures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # --mode all without --resume never measures the speed again over a saved measurement
    (tmp_path / "trpo_CartPole-v1_speed.json").write_text("{}")

    def measure_speed(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("measured again")

    monkeypatch.setattr(benchmark, "measure_speed", measure_speed)
    with pytest.raises(benchmark.SavedResultsRefused, match="Speed measurements are already saved"):
        benchmark.main(["--algo", "trpo", "--env", "CartPole-v1", "--mode", "all", "--seeds", "0", "--output", str(tmp_path)])


def test_multibinary_actions_count_their_dimensions(monkeypatch: pytest.MonkeyPatch) -> None:
    # sb3-contrib averages the KL over MultiBinary's dimensions too
    fake = SimpleNamespace(action_space=gym.spaces.MultiBinary(5), close=lambda: None)
    monkeypatch.setattr(benchmark.gym, "make", lambda env_id: fake)
    assert benchmark.action_dimensions("Fake-v0") == 5


def test_learning_run_evaluates_deterministically_with_frozen_statistics(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # deterministic episodes on a VecNormalize that neither updates nor normalizes rewards
    calls: list[tuple[Any, dict]] = []

    def recording_evaluate(model: Any, env: Any, **kwargs: Any) -> tuple[list[float], list[int]]:
        calls.append((env, kwargs))
        return [0.0], [1]

    monkeypatch.setattr(benchmark, "evaluate_policy", recording_evaluate)
    seeds: list[int] = []
    make_env = benchmark.make_env
    monkeypatch.setattr(
        benchmark, "make_env", lambda setting, seed, *a, **k: seeds.append(seed) or make_env(setting, seed, *a, **k)
    )
    overrides = {"n_steps": 32, "batch_size": 32, "n_critic_updates": 1, "normalize": True}
    setting = benchmark.make_setting(benchmark.PAIRS["trpo"], "CartPole-v1", overrides, {}, 32)
    task = benchmark.RunTask("trpo", "ours", "sb3_trust.TRPO", setting, 3, 1, "cpu", 1, str(tmp_path))
    benchmark.learning_run(task)
    ((env, kwargs),) = calls
    assert kwargs["deterministic"] is True
    assert isinstance(env, VecNormalize) and not env.training and not env.norm_reward
    assert seeds == [3, 3 + benchmark.EVAL_SEED_OFFSET]  # the evaluation episodes are not the training ones


def test_a_refusal_on_the_command_line_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "trpo_CartPole-v1_ours_seed0.json").write_text("{}")
    command = [sys.executable, "-m", "sb3_trust.benchmark", "--env", "CartPole-v1", "--seeds", "0", "--mode", "returns"]
    finished = subprocess.run([*command, "--output", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert finished.returncode == 1
    assert (
        finished.stderr.startswith("benchmark: error: 1 of these runs are already saved")
        and "Traceback" not in finished.stderr
    )


def test_every_seed_runs_on_both_sides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tasks: list[benchmark.RunTask] = []

    def run_returns(missing: list[benchmark.RunTask], jobs: int) -> tuple[list, list]:
        tasks.extend(missing)
        return [], []

    monkeypatch.setattr(benchmark, "run_returns", run_returns)
    benchmark.main(
        ["--algo", "trpo", "--env", "CartPole-v1", "--mode", "returns", "--seeds", "0", "1", "--output", str(tmp_path)]
    )
    assert sorted((task.side, task.seed) for task in tasks) == [("ours", 0), ("ours", 1), ("peer", 0), ("peer", 1)]
