"""
Compare an sb3_trust algorithm with its peer implementation under identical hyperparameters.

Usage::

    python -m sb3_trust.benchmark --algo trpo --env HalfCheetah-v5 --mode speed
    python -m sb3_trust.benchmark --algo trpo --env HalfCheetah-v5 Hopper-v5 --mode returns --seeds 0 1 2 --jobs 2
    python -m sb3_trust.benchmark --env CartPole-v1 --mode all --seeds 0 --timesteps 4096 --speed-updates 2 --jobs 1
    python -m sb3_trust.benchmark --algo ppokl --env CartPole-v1 Pendulum-v1 --mode returns --seeds 0 1 2
    python -m sb3_trust.benchmark --algo acktr --env CartPole-v1 --mode returns --seeds 0 1 2 --threshold CartPole-v1=475

Each ``--algo`` names an entry of ``PAIRS``: our class, the peer's class (both as dotted paths, imported only
when used) and the RL Zoo file of ``zoo_configs/`` that holds the hyperparameters. Both algorithms get the
same hyperparameters (``--hyperparams key=value ...`` overrides them for both) and identically seeded
environments (``make_vec_env``, plus ``VecNormalize`` with the algorithm's gamma when the config normalizes).
The exceptions are a pair's ``ours_only`` keys, arguments that only our class understands or that mean something
else to the peer: they are given to ours alone (the peer keeps its own class default unless ``--peer-hyperparams``
sets them), and the report lists them with the peer's defaults. A pair's ``per_dimension`` keys are those the
peer reads per action dimension (sb3-contrib's TRPO averages its KL over them): the peer gets ours divided by the
number of action dimensions, so that both run the same trust region. A pair's ``shared_defaults`` keys are given to both
with our class's default when neither the config nor ``--hyperparams`` sets them, so that the two classes'
different defaults do not make the settings differ.

Modes:

``speed``
    In this process only, one seed after the other, never in parallel with anything else. For each seed, ours
    and the peer are built, warmed up with one iteration each, then timed in turn (ours, peer) over
    ``--speed-updates`` further iterations of one ``learn()`` call each: the time of every ``train()`` call
    (the model's ``train`` method is wrapped with a timer) and the whole ``learn()`` time, from which the
    throughput (env steps/s) and the rollout time (learn time minus train time) follow. Torch uses
    ``--threads`` threads (default 1). Ratios are ours / peer of the means over seeds. The timings go to
    ``<output>/<algo>_<env>_speed.json``, never overwritten: a folder that already holds them is refused, except with
    ``--resume``, which reports them instead of measuring again (so ``--mode all --resume`` continues the returns).
``returns``
    Full learning runs (``--timesteps``, default: the config's ``n_timesteps``) of both algorithms for every
    seed, in spawned worker processes, at most ``--jobs`` at a time, each with ``--threads`` torch threads.
    Each run records every finished training episode (timestep, return) and ends with ``--eval-episodes``
    deterministic episodes on a separate environment (seed + 10000) whose ``VecNormalize`` statistics are
    copied from the training environment. Each run's JSON is written to ``<output>/runs/`` when it finishes;
    a run already saved there is an error unless ``--resume`` reads it.
    The learning curves are drawn to ``<output>/<algo>_<env>_curve.png``. The wall times of these runs are
    taken in parallel and are no speed measurement. Sample efficiency: with a return threshold for the environment
    (``--threshold ENV=VALUE``; defaults in ``DEFAULT_THRESHOLDS``), the report gives for each run the first
    timestep at which the moving average of the training episode returns (the curve's smoothing, ``--smoothing``
    episodes) reaches it, the mean over seeds, and the ratio peer / ours (above 1: ours needs fewer steps).
    With ``--resume``, a run whose JSON is already in ``<output>/runs/`` is read instead of run again, so an
    interrupted benchmark picks up where it stopped and more seeds can be added to a folder (with ``--mode returns``:
    ``all`` also reads the saved speed measurement, which must be of the same seeds); a saved run whose settings
    differ from the command's is an error (choose another ``--output``).
``all``
    ``speed`` for every environment, then ``returns``.

The Markdown report of each environment goes to stdout and to ``<output>/<algo>_<env>_<mode>.md``, with the
command line, the date and the machine. A new pair is one more ``PAIRS`` entry (and its config file).
"""

import argparse
import ast
import copy
import gc
import importlib
import inspect
import json
import multiprocessing
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

import gymnasium as gym
import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.vec_env import VecEnv, sync_envs_normalization

import sb3_trust
from sb3_trust.train import (
    CONFIG_DIR,
    EVAL_SEED_OFFSET,
    RUN_KEYS,
    build_env,
    import_object,
    load_hyperparameters,
    normalize_kwargs,
    registered_id,
    resolve_policy,
    split_run_keys,
)


class SavedResultsRefused(ValueError):
    """
    The output folder holds results this command must not overwrite or mix in (saved runs or reports, without
    ``--resume``; runs or a speed measurement made with other settings). Run from the command line, the message
    is the error, without a traceback.
    """


_KL_NOTE = (
    "sb3_trust bounds the mean KL of the joint action distribution, while sb3-contrib's TRPO averages its KL (and so "
    "its Fisher matrix, to which it adds `cg_damping`) over the d dimensions of a Box or MultiBinary action space: "
    "the peer gets our `target_kl` and `cg_damping` divided by d, the same trust region and the same direction "
    "(`--peer-hyperparams` overrides them)."
)
# The keys that the per-dimension KL convention of sb3-contrib's TRPO rescales
_PER_DIMENSION_KEYS = ("target_kl", "cg_damping")
# PPOKL's adaptive-penalty arguments: SB3's PPO has no penalty, and its `target_kl` would stop the epochs early
_PPOKL_ONLY = ("target_kl", "kl_coef", "kl_tolerance", "kl_coef_factor", "kl_coef_min", "kl_coef_max")
_PPOKL_NOTE = (
    "this pair compares the adaptive KL penalty with PPO's clipped objective. The penalty's keys "
    f"({', '.join(f'`{key}`' for key in _PPOKL_ONLY)}) go to sb3_trust's PPOKL only: SB3's PPO has no penalty, and "
    "its `target_kl` means early stopping of the epochs, not the KL the penalty steers towards. The peer keeps "
    "SB3 PPO's default `clip_range=0.2` (the clipped objective) while ours has no clipping (`clip_range=None`, "
    "the pure penalty method); otherwise identical settings."
)
# ACKTR's K-FAC arguments, and its learning rate, which is K-FAC's step length (0.25), not an RMSprop rate
_ACKTR_ONLY = (
    "learning_rate",
    "vf_fisher_coef",
    "kfac_kl_clip",
    "kfac_damping",
    "kfac_stat_decay",
    "kfac_inverse_update_freq",
    "kfac_cold_iters",
    "kfac_momentum",
    "kfac_weight_decay",
)
# A2C's loss settings, whose defaults differ between the classes (n_steps 20 / 5, ent_coef 0.01 / 0, vf_coef 0.25 / 0.5)
_A2C_SHARED = ("n_steps", "gamma", "gae_lambda", "ent_coef", "vf_coef", "max_grad_norm", "normalize_advantage")
_ACKTR_NOTE = (
    "this pair compares K-FAC's natural-gradient step (ACKTR) with A2C's RMSprop on the same loss. Both get the same "
    f"{', '.join(f'`{key}`' for key in _A2C_SHARED)} (ACKTR's defaults where the config has none). "
    "`learning_rate` goes to ACKTR only: ACKTR's (0.25, K-FAC's step length before the trust-region scale) would be "
    "absurd for RMSprop, so A2C keeps its own default 7e-4 unless `--peer-hyperparams learning_rate=...` is given; "
    f"the K-FAC keys ({', '.join(f'`{key}`' for key in _ACKTR_ONLY[1:])}) go to ACKTR only."
)
# Arguments that sb3-contrib's TRPO does not have: the conjugate gradient's stopping tolerance, and vine sampling's
_TRPO_ONLY = ("cg_tolerance", "sampling", "vine_n_states", "vine_n_actions", "vine_horizon")
# Return thresholds of the sample-efficiency measure: gymnasium's registered `reward_threshold` of these tasks
DEFAULT_THRESHOLDS: dict[str, float] = {"CartPole-v1": 475.0, "LunarLander-v3": 200.0}


