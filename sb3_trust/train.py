"""
Train an sb3_trust algorithm with the hyperparameters shipped in ``zoo_configs/``, evaluate it and save it.

Usage: ``python -m sb3_trust.train --algo TRPO --env CartPole-v1`` (what ``make train`` runs).
"""

import argparse
import importlib
import os
import re
import sys
import sysconfig
import warnings
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import gymnasium as gym
import torch as th
from stable_baselines3.common.callbacks import ProgressBarCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.utils import LinearSchedule
from stable_baselines3.common.vec_env import VecEnv, VecFrameStack, VecNormalize, sync_envs_normalization

import sb3_trust
from sb3_trust.common.on_policy import TrustOnPolicyAlgorithm

ALGORITHMS: dict[str, type[TrustOnPolicyAlgorithm]] = {
    "acktr": sb3_trust.ACKTR,
    "npg": sb3_trust.NPG,
    "ppokl": sb3_trust.PPOKL,
    "trpo": sb3_trust.TRPO,
}

# Keys of the zoo's YAML files that describe the environment or the run rather than the algorithm (those that
# rl-zoo3's ExperimentManager removes before calling the constructor)
RUN_KEYS = (
    "n_envs",
    "n_timesteps",
    "policy",
    "normalize",
    "env_kwargs",
    "monitor_kwargs",
    "env_wrapper",
    "vec_env_wrapper",
    "frame_stack",
    "callback",
)
# The run keys that every reader of the files applies (this script and sb3_trust.benchmark)
BASIC_RUN_KEYS = ("n_envs", "n_timesteps", "policy", "normalize")
# The run keys that this script applies; the others only rl-zoo3's own scripts do (python -m sb3_trust.zoo)
TRAIN_RUN_KEYS = (*BASIC_RUN_KEYS, "env_kwargs", "monitor_kwargs", "env_wrapper", "frame_stack")
# The entry that rl-zoo3 uses for an environment without one of its own
DEFAULT_ENTRY = "default"
# The evaluation environment's seed is the run's plus this (as in sb3_trust.benchmark)
EVAL_SEED_OFFSET = 10_000
# The entry that rl-zoo3 uses for every Atari game without one of its own (before the default entry)
ATARI_ENTRY = "atari"


def find_config_dir() -> Path:
    """
    :return: the folder of the shipped hyperparameter files: ``zoo_configs/`` of the source checkout (an editable
        install), else ``share/sb3_trust/zoo_configs`` under the data folder where ``pip install .`` (or
        ``pip install --user .``) puts them
    """
    source_checkout = Path(__file__).resolve().parent.parent / "zoo_configs"
    data_folders = [sysconfig.get_path("data"), sysconfig.get_path("data", f"{os.name}_user"), sys.prefix]
    candidates = [source_checkout, *(Path(folder) / "share" / "sb3_trust" / "zoo_configs" for folder in data_folders)]
    return next((path for path in candidates if path.is_dir()), candidates[0])


CONFIG_DIR = find_config_dir()


def keyword_arguments(value: Any, key: str) -> dict[str, Any]:
    """
    :param value: a zoo entry's ``env_kwargs``, ``monitor_kwargs`` or ``normalize`` arguments: a mapping, its Python
        expression as a string (rl-zoo3 evaluates these strings, e.g. ``"dict(info_keywords=('is_success',))"``), or
        None (an empty entry)
    :param key: the entry's key, for the error message
    :return: the keyword arguments
    :raises TypeError: when the value is not a mapping
    """
    if value is None:
        return {}
    if isinstance(value, str):
        value = eval(value, {"dict": dict})
    if not isinstance(value, dict):
        raise TypeError(f"`{key}` must be a mapping of keyword arguments, got {value!r}")
    return dict(value)


def normalize_kwargs(value: Any) -> dict[str, Any] | None:
    """
    :param value: the zoo's ``normalize`` entry: a bool, a dict, or a dict's Python expression (rl-zoo3 accepts all
        three, e.g. ``"dict(norm_obs=True, norm_reward=False)"``)
    :return: ``VecNormalize`` keyword arguments, or None without normalization
    """
    if isinstance(value, str):
        return keyword_arguments(value, "normalize")
    if isinstance(value, dict):
        return dict(value)
    return {} if value else None


