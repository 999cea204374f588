"""
Run rl-zoo3's scripts with the sb3_trust algorithms registered.

rl-zoo3 fixes its ``--algo`` choices when it parses the command line, so the algorithms must be in its ``ALGOS``
table before its script starts; this wrapper does that and then hands over to rl-zoo3::

    python -m sb3_trust.zoo train --algo trpo --env HalfCheetah-v5
    python -m sb3_trust.zoo enjoy --algo trpo --env HalfCheetah-v5 -f logs/
    MUJOCO_GL=egl python -m sb3_trust.zoo record_video --algo trpo --env HalfCheetah-v5 -f logs/ -n 1000

``--algo acktr``, ``npg``, ``ppokl`` and ``trpo`` are sb3_trust's (sb3-contrib's TRPO stays reachable as ``trpo_contrib``).
Unless ``--conf-file`` is given, ``train`` reads the hyperparameters shipped in ``zoo_configs/<algo>.yml``
(``trpo_contrib``: rl-zoo3's own ``hyperparams/trpo.yml``).
Hyperparameter search (``train ... -optimize``) samples from the spaces below (``SAMPLERS``).
Needs the ``zoo`` extra (``pip install -e ".[zoo]"``).
"""

import argparse
import runpy
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sb3_trust.train import ALGORITHMS, ATARI_ENTRY, CONFIG_DIR, is_atari_game, register_atari_games, repeated_frame_skip

# rl-zoo3's scripts that the wrapper runs; record_training runs rl_zoo3.record_video in a new process, which does
# not know these algorithms, and the hub scripts' --algo names models on the Hugging Face Hub
COMMANDS = ("train", "enjoy", "record_video")


def convert_sampled_params(sampled_params: dict[str, Any]) -> dict[str, Any]:
    """
    Turn the values an optuna trial sampled into the algorithm's keyword arguments (rl-zoo3's conversion of
    ``one_minus_gamma``, ``n_steps_pow``, ``net_arch`` names, ...), with ``batch_size`` at most ``n_steps`` so that it
    divides every rollout ``n_steps * n_envs``: NPG's and TRPO's constructors refuse one that does not (PPOKL warns).

    :param sampled_params: ``trial.params``
    :return: the keyword arguments
    """
    from rl_zoo3.hyperparams_opt import convert_onpolicy_params

    hyperparameters = convert_onpolicy_params(sampled_params)
    if "batch_size" in hyperparameters:
        hyperparameters["batch_size"] = min(hyperparameters["batch_size"], hyperparameters["n_steps"])
    return hyperparameters


def _trial_arguments(trial: Any) -> dict[str, Any]:
    """
    :param trial: an optuna trial whose parameters are all sampled
    :return: its keyword arguments (``convert_sampled_params``), after recording the discount, rollout length and
        minibatch size they hold as the trial's user attributes, as rl-zoo3's samplers do: the search's reports show
        them, and the ``batch_size`` shown is the one trained with, after the cap
    """
    hyperparameters = convert_sampled_params(trial.params)
    for key in ("gamma", "n_steps", "batch_size"):
        if key in hyperparameters:
            trial.set_user_attr(key, hyperparameters[key])
    return hyperparameters


def _suggest_onpolicy_basics(trial: Any, net_archs: tuple[str, ...] = ("small", "medium")) -> None:
    """
    :param trial: an optuna trial; suggests the discount, GAE's λ, the network and its activation (rl-zoo3's ranges)
    :param net_archs: the network sizes to choose from (rl-zoo3's names)
    """
    trial.suggest_float("one_minus_gamma", 0.0001, 0.03, log=True)
    trial.suggest_float("one_minus_gae_lambda", 0.0001, 0.1, log=True)
    trial.suggest_categorical("net_arch", list(net_archs))
    trial.suggest_categorical("activation_fn", ["tanh", "relu"])


def sample_natural_gradient_params(trial: Any, n_actions: int, n_envs: int, additional_args: dict) -> dict[str, Any]:
    """
    NPG's and TRPO's search space: rl-zoo3's for sb3-contrib's TRPO, with the trust region δ and the damping in our
    convention. sb3-contrib's KL is averaged over the d action dimensions, ours is the joint KL, so the range of
    ``target_kl`` is d times sb3-contrib's (and ``cg_damping`` around 0.1·d, the value sb3-contrib's default means).

    :param trial: the optuna trial
    :param n_actions: d, the action dimensions (rl-zoo3 passes 0 for non-Box spaces: taken as 1)
    :param n_envs: number of environments (unused: ``batch_size`` is capped at ``n_steps``)
    :param additional_args: rl-zoo3's extra arguments (unused)
    :return: the keyword arguments of the trial
    """
    dimensions = max(1, n_actions)
    trial.suggest_int("n_steps_pow", 5, 12)
    trial.suggest_int("batch_size_pow", 5, 10)
    trial.suggest_float("learning_rate", 1e-5, 0.002, log=True)
    trial.suggest_int("n_critic_updates", 5, 30)
    trial.suggest_int("cg_max_steps", 5, 30)
    trial.suggest_float("target_kl", 0.001 * dimensions, 0.1 * dimensions, log=True)
    trial.suggest_float("cg_damping", 0.01 * dimensions, 1.0 * dimensions, log=True)
    _suggest_onpolicy_basics(trial)
    return _trial_arguments(trial)