class Pair(NamedTuple):
    """
    One comparison: our algorithm, its peer, and where their hyperparameters come from.

    :param ours: dotted path of our algorithm class
    :param peer: dotted path of the peer's algorithm class
    :param config: RL Zoo YAML file in ``zoo_configs/`` with the hyperparameters of both
    :param note: caveat printed with every report of this pair
    :param ours_only: algorithm keyword arguments given to our class only (the peer lacks them, or reads them
        differently): removed from the peer's keyword arguments, so the peer uses its own default, and listed in
        the report
    :param shared_defaults: algorithm keyword arguments given to both sides with our class's default when neither
        the config nor ``--hyperparams`` sets them (the two classes' defaults differ)
    :param per_dimension: algorithm keyword arguments that the peer reads per action dimension: it gets ours (the
        config's, else our class's default) divided by the number of action dimensions (``action_dimensions``)
    """

    ours: str
    peer: str
    config: str
    note: str = ""
    ours_only: tuple[str, ...] = ()
    shared_defaults: tuple[str, ...] = ()
    per_dimension: tuple[str, ...] = ()


PAIRS: dict[str, Pair] = {
    "trpo": Pair("sb3_trust.TRPO", "sb3_contrib.TRPO", "trpo.yml", _KL_NOTE, _TRPO_ONLY, per_dimension=_PER_DIMENSION_KEYS),
    "npg": Pair("sb3_trust.NPG", "sb3_contrib.TRPO", "npg.yml", _KL_NOTE, _TRPO_ONLY[:1], per_dimension=_PER_DIMENSION_KEYS),
    "ppokl": Pair("sb3_trust.PPOKL", "stable_baselines3.PPO", "ppokl.yml", _PPOKL_NOTE, _PPOKL_ONLY),
    "acktr": Pair("sb3_trust.ACKTR", "stable_baselines3.A2C", "acktr.yml", _ACKTR_NOTE, _ACKTR_ONLY, _A2C_SHARED),
}
SIDES = ("ours", "peer")
MODES = ("speed", "returns", "all")
# Keys set by the benchmark itself, not by --hyperparams
RESERVED_KEYS = ("seed", "device", "verbose", "env")
DEFAULT_TIMESTEPS = 100_000
CURVE_POINTS = 200
SMOOTHING_EPISODES = 10


@dataclass
class Setting:
    """
    Everything both sides of a comparison share on one environment.

    :param env_id: Gymnasium environment id
    :param n_envs: number of parallel environments
    :param policy: policy name (e.g. ``MlpPolicy``) or a policy class's dotted path
    :param normalize: ``VecNormalize`` keyword arguments, or None without normalization
    :param timesteps: training steps of a learning run
    :param kwargs: algorithm keyword arguments of our side
    :param peer_kwargs: algorithm keyword arguments of the peer (``kwargs`` without the pair's ``ours_only`` keys
        and with its ``per_dimension`` keys converted, unless ``--peer-hyperparams``)
    :param from_config: whether the config file has an entry for ``env_id``
    :param ours_only: the entries of ``kwargs`` that were kept from the peer (the pair's ``ours_only`` keys)
    :param threshold: return threshold of the sample-efficiency measure, or None without one
    """

    env_id: str
    n_envs: int
    policy: str
    normalize: dict[str, Any] | None
    timesteps: int
    kwargs: dict[str, Any]
    peer_kwargs: dict[str, Any]
    from_config: bool
    ours_only: dict[str, Any] = field(default_factory=dict)
    threshold: float | None = None

    @property
    def shared_kwargs(self) -> dict[str, Any]:
        """The algorithm keyword arguments of our side that the peer gets too (all but ``ours_only``)."""
        return {key: value for key, value in self.kwargs.items() if key not in self.ours_only}

    def side_kwargs(self, side: str) -> dict[str, Any]:
        """
        :param side: ``"ours"`` or ``"peer"``
        :return: the algorithm keyword arguments of that side
        """
        return self.kwargs if side == "ours" else self.peer_kwargs


@dataclass
class SpeedSample:
    """
    The timings of one model over ``len(train_times)`` updates, made by one or more timed ``learn()`` calls.

    :param side: ``"ours"`` or ``"peer"``
    :param seed: the seed of the model and its environment
    :param steps: environment steps of the timed ``learn()`` calls
    :param learn_time: seconds of the timed ``learn()`` calls
    :param train_times: seconds of each ``train()`` call within them
    """

    side: str
    seed: int
    steps: int
    learn_time: float
    train_times: list[float] = field(default_factory=list)

    @property
    def train_ms(self) -> float:
        """Mean milliseconds of one ``train()`` call."""
        return 1e3 * float(np.mean(self.train_times))

    @property
    def throughput(self) -> float:
        """Environment steps per second of the whole ``learn()`` call."""
        return self.steps / self.learn_time

    @property
    def rollout_ms(self) -> float:
        """Milliseconds per update spent outside ``train()`` (collecting the rollout, callbacks, logging)."""
        return 1e3 * (self.learn_time - sum(self.train_times)) / len(self.train_times)

    @property
    def train_share(self) -> float:
        """Fraction of the ``learn()`` time spent in ``train()``."""
        return sum(self.train_times) / self.learn_time