def register_atari_games() -> None:
    """
    Register ALE's games with Gymnasium when ale-py is installed (the ``atari`` extra), as rl-zoo3 does on import.
    """
    try:
        import ale_py
    except ImportError:
        return
    gym.register_envs(ale_py)


def registered_id(env_id: str) -> str:
    """
    The registry id of an environment id, read as ``gym.make`` reads it: ``"module:EnvId"`` imports the module
    (which registers its environments) and names ``EnvId``.

    :param env_id: a Gymnasium environment id, with or without a module prefix
    :return: the id without the module prefix (the key of the zoo files' entries)
    """
    if ":" not in env_id:
        return env_id
    module, name = env_id.split(":", 1)
    try:
        importlib.import_module(module)
    except ImportError:
        pass  # gym.make reports it when the environment is built
    return name


def is_atari_game(env_id: str) -> bool:
    """
    :param env_id: a Gymnasium environment id, with or without a module prefix
    :return: whether it is one of ALE's games (rl-zoo3's test: the entry point is ALE's ``AtariEnv``)
    """
    name = registered_id(env_id)
    return name in gym.registry and "AtariEnv" in str(gym.registry[name].entry_point)


def wrapper_items(value: Any) -> list[tuple[Any, dict[str, Any]]]:
    """
    :param value: a zoo entry's ``env_wrapper``, in rl-zoo3's forms: a wrapper's dotted path, a mapping of one path to
        its keyword arguments, or a list of these (applied in order), or None
    :return: the wrappers with their keyword arguments, in order
    :raises TypeError: for another form
    """
    wrappers: list[tuple[Any, dict[str, Any]]] = []
    for item in [] if value is None else value if isinstance(value, list) else [value]:
        if isinstance(item, str):
            wrappers.append((import_object(item), {}))
        elif isinstance(item, dict) and len(item) == 1:
            ((path, kwargs),) = item.items()
            wrappers.append((import_object(path), keyword_arguments(kwargs, f"env_wrapper {path}")))
        else:
            raise TypeError(f"`env_wrapper` items must be a dotted path or {{path: kwargs}}, got {item!r}")
    return wrappers


def wrapper_class(value: Any) -> Callable[[gym.Env], gym.Env] | None:
    """
    :param value: a zoo entry's ``env_wrapper`` (the forms of ``wrapper_items``), or None
    :return: a function that wraps one environment, or None for no wrapper
    :raises TypeError: for another form
    """
    if value is None:
        return None
    wrappers = wrapper_items(value)

    def wrap(env: gym.Env) -> gym.Env:
        for wrapper, kwargs in wrappers:
            env = wrapper(env, **kwargs)
        return env

    return wrap


def repeated_frame_skip(env_id: str, run: dict[str, Any]) -> str | None:
    """
    SB3's ``AtariWrapper`` repeats each action over ``frame_skip`` frames (4 by default), as for the ``NoFrameskip``
    games that rl-zoo3's Atari settings are made for. ALE's v5 games (and the v0/v4 ones without ``NoFrameskip``)
    already repeat it themselves, so with the wrapper each action lasts e.g. 16 frames: the policy then sees a
    different game than those settings assume, and nothing fails.

    :param env_id: a Gymnasium environment id, with or without a module prefix
    :param run: the zoo entry's run keys (``env_wrapper``, ``env_kwargs``)
    :return: a warning saying so when it is the case, else None
    """
    from stable_baselines3.common.atari_wrappers import AtariWrapper

    if not is_atari_game(env_id):
        return None
    registered_skip = gym.registry[registered_id(env_id)].kwargs.get("frameskip", 1)
    game_skip = keyword_arguments(run.get("env_kwargs"), "env_kwargs").get("frameskip", registered_skip)
    wrapper_skips = [
        kwargs.get("frame_skip", 4)
        for wrapper, kwargs in wrapper_items(run.get("env_wrapper"))
        if isinstance(wrapper, type) and issubclass(wrapper, AtariWrapper)
    ]
    if game_skip == 1 or not any(skip > 1 for skip in wrapper_skips):
        return None
    return (
        f"{env_id} already repeats each action over {game_skip} frames (its `frameskip`), and the entry's AtariWrapper "
        f"repeats it {max(wrapper_skips)} times more: for the Atari settings, use the NoFrameskip-v4 game (e.g. "
        "PongNoFrameskip-v4, as rl-zoo3 does), or set `env_kwargs: {frameskip: 1}`"
    )