def sample_ppokl_params(trial: Any, n_actions: int, n_envs: int, additional_args: dict) -> dict[str, Any]:
    """
    PPOKL's search space: rl-zoo3's for PPO without the clipping (PPOKL's default is the pure penalty), with the
    penalty's target d_targ over the PPO paper's range (0.003 to 0.03).

    :param trial: the optuna trial
    :param n_actions: action dimensions (unused: PPOKL's KL target is not tuned per dimension by the paper either)
    :param n_envs: number of environments (unused: ``batch_size`` is capped at ``n_steps``)
    :param additional_args: rl-zoo3's extra arguments (unused)
    :return: the keyword arguments of the trial
    """
    trial.suggest_int("n_steps_pow", 5, 12)
    trial.suggest_int("batch_size_pow", 5, 10)
    trial.suggest_float("learning_rate", 1e-5, 0.002, log=True)
    trial.suggest_float("ent_coef", 1e-8, 0.1, log=True)
    trial.suggest_categorical("n_epochs", [1, 5, 10, 20])
    trial.suggest_float("max_grad_norm", 0.3, 2.0)
    trial.suggest_float("target_kl", 0.003, 0.03, log=True)
    _suggest_onpolicy_basics(trial, ("tiny", "small", "medium"))
    return _trial_arguments(trial)


def sample_acktr_params(trial: Any, n_actions: int, n_envs: int, additional_args: dict) -> dict[str, Any]:
    """
    ACKTR's search space: A2C's loss settings around the ACKTR paper's (short rollouts), K-FAC's step length
    ``learning_rate`` around the paper's 0.25 and its trust region ``kfac_kl_clip`` around baselines' 0.001.

    :param trial: the optuna trial
    :param n_actions: action dimensions (unused)
    :param n_envs: number of environments (unused)
    :param additional_args: rl-zoo3's extra arguments (unused)
    :return: the keyword arguments of the trial
    """
    trial.suggest_categorical("n_steps", [5, 8, 16, 20, 32, 64])
    trial.suggest_float("learning_rate", 0.01, 1.0, log=True)
    trial.suggest_float("kfac_kl_clip", 1e-4, 1e-2, log=True)
    trial.suggest_float("ent_coef", 1e-8, 0.1, log=True)
    trial.suggest_float("vf_coef", 0.1, 1.0)
    trial.suggest_float("max_grad_norm", 0.3, 2.0)
    _suggest_onpolicy_basics(trial)
    return _trial_arguments(trial)


SAMPLERS: dict[str, Callable[[Any, int, int, dict], dict[str, Any]]] = {
    "acktr": sample_acktr_params,
    "npg": sample_natural_gradient_params,
    "ppokl": sample_ppokl_params,
    "trpo": sample_natural_gradient_params,
}


def register_algorithms() -> None:
    """
    Add the sb3_trust algorithms to rl-zoo3's ``ALGOS`` table and their search spaces to its samplers (in place:
    every rl-zoo3 module shares these tables).
    """
    from rl_zoo3.hyperparams_opt import HYPERPARAMS_CONVERTER, HYPERPARAMS_SAMPLER
    from rl_zoo3.utils import ALGOS

    if "trpo" in ALGOS and ALGOS["trpo"] is not ALGORITHMS["trpo"]:
        ALGOS.setdefault("trpo_contrib", ALGOS["trpo"])
        HYPERPARAMS_SAMPLER.setdefault("trpo_contrib", HYPERPARAMS_SAMPLER["trpo"])
        HYPERPARAMS_CONVERTER.setdefault("trpo_contrib", HYPERPARAMS_CONVERTER["trpo"])
    ALGOS.update(ALGORITHMS)
    HYPERPARAMS_SAMPLER.update(SAMPLERS)
    HYPERPARAMS_CONVERTER.update({algo: convert_sampled_params for algo in SAMPLERS})


def _option_value(arguments: list[str], *names: str) -> str | None:
    """
    :param arguments: command-line arguments
    :param names: spellings of one option
    :return: its value, given as ``--name value`` or ``--name=value`` (the last one, as argparse keeps), or None when
        absent; ``name`` may be shortened
        as argparse allows (``--conf`` for ``--conf-file``, ``-con`` for ``-conf``): rl-zoo3's parser takes any
        unambiguous prefix, and an ambiguous one is an error there anyway
    """
    found = None
    for index, argument in enumerate(arguments):
        if argument == "--":
            break
        option, equals, value = argument.partition("=")
        if len(option) < 2 or option == "--" or not any(name.startswith(option) for name in names):
            continue
        if equals:
            found = value
        elif index + 1 < len(arguments):
            found = arguments[index + 1]
    return found