@dataclass
class RunTask:
    """
    One learning run of the ``returns`` mode, as sent to a worker process.

    :param algo: key of ``PAIRS``
    :param side: ``"ours"`` or ``"peer"``
    :param class_path: dotted path of the algorithm class
    :param setting: the environment's shared setting
    :param seed: the seed of the model and its training environment
    :param eval_episodes: number of deterministic evaluation episodes
    :param device: torch device
    :param threads: torch threads of the worker
    :param output: folder of the results
    """

    algo: str
    side: str
    class_path: str
    setting: Setting
    seed: int
    eval_episodes: int
    device: str
    threads: int
    output: str

    @property
    def name(self) -> str:
        """File stem of the run's results."""
        return f"{self.algo}_{self.setting.env_id}_{self.side}_seed{self.seed}"

    @property
    def result_path(self) -> Path:
        """Where the finished run's JSON is saved."""
        return Path(self.output) / "runs" / f"{self.name}.json"


class EpisodeRecorder(BaseCallback):
    """Records (timestep, return, length) of every finished training episode, from the ``Monitor`` infos."""

    def __init__(self) -> None:
        super().__init__()
        self.episodes: list[tuple[int, float, int]] = []

    def _on_step(self) -> bool:
        for info in self.locals.get("infos", []):
            episode = info.get("episode")
            if episode is not None:
                self.episodes.append((self.num_timesteps, float(episode["r"]), int(episode["l"])))
        return True


def resolve_class(path: str) -> type[BaseAlgorithm]:
    """
    Import a class from its dotted path.

    :param path: e.g. ``"sb3_contrib.TRPO"``
    :return: the class
    """
    cls = import_object(path)
    if not (isinstance(cls, type) and issubclass(cls, BaseAlgorithm)):
        raise TypeError(f"{path} is not a Stable-Baselines3 algorithm")
    return cls


def _parse_value(key: str, text: str) -> Any:
    """
    :param key: the hyperparameter's name
    :param text: its value on the command line
    :return: the Python literal ``text`` stands for (``policy_kwargs`` may also use ``dict(...)`` and ``nn.*``),
        or ``text`` itself when it is no literal
    """
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if key == "policy_kwargs":
            return eval(text, {"nn": th.nn, "dict": dict})
        return text


def key_value(item: str) -> tuple[str, Any]:
    """
    argparse type of ``--hyperparams`` items.

    :param item: ``key=value``
    :return: the key and the parsed value
    """
    key, separator, text = item.partition("=")
    key = key.strip()
    if not separator or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {item!r}")
    if key in RESERVED_KEYS:
        raise argparse.ArgumentTypeError(f"{key!r} is set by the benchmark itself")
    try:
        return key, _parse_value(key, text)
    except Exception as error:
        raise argparse.ArgumentTypeError(f"cannot parse {item!r}: {error}") from error


def class_defaults(class_path: str) -> dict[str, Any]:
    """
    :param class_path: dotted path of an algorithm class
    :return: the default values of its constructor's keyword arguments, including those a subclass passes on
        through ``**kwargs`` (the nearest class in the MRO that names an argument gives its default)
    """
    defaults: dict[str, Any] = {}
    for cls in resolve_class(class_path).__mro__:
        constructor = vars(cls).get("__init__")
        if constructor is None:
            continue
        for name, parameter in inspect.signature(constructor).parameters.items():
            if parameter.default is not inspect.Parameter.empty:
                defaults.setdefault(name, parameter.default)
    return defaults


def action_dimensions(env_id: str) -> int:
    """
    :param env_id: Gymnasium environment id
    :return: the number of action dimensions over which sb3-contrib averages its KL: those of a Box or MultiBinary
        action space, 1 for Discrete and MultiDiscrete (whose KL SB3 sums over their components)
    """
    env = gym.make(env_id)
    action_space = env.action_space
    env.close()
    if isinstance(action_space, (spaces.Box, spaces.MultiBinary)):
        return int(np.prod(action_space.shape))
    return 1


def make_setting(
    pair: Pair,
    env_id: str,
    overrides: dict[str, Any],
    peer_overrides: dict[str, Any],
    timesteps: int | None,
    threshold: float | None = None,
) -> Setting:
    """
    The shared setting of an environment: the pair's config entry with the command line's overrides.

    :param pair: the comparison
    :param env_id: Gymnasium environment id
    :param overrides: ``--hyperparams`` (both sides, run keys included; the pair's ``ours_only`` keys go to ours only)
    :param peer_overrides: ``--peer-hyperparams`` (the peer's algorithm keyword arguments only, applied after the
        ``ours_only`` keys are removed and the ``per_dimension`` keys converted: they can set any of those for the
        peer)
    :param timesteps: ``--timesteps``, or None for the config's ``n_timesteps``
    :param threshold: return threshold of the sample-efficiency measure, or None
    :return: the setting
    """
    # A module-prefixed id ("module:EnvId", as gym.make reads it) has the entry of EnvId
    hyperparameters = load_hyperparameters(Path(pair.config).stem, registered_id(env_id), CONFIG_DIR)
    from_config = bool(hyperparameters)
    hyperparameters.update(overrides)
    if pair.shared_defaults:
        defaults = class_defaults(pair.ours)
        for key in pair.shared_defaults:
            hyperparameters.setdefault(key, defaults[key])
    run = split_run_keys(hyperparameters, env_id)
    misplaced = sorted(set(peer_overrides) & set(RUN_KEYS))
    if misplaced:
        raise ValueError(f"--peer-hyperparams cannot change the shared run keys {misplaced}")
    ours_only = {key: value for key, value in hyperparameters.items() if key in pair.ours_only}
    shared = {key: value for key, value in hyperparameters.items() if key not in ours_only}
    converted: dict[str, Any] = {}
    dimensions = action_dimensions(env_id) if pair.per_dimension else 1
    if dimensions > 1:
        ours = {**class_defaults(pair.ours), **hyperparameters}
        # Rounded so that 0.24 / 6 reads 0.04, not 0.039999999999999994
        converted = {key: float(f"{ours[key] / dimensions:.12g}") for key in pair.per_dimension}
    return Setting(
        env_id=env_id,
        n_envs=int(run.get("n_envs", 1)),
        policy=str(run.get("policy", "MlpPolicy")),
        normalize=normalize_kwargs(run.get("normalize", False)),
        timesteps=int(timesteps or float(run.get("n_timesteps", DEFAULT_TIMESTEPS))),
        kwargs=hyperparameters,
        peer_kwargs={**shared, **converted, **peer_overrides},
        from_config=from_config,
        ours_only=ours_only,
        threshold=threshold,
    )


def make_env(setting: Setting, seed: int, gamma: float, n_envs: int | None = None, evaluation: bool = False) -> VecEnv:
    """
    :param setting: the shared setting
    :param seed: seed of the environments
    :param gamma: the algorithm's discount (for ``VecNormalize``'s return statistics)
    :param n_envs: number of environments (default: the setting's)
    :param evaluation: a ``VecNormalize`` that neither updates its statistics nor normalizes rewards
    :return: the vectorized environment
    """
    run = {"n_envs": n_envs or setting.n_envs, "normalize": setting.normalize}
    return build_env(setting.env_id, run, seed, gamma, evaluation=evaluation)