def linear_schedules(hyperparameters: dict[str, Any]) -> dict[str, Any]:
    """
    rl-zoo3's schedule strings: ``lin_<value>`` for ``learning_rate``, ``clip_range`` or ``clip_range_vf`` is a value
    that decreases linearly from ``<value>`` to 0 over the run.

    :param hyperparameters: the algorithm's keyword arguments
    :return: them, with those strings replaced by schedules
    :raises ValueError: for another string in those keys
    """
    converted = dict(hyperparameters)
    for key in ("learning_rate", "clip_range", "clip_range_vf"):
        value = converted.get(key)
        if isinstance(value, str):
            kind, _, initial = value.partition("_")
            if kind != "lin":
                raise ValueError(f"`{key}`: only rl-zoo3's linear schedules (lin_<value>) are understood, got {value!r}")
            converted[key] = LinearSchedule(float(initial), 0.0, 1.0)
    return converted


def import_object(path: str) -> Any:
    """
    :param path: an object's dotted path, e.g. ``"sb3_contrib.TRPO"``
    :return: the object
    """
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def resolve_policy(policy: Any) -> Any:
    """
    :param policy: a zoo entry's ``policy``: an alias such as ``MlpPolicy``, a class, or a class's dotted path (which
        rl-zoo3 imports)
    :return: the alias or the class
    """
    return import_object(policy) if isinstance(policy, str) and "." in policy else policy


def split_run_keys(
    hyperparameters: dict[str, Any], env_id: str, supported: Collection[str] = BASIC_RUN_KEYS
) -> dict[str, Any]:
    """
    Move the run keys out of a zoo entry.

    :param hyperparameters: the entry; the algorithm's keyword arguments are left in it
    :param env_id: its environment, for the error message
    :param supported: the run keys that the caller applies
    :return: the run keys
    :raises ValueError: for the other run keys: they would be silently ignored
    """
    run = {key: hyperparameters.pop(key) for key in RUN_KEYS if key in hyperparameters}
    unsupported = sorted(set(run) - set(supported))
    if unsupported:
        raise ValueError(
            f"{env_id}: the zoo keys {unsupported} are not supported here; rl-zoo3's scripts apply them "
            "(python -m sb3_trust.zoo train)"
        )
    return run


def load_hyperparameters(algo: str, env_id: str, config_dir: Path = CONFIG_DIR) -> dict[str, Any]:
    """
    The RL Zoo hyperparameters for ``env_id`` from ``zoo_configs/<algo>.yml``, or {} when there are none.

    :param algo: algorithm name (lower case)
    :param env_id: Gymnasium environment id
    :param config_dir: folder of the YAML files
    :return: the hyperparameters, with ``policy_kwargs`` strings evaluated (``env_id`` ``"default"``: the entry that
        rl-zoo3 uses for environments without their own)
    """
    path = config_dir / f"{algo}.yml"
    if not path.exists():
        return {}
    try:
        import yaml
    except ImportError as error:  # PyYAML comes with the `tests` and `zoo` extras
        raise ImportError(f"Reading {path} needs PyYAML: pip install pyyaml (or the `tests` or `zoo` extra)") from error

    with open(path) as file:
        configs = yaml.safe_load(file) or {}
    hyperparameters = dict(configs.get(env_id, {}))
    if isinstance(hyperparameters.get("policy_kwargs"), str):
        hyperparameters["policy_kwargs"] = eval(hyperparameters["policy_kwargs"], {"nn": th.nn, "dict": dict})
    return hyperparameters


