"""
Train an sb3_trust algorithm with the hyperparameters shipped in ``zoo_configs/``, evaluate it and save it.

Usage: ``python -m sb3_trust.train --algo TRPO --env CartPole-v1`` (what ``make train`` runs).
"""

import argparse
import ast
import os
import sys
import sysconfig
import warnings
from pathlib import Path
from typing import Any

import torch as th
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.vec_env import VecNormalize

import sb3_trust
from sb3_trust.common.on_policy import TrustOnPolicyAlgorithm

ALGORITHMS: dict[str, type[TrustOnPolicyAlgorithm]] = {
    "acktr": sb3_trust.ACKTR,
    "npg": sb3_trust.NPG,
    "ppokl": sb3_trust.PPOKL,
    "trpo": sb3_trust.TRPO,
}

# Keys of the zoo's YAML files that describe the environment or the run rather than the algorithm
RUN_KEYS = ("n_envs", "n_timesteps", "policy", "normalize", "env_wrapper", "frame_stack", "callback")
# Run keys that only rl-zoo3's own scripts implement (python -m sb3_trust.zoo)
UNSUPPORTED_RUN_KEYS = ("env_wrapper", "frame_stack", "callback")


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


def normalize_kwargs(value: Any) -> dict[str, Any] | None:
    """
    :param value: the zoo's ``normalize`` entry: a bool, a dict, or a dict's string (rl-zoo3 accepts all three)
    :return: ``VecNormalize`` keyword arguments, or None without normalization
    """
    if isinstance(value, str):
        value = ast.literal_eval(value)
    if isinstance(value, dict):
        return dict(value)
    return {} if value else None


def split_run_keys(hyperparameters: dict[str, Any], env_id: str) -> dict[str, Any]:
    """
    Move the run keys out of a zoo entry.

    :param hyperparameters: the entry; the algorithm's keyword arguments are left in it
    :param env_id: its environment, for the error message
    :return: the run keys
    :raises ValueError: for run keys that only rl-zoo3's scripts implement (they would be silently ignored)
    """
    run = {key: hyperparameters.pop(key) for key in RUN_KEYS if key in hyperparameters}
    unsupported = sorted(set(run) & set(UNSUPPORTED_RUN_KEYS))
    if unsupported:
        raise ValueError(f"{env_id}: the zoo keys {unsupported} need rl-zoo3's scripts (python -m sb3_trust.zoo train)")
    return run


def load_hyperparameters(algo: str, env_id: str, config_dir: Path = CONFIG_DIR) -> dict[str, Any]:
    """
    The RL Zoo hyperparameters for ``env_id`` from ``zoo_configs/<algo>.yml``, or {} when there are none.

    :param algo: algorithm name (lower case)
    :param env_id: Gymnasium environment id
    :param config_dir: folder of the YAML files
    :return: the hyperparameters, with ``policy_kwargs`` strings evaluated
    """
    path = config_dir / f"{algo}.yml"
    if not path.exists():
        return {}
    try:
        import yaml
    except ImportError as error:  # PyYAML comes with the `zoo` extra
        raise ImportError(f"Reading {path} needs PyYAML: pip install pyyaml (or the package's `zoo` extra)") from error

    with open(path) as file:
        configs = yaml.safe_load(file) or {}
    hyperparameters = dict(configs.get(env_id, {}))
    if isinstance(hyperparameters.get("policy_kwargs"), str):
        hyperparameters["policy_kwargs"] = eval(hyperparameters["policy_kwargs"], {"nn": th.nn, "dict": dict})
    return hyperparameters


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
    hyperparameters = load_hyperparameters(algo, args.env)
    if not hyperparameters:
        config = CONFIG_DIR / f"{algo}.yml"
        missing = f"No entry for {args.env} in {config}" if config.exists() else f"{config} not found"
        warnings.warn(
            f"{missing}: {args.algo} runs with its class defaults, one environment and no normalization",
            UserWarning,
            stacklevel=2,
        )
    run = split_run_keys(hyperparameters, args.env)
    timesteps = args.timesteps or int(float(run.get("n_timesteps", 100_000)))

    env = make_vec_env(args.env, n_envs=int(run.get("n_envs", 1)), seed=args.seed)
    normalize = normalize_kwargs(run.get("normalize", False))
    if normalize is not None:
        env = VecNormalize(env, **{"gamma": float(hyperparameters.get("gamma", 0.99)), **normalize})
    model = ALGORITHMS[algo](run.get("policy", "MlpPolicy"), env, seed=args.seed, verbose=0, **hyperparameters)
    print(f"Training {type(model).__name__} on {args.env} for {timesteps} steps with {hyperparameters}")
    model.learn(timesteps, progress_bar=args.progress_bar)

    os.makedirs(args.output, exist_ok=True)
    checkpoint = Path(args.output) / f"{algo}_{args.env}_seed{args.seed}.zip"
    model.save(checkpoint)
    if isinstance(env, VecNormalize):
        env.save(str(checkpoint.with_suffix(".vecnormalize.pkl")))
        env.training, env.norm_reward = False, False

    mean_return, std_return = evaluate_policy(model, env, n_eval_episodes=args.eval_episodes, deterministic=True)
    print(f"Mean return over {args.eval_episodes} episodes: {mean_return:.1f} +/- {std_return:.1f}")
    print(f"Checkpoint: {checkpoint.resolve()}")
    return float(mean_return)  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