def build_model(class_path: str, setting: Setting, kwargs: dict[str, Any], seed: int, device: str) -> BaseAlgorithm:
    """
    :param class_path: dotted path of the algorithm class
    :param setting: the shared setting
    :param kwargs: algorithm keyword arguments
    :param seed: seed of the model and its environment
    :param device: torch device
    :return: the model, on a fresh environment
    """
    env = make_env(setting, seed, float(kwargs.get("gamma", 0.99)))
    policy = resolve_policy(setting.policy)
    # A copy: SB3's classes may change nested arguments in place (A2C adds its optimizer to policy_kwargs)
    return resolve_class(class_path)(policy, env, seed=seed, device=device, verbose=0, **copy.deepcopy(kwargs))


def _rollout_size(model: BaseAlgorithm) -> int:
    """
    :param model: an on-policy model
    :return: environment steps of one iteration (``n_steps * n_envs``)
    """
    return int(model.n_steps) * model.n_envs  # type: ignore[attr-defined]


def warm_up(model: BaseAlgorithm) -> None:
    """
    Run one iteration (rollout and update), which resets the environment.

    :param model: an on-policy model
    """
    model.learn(_rollout_size(model))


def time_updates(model: BaseAlgorithm, updates: int, side: str, seed: int) -> SpeedSample:
    """
    Time one ``learn()`` call of ``updates`` iterations, and every ``train()`` call within it.

    :param model: a warmed-up on-policy model
    :param updates: number of iterations
    :param side: ``"ours"`` or ``"peer"``
    :param seed: the model's seed
    :return: the timings
    """
    steps = updates * _rollout_size(model)
    sample = SpeedSample(side, seed, steps, float("nan"))
    original_train = model.train  # type: ignore[attr-defined]

    def timed_train() -> None:
        start = time.perf_counter()
        original_train()
        sample.train_times.append(time.perf_counter() - start)

    setattr(model, "train", timed_train)  # noqa: B010 (shadows the method on this instance only)
    try:
        start = time.perf_counter()
        model.learn(steps, reset_num_timesteps=False)
        sample.learn_time = time.perf_counter() - start
    finally:
        delattr(model, "train")
    if len(sample.train_times) != updates:
        raise RuntimeError(f"{side}: expected {updates} train() calls, got {len(sample.train_times)}")
    return sample


def measure_speed(pair: Pair, setting: Setting, seeds: Sequence[int], updates: int, device: str) -> list[SpeedSample]:
    """
    Time both sides on every seed, alternating them update by update (ours, peer, ours, peer, ...), so that a
    transient slowdown of the machine falls on both alike rather than on one side's block of updates.

    :param pair: the comparison
    :param setting: the shared setting
    :param seeds: one pair of fresh models per seed
    :param updates: timed iterations per model
    :param device: torch device
    :return: the timings, two per seed
    """
    samples = []
    paths = dict(zip(SIDES, (pair.ours, pair.peer), strict=True))
    for seed in seeds:
        models = {side: build_model(paths[side], setting, setting.side_kwargs(side), seed, device) for side in SIDES}
        for side in SIDES:
            warm_up(models[side])
        timed: dict[str, list[SpeedSample]] = {side: [] for side in SIDES}
        # Once, here: a collection before every timed update would slow the rollout after it on both sides alike
        gc.collect()
        for _ in range(updates):
            for side in SIDES:
                timed[side].append(time_updates(models[side], 1, side, seed))
        for side in SIDES:
            parts = timed[side]
            sample = SpeedSample(
                side,
                seed,
                sum(part.steps for part in parts),
                sum(part.learn_time for part in parts),
                [train_time for part in parts for train_time in part.train_times],
            )
            samples.append(sample)
            _progress(
                f"speed {setting.env_id} seed {seed} {side}: train {sample.train_ms:.1f} ms/update, "
                f"{sample.throughput:.0f} steps/s"
            )
        for model in models.values():
            env = model.get_env()
            if env is not None:
                env.close()
    return samples


def learning_run(task: RunTask) -> dict[str, Any]:
    """
    One learning run and its final evaluation (the worker of the ``returns`` mode); writes its JSON.

    :param task: what to run
    :return: the results
    """
    th.set_num_threads(task.threads)
    setting = task.setting
    kwargs = setting.side_kwargs(task.side)
    gamma = float(kwargs.get("gamma", 0.99))
    model = build_model(task.class_path, setting, kwargs, task.seed, task.device)
    recorder = EpisodeRecorder()
    start = time.perf_counter()
    model.learn(setting.timesteps, callback=recorder)
    wall_time = time.perf_counter() - start

    train_env = model.get_env()
    assert train_env is not None
    eval_env = make_env(setting, task.seed + EVAL_SEED_OFFSET, gamma, n_envs=1, evaluation=True)
    sync_envs_normalization(train_env, eval_env)
    returns, lengths = evaluate_policy(
        model, eval_env, n_eval_episodes=task.eval_episodes, deterministic=True, return_episode_rewards=True
    )
    train_env.close()
    eval_env.close()
    result = {
        "algo": task.algo,
        "side": task.side,
        "class": task.class_path,
        "env": setting.env_id,
        "seed": task.seed,
        "timesteps": int(model.num_timesteps),
        "n_envs": setting.n_envs,
        "policy": setting.policy,
        "normalize": setting.normalize,
        "hyperparameters": kwargs,
        "threads": task.threads,
        "device": task.device,
        # What made the run: --resume may report it together with runs made by other code
        "code": code_version(),
        "wall_time_s": wall_time,
        "episodes": recorder.episodes,
        "eval_returns": [float(value) for value in returns],  # type: ignore[union-attr]
        "eval_lengths": [int(value) for value in lengths],  # type: ignore[union-attr]
        "eval_mean": float(np.mean(returns)),
        "eval_std": float(np.std(returns)),
    }
    _write_json(task.result_path, result)
    return result


def _run_identity(task: RunTask) -> dict[str, Any]:
    """
    :param task: a learning run
    :return: what a saved run must share with ``task`` to stand for it, in the form of the run's JSON
    """
    setting = task.setting
    identity = {
        "class": task.class_path,
        "env": setting.env_id,
        "seed": task.seed,
        "timesteps": setting.timesteps,
        "n_envs": setting.n_envs,
        "policy": setting.policy,
        "normalize": setting.normalize,
        "hyperparameters": setting.side_kwargs(task.side),
        "eval_episodes": task.eval_episodes,
        # The thread count changes the order of float reductions, hence the run
        "threads": task.threads,
        "device": task.device,
    }
    return json.loads(json.dumps(identity, default=repr))