def unused_checkpoint_path(folder: Path, stem: str) -> Path:
    """
    Reserve the name of a run's checkpoint: ``<stem>.zip`` for the first run, then ``<stem>_2.zip``, ``<stem>_3.zip``,
    ... one above the highest number that a checkpoint or normalization statistics already carry, so a run never
    overwrites an earlier one and the highest number is the newest (rl-zoo3 numbers its runs too). The name is
    taken by creating an empty file, which the checkpoint then replaces, so runs that end together get different
    names.

    :param folder: the output folder
    :param stem: the run's name
    :return: the checkpoint path (its statistics go beside it, with ``.vecnormalize.pkl`` for ``.zip``)
    """
    base = folder / stem
    base.parent.mkdir(parents=True, exist_ok=True)
    pattern = re.compile(rf"{re.escape(base.name)}(?:_(\d+))?\.(?:zip|vecnormalize\.pkl)")
    taken = [match for match in map(pattern.fullmatch, os.listdir(base.parent)) if match is not None]
    run = max((int(match.group(1) or 1) for match in taken), default=0) + 1
    while True:
        checkpoint = base.parent / f"{base.name if run == 1 else f'{base.name}_{run}'}.zip"
        try:
            with open(checkpoint, "x"):
                return checkpoint
        except FileExistsError:
            run += 1


def build_env(
    env_id: str, run: dict[str, Any], seed: int, gamma: float | None, n_envs: int | None = None, evaluation: bool = False
) -> VecEnv:
    """
    The vectorized environment that a zoo entry's run keys describe.

    :param env_id: Gymnasium environment id
    :param run: the entry's run keys (``split_run_keys``)
    :param seed: seed of the environments
    :param gamma: the algorithm's discount, when the entry sets it: ``VecNormalize``'s return statistics use it, over a
        ``gamma`` of the entry's ``normalize`` (as in rl-zoo3)
    :param n_envs: number of environments (default: the entry's ``n_envs``, else 1)
    :param evaluation: a ``VecNormalize`` that neither updates its statistics nor normalizes rewards
    :return: the environment, with its wrappers, normalization and frame stack
    """
    env: VecEnv = make_vec_env(
        env_id,
        n_envs=n_envs or int(run.get("n_envs", 1)),
        seed=seed,
        env_kwargs=keyword_arguments(run.get("env_kwargs", {}), "env_kwargs"),
        monitor_kwargs=keyword_arguments(run.get("monitor_kwargs", {}), "monitor_kwargs"),
        wrapper_class=wrapper_class(run.get("env_wrapper")),
    )
    normalize = normalize_kwargs(run.get("normalize", False))
    if normalize is not None:
        if evaluation:
            normalize.update(training=False, norm_reward=False)
        if gamma is not None:
            normalize["gamma"] = gamma
        env = VecNormalize(env, **normalize)
    if run.get("frame_stack"):
        # After the normalization, as rl-zoo3 stacks them
        env = VecFrameStack(env, n_stack=int(run["frame_stack"]))
    return env


