"""Learning checks: each algorithm solves CartPole-v1 within 100k steps for a fixed seed (zoo_configs settings)."""

import pytest
import torch as th
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.evaluation import evaluate_policy

from sb3_trust import NPG, PPOKL, TRPO
from sb3_trust.train import load_hyperparameters


@pytest.mark.slow
@pytest.mark.parametrize("algo", [NPG, PPOKL, TRPO])
def test_solves_cartpole_within_100k_steps(algo: type[NPG]) -> None:
    assert train_and_evaluate(algo) >= 475


def train_and_evaluate(algo: type[NPG], seed: int = 0) -> float:
    """
    :param algo: the algorithm
    :param seed: of the model and its environments (the test uses 0; docs/benchmarks.md reports others)
    :return: the mean return of 20 deterministic evaluation episodes after 100k steps with the zoo's CartPole-v1 entry,
        trained on one torch thread (the result of a fixed seed must not depend on the machine's core count)
    """
    threads = th.get_num_threads()
    th.set_num_threads(1)
    try:
        return _train_and_evaluate(algo, seed)
    finally:
        th.set_num_threads(threads)


def _train_and_evaluate(algo: type[NPG], seed: int) -> float:
    hyperparameters = load_hyperparameters(algo.__name__.lower(), "CartPole-v1")
    n_envs = hyperparameters.pop("n_envs")
    for key in ("n_timesteps", "policy"):
        hyperparameters.pop(key)
    model = algo("MlpPolicy", make_vec_env("CartPole-v1", n_envs=n_envs, seed=seed), seed=seed, **hyperparameters)
    model.learn(100_000)
    mean_return, _ = evaluate_policy(model, make_vec_env("CartPole-v1", n_envs=1, seed=123), n_eval_episodes=20)
    return float(mean_return)  # type: ignore[arg-type]