def _entry_overrides(arguments: list[str]) -> dict[str, Any]:
    """
    :param arguments: command-line arguments of rl-zoo3's ``train``
    :return: what they put over the zoo entry's values, read as rl-zoo3 reads them: ``-params``/``--hyperparams``
        ``key:value`` pairs, then ``--env-kwargs`` (which replace the ``env_kwargs``); {} when none can be read (rl-zoo3
        then reports what is wrong)
    """
    from rl_zoo3.utils import StoreDict

    # The options around them too, so that abbreviations resolve as in rl-zoo3's parser (``--env`` is not ``--env-kwargs``)
    parser = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    parser.add_argument("--env")
    parser.add_argument("--env-kwargs", nargs="+", action=StoreDict)
    parser.add_argument("--eval-env-kwargs", nargs="+", action=StoreDict)
    parser.add_argument("-params", "--hyperparams", nargs="+", action=StoreDict)
    try:
        known, _ = parser.parse_known_args(arguments)
    except Exception:
        return {}
    overrides = dict(known.hyperparams or {})
    if known.env_kwargs:
        overrides["env_kwargs"] = known.env_kwargs
    return overrides


def default_config(algo: str) -> Path | None:
    """
    :param algo: the ``--algo`` of a ``train`` command
    :return: the hyperparameter file it reads when no ``--conf-file`` is given, or None for rl-zoo3's own
        algorithms (rl-zoo3 finds their files itself)
    :raises SystemExit: when the file of one of our algorithms is missing (an install without ``zoo_configs/``)
    """
    if algo == "trpo_contrib":
        import rl_zoo3

        return Path(rl_zoo3.__file__).parent / "hyperparams" / "trpo.yml"
    if algo not in ALGORITHMS:
        return None
    config = CONFIG_DIR / f"{algo}.yml"
    if not config.exists():
        raise SystemExit(f"{config} not found: install sb3_trust from its source tree, or pass --conf-file")
    return config


def check_atari_entry(config: Path, env_id: str, overrides: dict[str, Any] | None = None) -> None:
    """
    rl-zoo3 reads an Atari game without an entry of its own from the file's ``atari`` entry, and fails with a bare
    ``KeyError`` when there is none: say so instead. Warn, too, when the entry's ``AtariWrapper`` repeats the actions
    of a game that already repeats them (``repeated_frame_skip``).

    :param config: the YAML file a ``train`` command reads
    :param env_id: its ``--env``
    :param overrides: what its other arguments put over the entry's values (``_entry_overrides``)
    :raises SystemExit: for an Atari game that the file has neither an entry nor an ``atari`` entry for
    """
    import yaml

    register_atari_games()
    # rl-zoo3 refuses a module-prefixed id ("ale_py:ALE/Pong-v5") itself, with its own message
    if ":" in env_id or config.suffix not in (".yml", ".yaml") or not config.exists() or not is_atari_game(env_id):
        return
    with open(config) as file:
        entries = yaml.safe_load(file) or {}
    if env_id not in entries and ATARI_ENTRY not in entries:
        raise SystemExit(
            f"{config} has no entry for {env_id} and no {ATARI_ENTRY!r} entry, which rl-zoo3 uses for Atari games: "
            "add one, or pass --conf-file with one (zoo_configs/ ships one for acktr and ppokl)"
        )
    entry = {**(entries.get(env_id, entries.get(ATARI_ENTRY)) or {}), **(overrides or {})}
    try:
        frame_skip_warning = repeated_frame_skip(env_id, entry)
    except (ImportError, AttributeError, TypeError, ValueError, SyntaxError, NameError):
        return  # a wrapper or env_kwargs that cannot be read: rl-zoo3 reports it when it builds the environment
    if frame_skip_warning is not None:
        warnings.warn(frame_skip_warning, UserWarning, stacklevel=2)


def main(argv: list[str] | None = None) -> None:
    """
    :param argv: ``[command, *rl-zoo3 arguments]`` with command one of ``COMMANDS`` (default: ``sys.argv[1:]``)
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        raise SystemExit(f"usage: python -m sb3_trust.zoo {{{','.join(COMMANDS)}}} [rl-zoo3 arguments]\n\n{__doc__}")
    command, arguments = argv[0], argv[1:]
    register_algorithms()
    if command == "train":
        user_config = _option_value(arguments, "--conf-file", "-conf")
        config = Path(user_config) if user_config is not None else default_config(_option_value(arguments, "--algo") or "ppo")
        if config is not None:
            check_atari_entry(config, _option_value(arguments, "--env") or "CartPole-v1", _entry_overrides(arguments))
        if user_config is None and config is not None:
            # First, so that a --conf-file the user gave in a spelling not recognised above still wins: argparse keeps
            # the last value of an option
            arguments = ["--conf-file", str(config), *arguments]
    sys.argv = [f"rl_zoo3.{command}", *arguments]
    if command == "train":
        from rl_zoo3.train import train

        train()
    elif command == "enjoy":
        from rl_zoo3.enjoy import enjoy

        enjoy()
    else:
        # A script without a function to call: run as `python -m rl_zoo3.record_video` runs it
        runpy.run_module(f"rl_zoo3.{command}", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