def main(argv: list[str] | None = None) -> float:
    """
    :param argv: command-line arguments (default: ``sys.argv``)
    :return: the mean evaluation return
    """
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algo", default="TRPO", help=f"one of {sorted(ALGORITHMS)} (case-insensitive)")
    parser.add_argument("--env", default="CartPole-v1", help="Gymnasium environment id")
    parser.add_argument("--timesteps", type=int, default=None, help="training steps (default: the config's n_timesteps)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-episodes", type=int, default=10)
    parser.add_argument("--output", default="logs", help="folder for the checkpoint")
    parser.add_argument("--progress-bar", action="store_true")
    args = parser.parse_args(argv)

    algo = args.algo.lower()
    if algo not in ALGORITHMS:
        parser.error(f"unknown --algo {args.algo!r}; choose from {sorted(ALGORITHMS)}")
    if args.timesteps is not None and args.timesteps < 1:
        parser.error(f"--timesteps must be at least 1, got {args.timesteps}")
    if args.eval_episodes < 1:
        parser.error(f"--eval-episodes must be at least 1, got {args.eval_episodes}")
    register_atari_games()
    config = CONFIG_DIR / f"{algo}.yml"
    # The zoo files name environments by their registry id ("ale_py:ALE/Pong-v5" reads the entry of "ALE/Pong-v5")
    env_name = registered_id(args.env)
    hyperparameters = load_hyperparameters(algo, env_name, CONFIG_DIR)
    if not hyperparameters and is_atari_game(args.env):
        # As in rl-zoo3, an Atari game without an entry of its own gets the `atari` entry, never the default one
        hyperparameters = load_hyperparameters(algo, ATARI_ENTRY, CONFIG_DIR)
        if not hyperparameters:
            parser.error(f"{config} has no entry for {args.env} and no {ATARI_ENTRY!r} entry, which Atari games use")
    if not hyperparameters:
        # As in rl-zoo3, an environment without an entry gets the file's `default` entry when it has one
        hyperparameters = load_hyperparameters(algo, DEFAULT_ENTRY, CONFIG_DIR)
        missing = f"No entry for {args.env} in {config}" if config.exists() else f"{config} not found"
        used = (
            f"its {DEFAULT_ENTRY!r} entry" if hyperparameters else "its class defaults, one environment and no normalization"
        )
        warnings.warn(f"{missing}: {args.algo} runs with {used}", UserWarning, stacklevel=2)
    run = split_run_keys(hyperparameters, args.env, TRAIN_RUN_KEYS)
    hyperparameters = linear_schedules(hyperparameters)
    timesteps = args.timesteps if args.timesteps is not None else int(float(run.get("n_timesteps", 100_000)))

    gamma = float(hyperparameters["gamma"]) if "gamma" in hyperparameters else None
    frame_skip_warning = repeated_frame_skip(args.env, run)
    if frame_skip_warning is not None:
        warnings.warn(frame_skip_warning, UserWarning, stacklevel=2)
    env = build_env(args.env, run, args.seed, gamma)
    policy = resolve_policy(run.get("policy", "MlpPolicy"))
    model = ALGORITHMS[algo](policy, env, seed=args.seed, verbose=0, **hyperparameters)
    print(f"Training {type(model).__name__} on {args.env} for {timesteps} steps with {hyperparameters}")
    checkpoint_stem = f"{algo}_{env_name}_seed{args.seed}"
    # Our own bar (not learn's progress_bar=True), so that an interrupted run can close it before printing
    progress_bar = ProgressBarCallback() if args.progress_bar else None
    try:
        model.learn(timesteps, callback=progress_bar)
    except KeyboardInterrupt:
        if progress_bar is not None and hasattr(progress_bar, "pbar"):
            progress_bar.pbar.close()
        # As rl-zoo3 does: an interrupted run keeps what it learned (a long run is hours of computation)
        checkpoint = save_model(model, Path(args.output), checkpoint_stem)
        print(f"Interrupted after {model.num_timesteps} steps, not evaluated. Checkpoint: {checkpoint.resolve()}")
        raise SystemExit(130) from None
    checkpoint = save_model(model, Path(args.output), checkpoint_stem)

    # On one fresh environment, as rl-zoo3 evaluates, with the training run's normalization statistics
    eval_env = build_env(args.env, run, args.seed + EVAL_SEED_OFFSET, gamma, n_envs=1, evaluation=True)
    sync_envs_normalization(env, eval_env)
    # Deterministic actions, except on Atari games, where rl-zoo3 samples them (a deterministic policy can stall there)
    deterministic = not is_atari_game(args.env)
    mean_return, std_return = evaluate_policy(model, eval_env, n_eval_episodes=args.eval_episodes, deterministic=deterministic)
    env.close()
    eval_env.close()
    print(f"Mean return over {args.eval_episodes} episodes: {mean_return:.1f} +/- {std_return:.1f}")
    print(f"Checkpoint: {checkpoint.resolve()}")
    return float(mean_return)  # type: ignore[arg-type]


def save_model(model: TrustOnPolicyAlgorithm, folder: Path, stem: str) -> Path:
    """
    :param model: a trained model
    :param folder: the output folder
    :param stem: the run's name
    :return: its checkpoint, under a name no earlier run has (:func:`unused_checkpoint_path`); its ``VecNormalize``
        statistics, if any, are saved beside it (``.vecnormalize.pkl``)
    """
    checkpoint = unused_checkpoint_path(folder, stem)
    model.save(checkpoint)
    vec_normalize = model.get_vec_normalize_env()
    if vec_normalize is not None:
        vec_normalize.save(str(checkpoint.with_suffix(".vecnormalize.pkl")))
    return checkpoint


if __name__ == "__main__":
    main()