def _speed_identity(
    pair: Pair, setting: Setting, seeds: Sequence[int], updates: int, threads: int, device: str
) -> dict[str, Any]:
    """
    :return: what a saved speed measurement must share with the command to stand for it (the arguments are those of
        :func:`measure_speed`, plus the torch threads)
    """
    identity = {
        "classes": [pair.ours, pair.peer],
        "env": setting.env_id,
        "seeds": list(seeds),
        "updates": updates,
        "n_envs": setting.n_envs,
        "policy": setting.policy,
        "normalize": setting.normalize,
        "hyperparameters": {side: setting.side_kwargs(side) for side in SIDES},
        "threads": threads,
        "device": device,
    }
    return json.loads(json.dumps(identity, default=repr))


def load_speed_samples(path: Path, identity: dict[str, Any]) -> tuple[list[SpeedSample], str] | None:
    """
    A saved speed measurement, for ``--resume``.

    :param path: its JSON file
    :param identity: what it must have been measured with (from :func:`_speed_identity`)
    :return: the timings and when and by what code they were measured, or None when there is no such file
    :raises ValueError: when it was measured with other settings, or saved without them (before they were recorded)
    """
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    if not isinstance(saved, dict) or saved.get("identity") != identity:
        raise SavedResultsRefused(
            f"{path} holds a speed measurement made with other settings (or saved without them): choose another --output"
        )
    provenance = f"{saved.get('date', 'date not recorded')}, {saved.get('code', 'code version not recorded')}"
    return [SpeedSample(**sample) for sample in saved["samples"]], provenance


def load_finished_run(task: RunTask) -> dict[str, Any] | None:
    """
    The saved result of a run, for ``--resume``.

    :param task: a learning run
    :return: the run's JSON from ``<output>/runs/``, or None when there is none
    :raises ValueError: when the saved run was made with other settings
    """
    path = task.result_path
    if not path.exists():
        return None
    result = json.loads(path.read_text())
    expected = _run_identity(task)
    saved = {key: result.get(key) for key in expected}
    saved["eval_episodes"] = len(result.get("eval_returns", []))
    # learn() stops at the first whole rollout past the requested timesteps
    kwargs = task.setting.side_kwargs(task.side)
    rollout = task.setting.n_envs * int(kwargs.get("n_steps", class_defaults(task.class_path)["n_steps"]))
    if isinstance(saved["timesteps"], int) and 0 <= saved["timesteps"] - expected["timesteps"] < rollout:
        saved["timesteps"] = expected["timesteps"]
    differing = sorted(key for key in expected if saved[key] != expected[key])
    if differing:
        raise SavedResultsRefused(
            f"{path} was made with other settings ({', '.join(differing)} differ): use another --output, or remove it"
        )
    return result


def run_returns(tasks: list[RunTask], jobs: int) -> tuple[list[dict[str, Any]], list[str]]:
    """
    Run the learning runs in spawned processes, at most ``jobs`` at a time.

    :param tasks: the runs
    :param jobs: number of worker processes
    :return: the results of the runs that finished, and an error line per run that failed
    """
    results, errors = [], []
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        futures = {pool.submit(learning_run, task): task for task in tasks}
        for done, future in enumerate(as_completed(futures), start=1):
            task = futures[future]
            try:
                result = future.result()
            except Exception as error:
                errors.append(f"{task.name}: {type(error).__name__}: {error}")
                _progress(f"[{done}/{len(tasks)}] {task.name} FAILED: {error!r}")
                continue
            results.append(result)
            _progress(
                f"[{done}/{len(tasks)}] {task.name}: eval {result['eval_mean']:.1f} ± {result['eval_std']:.1f}, "
                f"{len(result['episodes'])} training episodes, {result['wall_time_s']:.0f} s"
            )
    return results, errors


def _moving_average(episodes: Sequence[Sequence[float]], window: int) -> tuple[np.ndarray, np.ndarray]:
    """
    :param episodes: (timestep, return, ...) of the finished episodes, in order
    :param window: number of episodes averaged
    :return: the timesteps at which the episodes finished, and after each episode the mean return of the last
        ``window`` episodes (of all episodes so far, before there are that many)
    """
    timesteps = np.array([episode[0] for episode in episodes], dtype=float)
    returns = np.array([episode[1] for episode in episodes], dtype=float)
    cumulative = np.concatenate(([0.0], np.cumsum(returns)))
    counts = np.arange(1, len(returns) + 1)
    lengths = np.minimum(counts, window)
    return timesteps, (cumulative[counts] - cumulative[counts - lengths]) / lengths


def _smoothed_curve(episodes: Sequence[Sequence[float]], grid: np.ndarray, window: int) -> np.ndarray:
    """
    :param episodes: (timestep, return, ...) of the finished episodes, in order
    :param grid: timesteps to sample the curve at
    :param window: number of episodes averaged
    :return: at each grid timestep, the mean return of the last ``window`` episodes finished by then
        (NaN before the first)
    """
    timesteps, smoothed = _moving_average(episodes, window)
    index = np.searchsorted(timesteps, grid, side="right") - 1
    return np.where(index >= 0, smoothed[np.maximum(index, 0)], np.nan)


def steps_to_threshold(episodes: Sequence[Sequence[float]], threshold: float, window: int = SMOOTHING_EPISODES) -> int | None:
    """
    The sample-efficiency measure: when the learning curve first reaches a return.

    :param episodes: (timestep, return, ...) of the finished training episodes, in order
    :param threshold: the return to reach
    :param window: number of episodes of the moving average
    :return: the first timestep at which the moving average of the last ``window`` training episode returns (the
        smoothing of the learning curves) is at least ``threshold``, or None when it never is
    """
    if not episodes:
        return None
    timesteps, smoothed = _moving_average(episodes, window)
    # Only once a whole window of episodes is averaged: one lucky first episode does not reach a threshold
    reached = np.flatnonzero(smoothed[window - 1 :] >= threshold) + window - 1
    return int(timesteps[reached[0]]) if len(reached) else None


