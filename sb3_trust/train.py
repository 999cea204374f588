"""
Train an sb3_trust algorithm with the hyperparameters shipped in ``zoo_configs/``, evaluate it and save it.

Usage: ``python -m sb3_trust.train --algo TRPO --env CartPole-v1`` (what ``make train`` runs).
"""

import argparse
import os
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
CONFIG_DIR = Path(__file__).resolve().parent.parent / "zoo_configs"
# Keys of the zoo's YAML files that describe the environment or the run rather than the algorithm
RUN_KEYS = ("n_envs", "n_timesteps", "policy", "normalize", "env_wrapper", "frame_stack", "callback")


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
    run = {key: hyperparameters.pop(key) for key in RUN_KEYS if key in hyperparameters}
    timesteps = args.timesteps or int(float(run.get("n_timesteps", 100_000)))

    env = make_vec_env(args.env, n_envs=int(run.get("n_envs", 1)), seed=args.seed)
    if run.get("normalize"):
        env = VecNormalize(env, gamma=float(hyperparameters.get("gamma", 0.99)))
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