def threshold_report(pair: Pair, setting: Setting, results: list[dict[str, Any]], smoothing: int) -> str:
    """
    :param pair: the comparison
    :param setting: the shared setting, with a threshold
    :param results: results of the runs on this environment
    :param smoothing: number of episodes of the moving average
    :return: the Markdown section of the steps to reach the threshold
    """
    assert setting.threshold is not None
    rows, means, censored = [], {}, {}
    for side, path in zip(SIDES, (pair.ours, pair.peer), strict=True):
        runs = sorted((r for r in results if r["side"] == side), key=lambda r: r["seed"])
        if not runs:
            rows.append([f"{side}: {path}", "no finished run", "", ""])
            continue
        steps = [steps_to_threshold(r["episodes"], setting.threshold, smoothing) for r in runs]
        # A run that never reached the threshold counts with its length: a lower bound of its steps to reach it
        bounded = [float(r["timesteps"]) if step is None else float(step) for r, step in zip(runs, steps, strict=True)]
        mean, std = _mean_std(bounded)
        means[side], censored[side] = mean, any(step is None for step in steps)
        reached = sum(step is not None for step in steps)
        per_seed = ", ".join(
            f"{r['seed']}: {step}" if step is not None else f"{r['seed']}: not reached (> {r['timesteps']})"
            for r, step in zip(runs, steps, strict=True)
        )
        prefix = "≥ " if censored[side] else ""
        rows.append([f"{side}: {path}", f"{prefix}{mean:.0f} ± {std:.0f}", per_seed, f"{reached}/{len(runs)}"])
    ratio = "n/a"
    if len(means) == 2:
        ratio = _ratio(means["peer"], means["ours"])
        if ratio != "n/a" and censored["ours"] and censored["peer"]:
            ratio = "n/a (runs of both sides did not reach the threshold)"
        elif ratio != "n/a" and censored["peer"]:
            ratio = f"≥ {ratio} (some peer runs did not reach the threshold)"
        elif ratio != "n/a" and censored["ours"]:
            ratio = f"≤ {ratio} (some of our runs did not reach the threshold)"
    return "\n\n".join(
        [
            f"## Sample efficiency: timesteps to reach a return of {setting.threshold:g}",
            f"First timestep at which the {smoothing}-episode moving average of the training episode returns "
            "(the smoothing of the learning curves) reaches the threshold. A run that never reaches it counts with its "
            "length, so a mean marked ≥ is a lower bound.",
            markdown_table(
                ["algorithm", "timesteps to threshold (mean ± std over seeds)", "per seed", "runs that reached it"], rows
            ),
            f"Ratio of the means, peer / ours (above 1: ours needs fewer steps): **{ratio}**",
        ]
    )


def plot_curves(pair: Pair, setting: Setting, results: list[dict[str, Any]], path: Path, smoothing: int) -> bool:
    """
    Learning curves of both sides on one axis: mean over seeds of the smoothed curves, min-max shaded.

    :param pair: the comparison
    :param setting: the shared setting
    :param results: results of the runs on this environment
    :param path: PNG file
    :param smoothing: number of episodes of the moving average
    :return: whether a curve was drawn
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = np.linspace(0, setting.timesteps, CURVE_POINTS)
    figure, axis = plt.subplots(figsize=(7, 4.5))
    drawn = False
    for side, label in zip(SIDES, (pair.ours, pair.peer), strict=True):
        curves = [_smoothed_curve(r["episodes"], grid, smoothing) for r in results if r["side"] == side and r["episodes"]]
        if not curves:
            continue
        stacked = np.stack(curves)
        defined = np.isfinite(stacked).all(axis=0)
        if not defined.any():
            continue
        x, values = grid[defined], stacked[:, defined]
        line = axis.plot(x, values.mean(axis=0), label=f"{label} ({len(curves)} seeds)")[0]
        axis.fill_between(x, values.min(axis=0), values.max(axis=0), color=line.get_color(), alpha=0.2)
        drawn = True
    if drawn:
        if setting.threshold is not None:
            axis.axhline(
                setting.threshold, color="grey", linestyle="--", linewidth=1, label=f"threshold {setting.threshold:g}"
            )
        axis.set_xlabel("timesteps")
        axis.set_ylabel(f"training episode return ({smoothing}-episode moving average)")
        axis.set_title(f"{setting.env_id}: {pair.ours} vs {pair.peer}")
        axis.grid(alpha=0.3)
        axis.legend()
        figure.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=120)
    plt.close(figure)
    return drawn


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """
    :param values: one value per seed
    :return: their mean and (population) standard deviation
    """
    return float(np.mean(values)), float(np.std(values))


def _ratio(numerator: float, denominator: float) -> str:
    """
    :param numerator: our value
    :param denominator: the peer's value
    :return: the ratio, formatted (``n/a`` for a zero or non-finite denominator)
    """
    if denominator == 0 or not np.isfinite(denominator) or not np.isfinite(numerator):
        return "n/a"
    return f"{numerator / denominator:.3f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """
    :param header: column titles
    :param rows: cells
    :return: a Markdown table
    """
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def speed_report(pair: Pair, samples: list[SpeedSample], updates: int, threads: int, provenance: str) -> str:
    """
    :param pair: the comparison
    :param samples: the timings of one environment
    :param updates: timed iterations per model
    :param threads: torch threads
    :param provenance: when and by what code they were measured (a resumed report's header gives today's)
    :return: the Markdown section of the speed mode
    """
    by_side = {side: [sample for sample in samples if sample.side == side] for side in SIDES}
    quantities = (
        ("train() time per update [ms] (lower is better)", "train_ms", "{:.1f}"),
        ("learn() throughput [env steps/s] (higher is better)", "throughput", "{:.0f}"),
        ("rollout time per update [ms]: (learn − train) / updates (lower is better)", "rollout_ms", "{:.1f}"),
        ("train() share of learn() time", "train_share", "{:.3f}"),
    )
    no_ratio = {"train_share"}
    rows = []
    for title, attribute, number in quantities:
        means = {side: _mean_std([getattr(sample, attribute) for sample in by_side[side]]) for side in SIDES}
        cells = [f"{number.format(means[side][0])} ± {number.format(means[side][1])}" for side in SIDES]
        ratio = "—" if attribute in no_ratio else _ratio(means["ours"][0], means["peer"][0])
        rows.append([title, *cells, ratio])
    seeds = [sample.seed for sample in by_side["ours"]]
    per_seed = []
    for ours, peer in zip(by_side["ours"], by_side["peer"], strict=True):
        per_seed.append(
            [
                str(ours.seed),
                _ratio(ours.train_ms, peer.train_ms),
                _ratio(ours.throughput, peer.throughput),
                _ratio(ours.rollout_ms, peer.rollout_ms),
            ]
        )
    return "\n\n".join(
        [
            f"## Speed: {updates} timed updates per model after 1 warm-up update, torch threads {threads}, "
            f"seeds {seeds}, ours and peer alternating update by update; measured {provenance}",
            markdown_table(
                ["quantity (mean ± std over seeds)", f"ours: {pair.ours}", f"peer: {pair.peer}", "ratio ours / peer"], rows
            ),
            "Per seed:",
            markdown_table(["seed", "train-time ratio", "throughput ratio", "rollout-time ratio"], per_seed),
        ]
    )


def returns_report(
    pair: Pair, setting: Setting, results: list[dict[str, Any]], errors: list[str], curve: str, smoothing: int
) -> str:
    """
    :param pair: the comparison
    :param setting: the shared setting
    :param results: results of the runs on this environment
    :param errors: the runs on this environment that failed
    :param curve: file name of the learning-curve PNG, or "" without one
    :param smoothing: number of episodes of the learning curves' moving average
    :return: the Markdown section of the returns mode
    """
    rows, means = [], {}
    for side, path in zip(SIDES, (pair.ours, pair.peer), strict=True):
        runs = sorted((r for r in results if r["side"] == side), key=lambda r: r["seed"])
        if not runs:
            rows.append([f"{side}: {path}", "no finished run", "", "", ""])
            continue
        mean, std = _mean_std([r["eval_mean"] for r in runs])
        means[side] = mean
        per_seed = ", ".join(f"{r['seed']}: {r['eval_mean']:.1f}" for r in runs)
        wall = float(np.mean([r["wall_time_s"] for r in runs]))
        episodes = float(np.mean([len(r["episodes"]) for r in runs]))
        rows.append([f"{side}: {path}", f"{mean:.1f} ± {std:.1f} (n={len(runs)})", per_seed, f"{episodes:.0f}", f"{wall:.0f}"])
    ratio = _ratio(means["ours"], means["peer"]) if len(means) == 2 else "n/a"
    if ratio != "n/a" and means["peer"] < 0:
        ratio += " (peer mean is negative: read with care)"
    sections = [
        f"## Returns: {setting.timesteps} timesteps per run, final evaluation over deterministic episodes",
        markdown_table(
            [
                "algorithm",
                "final eval return (mean ± std over seeds)",
                "per seed",
                "training episodes (mean)",
                "wall time per run [s] (parallel runs: not a speed figure)",
            ],
            rows,
        ),
        f"Ratio of the mean final eval returns, ours / peer: **{ratio}** (± is the population standard deviation "
        "over seeds)",
        "Runs made by: " + _code_counts(results),
    ]
    if setting.threshold is not None:
        sections.append(threshold_report(pair, setting, results, smoothing))
    if errors:
        sections.append("Failed runs:\n\n" + "\n".join(f"- {error}" for error in errors))
    if curve:
        sections.append(f"![learning curves]({curve})")
    return "\n\n".join(sections)


def _code_counts(results: list[dict[str, Any]]) -> str:
    """
    :param results: saved runs
    :return: the code versions that made them, with their number of runs (runs saved before the version was
        recorded count as "not recorded")
    """
    counts: dict[str, int] = {}
    for result in results:
        code = str(result.get("code", "not recorded"))
        counts[code] = counts.get(code, 0) + 1
    return ", ".join(f"{code}: {count} run(s)" for code, count in counts.items())


def machine_info(threads: int) -> str:
    """
    :param threads: torch threads of the measurements
    :return: CPU, OS and library versions, as a Markdown list
    """
    import gymnasium
    import stable_baselines3

    def version(module: str) -> str:
        try:
            return str(importlib.import_module(module).__version__)
        except ImportError:
            return "not installed"

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        cpu = names[0] if names else cpu
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    items = [
        f"CPU: {cpu}; os.cpu_count() = {os.cpu_count()}, usable by this process: {usable}",
        f"OS: {platform.platform()}; Python {platform.python_version()}",
        f"torch {th.__version__} ({threads} thread(s)), stable-baselines3 {stable_baselines3.__version__}, "
        f"sb3-contrib {version('sb3_contrib')}, gymnasium {gymnasium.__version__}, numpy {np.__version__}, "
        f"{code_version()}",
    ]
    return "\n".join(f"- {item}" for item in items)


def code_version() -> str:
    """
    :return: the package version and git revision that is running (recorded with every run and speed measurement)
    """
    return f"sb3_trust {sb3_trust.__version__} (git {_git_revision()})"


def _git_revision() -> str:
    """:return: ``git describe --always --dirty`` of the repository, or ``unknown``"""
    try:
        completed = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return completed.stdout.strip() or "unknown"


def _write_json(path: Path, data: Any) -> None:
    """
    Write ``data`` as JSON atomically (a temporary file renamed over ``path``).

    :param path: target file
    :param data: JSON-able data (other objects are written as their ``repr``)
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(data, indent=1, default=repr))
    os.replace(temporary, path)


def _progress(message: str) -> None:
    """
    :param message: a progress line, for stderr (stdout carries the report)
    """
    print(message, file=sys.stderr, flush=True)


def env_threshold(item: str) -> tuple[str, float | None]:
    """
    argparse type of ``--threshold`` items.

    :param item: ``ENV=VALUE`` (``ENV=none`` removes a default threshold)
    :return: the environment id and the threshold (None for none)
    """
    env_id, separator, text = item.partition("=")
    env_id, text = env_id.strip(), text.strip()
    if not separator or not env_id:
        raise argparse.ArgumentTypeError(f"expected ENV=VALUE, got {item!r}")
    if text.lower() == "none":
        return env_id, None
    try:
        return env_id, float(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"cannot parse the threshold of {item!r}: {error}") from error


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """
    :param argv: command-line arguments (default: ``sys.argv``)
    :return: the parsed arguments
    """
    parser = argparse.ArgumentParser(
        prog="python -m sb3_trust.benchmark", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--algo", default="trpo", choices=sorted(PAIRS), help="the pair to compare (default: trpo)")
    parser.add_argument("--env", nargs="+", default=["HalfCheetah-v5"], help="environment id(s)")
    parser.add_argument("--mode", default="all", choices=MODES, help="what to measure (default: all)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds (default: 0 1 2)")
    parser.add_argument("--timesteps", type=int, default=None, help="steps per learning run (default: config)")
    parser.add_argument("--speed-updates", type=int, default=10, help="timed updates per model (default: 10)")
    parser.add_argument("--jobs", type=int, default=2, help="parallel learning runs (default: 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (default: 1)")
    parser.add_argument("--eval-episodes", type=int, default=10, help="final evaluation episodes (default: 10)")
    parser.add_argument(
        "--smoothing",
        type=int,
        default=SMOOTHING_EPISODES,
        metavar="EPISODES",
        help=f"returns mode: episodes of the learning curves' moving average, which the threshold measure also uses "
        f"(default: {SMOOTHING_EPISODES})",
    )
    parser.add_argument("--output", default="benchmark_results", help="results folder (default: benchmark_results)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="returns mode: read the runs already saved in <output>/runs/ (same settings) instead of running them again",
    )
    parser.add_argument(
        "--hyperparams",
        nargs="+",
        type=key_value,
        default=[],
        metavar="KEY=VALUE",
        help="override config entries for both algorithms; values are Python literals (e.g. n_steps=512 normalize=False)",
    )
    parser.add_argument(
        "--peer-hyperparams",
        nargs="+",
        type=key_value,
        default=[],
        metavar="KEY=VALUE",
        help="override algorithm arguments of the peer only (breaks the identical setting; shown in the report)",
    )
    parser.add_argument(
        "--threshold",
        nargs="+",
        type=env_threshold,
        default=[],
        metavar="ENV=VALUE",
        help="return thresholds of the sample-efficiency measure in returns mode (timesteps until the smoothed "
        "training return reaches it); ENV=none removes one. Defaults: "
        + ", ".join(f"{env_id}={value:g}" for env_id, value in DEFAULT_THRESHOLDS.items())
        + " (gymnasium's reward_threshold)",
    )
    args = parser.parse_args(argv)
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds repeats a seed: {args.seeds}")
    for name in ("speed_updates", "jobs", "threads", "eval_episodes", "timesteps", "smoothing"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    return args


def _header(pair: Pair, args: argparse.Namespace, argv: list[str], setting: Setting, date: str) -> str:
    """
    :param pair: the comparison
    :param args: the parsed arguments
    :param argv: the command-line arguments
    :param setting: the shared setting
    :param date: the benchmark's start
    :return: the Markdown head of a report: command, date, machine, settings and caveats
    """
    lines = [
        f"# {args.algo} on {setting.env_id}: {pair.ours} (ours) vs {pair.peer} (peer)",
        "",
        f"Command: `python -m sb3_trust.benchmark {shlex.join(argv)}`",
        "",
        f"Date: {date}",
        "",
        "Machine:",
        "",
        machine_info(args.threads),
        "",
        f"Setting (both): n_envs={setting.n_envs}, policy={setting.policy}, normalize={setting.normalize}, "
        f"device={args.device}, hyperparameters `{setting.shared_kwargs!r}`",
    ]
    if setting.ours_only:
        lines += ["", f"Ours only (not passed to the peer): `{setting.ours_only!r}`"]
    # The pair's ours-only keys that the peer also takes: it runs with its own defaults for them
    peer_defaults = class_defaults(pair.peer)
    kept = {key: peer_defaults[key] for key in pair.ours_only if key in peer_defaults and key not in setting.peer_kwargs}
    if kept:
        lines += ["", f"The peer's own defaults (ours-only keys): `{kept!r}`"]
    if setting.peer_kwargs != setting.shared_kwargs:
        lines += ["", f"**Peer hyperparameters differ**: `{setting.peer_kwargs!r}`"]
    if not setting.from_config:
        lines += ["", f"No entry for {setting.env_id} in zoo_configs/{pair.config}: algorithm defaults."]
    if pair.note:
        lines += ["", f"Note: {pair.note}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """
    :param argv: command-line arguments (default: ``sys.argv``)
    :return: the exit status: 1 when a learning run failed
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    date = datetime.now().astimezone().isoformat(timespec="seconds")
    pair = PAIRS[args.algo]
    output = Path(args.output)
    thresholds: dict[str, float | None] = {**DEFAULT_THRESHOLDS, **dict(args.threshold)}
    settings = {
        env_id: make_setting(
            pair, env_id, dict(args.hyperparams), dict(args.peer_hyperparams), args.timesteps, thresholds.get(env_id)
        )
        for env_id in args.env
    }
    sections: dict[str, list[str]] = {env_id: [] for env_id in args.env}
    paths = dict(zip(SIDES, (pair.ours, pair.peer), strict=True))
    tasks = [
        RunTask(args.algo, side, paths[side], setting, seed, args.eval_episodes, args.device, args.threads, str(output))
        for setting in settings.values()
        for seed in args.seeds
        for side in SIDES
    ]
    # Saved runs are checked before any measurement starts: never overwritten (hours of computation), and with
    # --resume read now, so that one made with other settings stops the command at once
    returns_mode = args.mode in ("returns", "all")
    saved = [str(task.result_path) for task in tasks if task.result_path.exists()]
    if returns_mode and saved and not args.resume:
        raise SavedResultsRefused(
            f"{len(saved)} of these runs are already saved (e.g. {saved[0]}): add --resume to use them, or choose "
            "another --output"
        )
    speed_mode = args.mode in ("speed", "all")
    speed_paths = {env_id: output / f"{args.algo}_{env_id}_speed.json" for env_id in args.env}
    speed_identities = {
        env_id: _speed_identity(pair, setting, args.seeds, args.speed_updates, args.threads, args.device)
        for env_id, setting in settings.items()
    }
    saved_speed = [str(path) for path in speed_paths.values() if path.exists()]
    if speed_mode and saved_speed and not args.resume:
        raise SavedResultsRefused(
            f"Speed measurements are already saved at {saved_speed[0]}: add --resume to report them (they are never "
            "measured again nor overwritten), or choose another --output"
        )
    saved_samples = (
        {env_id: load_speed_samples(speed_paths[env_id], speed_identities[env_id]) for env_id in args.env}
        if speed_mode and args.resume
        else {}
    )
    # A report or curve is replaced only on purpose (--resume): it is rebuilt for this command's seeds from the saved
    # runs, which are never lost, so any earlier report can be rebuilt the same way
    derived = [output / f"{args.algo}_{env_id}_{args.mode}.md" for env_id in args.env]
    derived += [output / f"{args.algo}_{env_id}_curve.png" for env_id in args.env] if returns_mode else []
    existing = [str(path) for path in derived if path.exists()]
    if existing and not args.resume:
        raise SavedResultsRefused(
            f"{existing[0]} is already there (from another command): choose another --output, or add --resume to "
            "replace it with this command's report, built from the runs saved in the folder (a report of other seeds "
            "is rebuilt from them the same way)"
        )
    finished = [load_finished_run(task) for task in tasks] if returns_mode and args.resume else [None] * len(tasks)

    if speed_mode:
        th.set_num_threads(args.threads)
        for env_id, setting in settings.items():
            saved_measurement = saved_samples.get(env_id)
            if saved_measurement is None:
                samples = measure_speed(pair, setting, args.seeds, args.speed_updates, args.device)
                code = code_version()
                measurement = {
                    "identity": speed_identities[env_id],
                    "date": date,
                    "code": code,
                    "samples": [asdict(sample) for sample in samples],
                }
                _write_json(speed_paths[env_id], measurement)
                provenance = f"{date}, {code}"
            else:
                samples, provenance = saved_measurement
                _progress(f"{args.algo}_{env_id}: speed measurement read from {speed_paths[env_id]}")
            sections[env_id].append(speed_report(pair, samples, args.speed_updates, args.threads, provenance))

    errors: list[str] = []
    if returns_mode:
        for task, result in zip(tasks, finished, strict=True):
            if result is not None:
                _progress(f"{task.name}: finished run read from {task.output}/runs/")
        missing = [task for task, result in zip(tasks, finished, strict=True) if result is None]
        results, errors = run_returns(missing, args.jobs)
        results += [result for result in finished if result is not None]
        for env_id, setting in settings.items():
            env_results = [r for r in results if r["env"] == env_id]
            env_errors = [error for error in errors if error.startswith(f"{args.algo}_{env_id}_")]
            curve = output / f"{args.algo}_{env_id}_curve.png"
            drawn = plot_curves(pair, setting, env_results, curve, args.smoothing)
            sections[env_id].append(
                returns_report(pair, setting, env_results, env_errors, curve.name if drawn else "", args.smoothing)
            )

    for env_id, setting in settings.items():
        report = "\n\n".join([_header(pair, args, argv, setting, date), *sections[env_id]]) + "\n"
        path = output / f"{args.algo}_{env_id}_{args.mode}.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(report)
        print(report, flush=True)
        _progress(f"report: {path}")
    return 1 if errors else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except SavedResultsRefused as refusal:
        sys.exit(f"benchmark: error: {refusal}")
