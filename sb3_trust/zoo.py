"""
Run rl-zoo3's scripts with the sb3_trust algorithms registered.

rl-zoo3 fixes its ``--algo`` choices when it parses the command line, so the algorithms must be in its ``ALGOS``
table before its script starts; this wrapper does that and then hands over to rl-zoo3::

    python -m sb3_trust.zoo train --algo trpo --env HalfCheetah-v5
    python -m sb3_trust.zoo enjoy --algo trpo --env HalfCheetah-v5 -f logs/

``--algo acktr``, ``npg``, ``ppokl`` and ``trpo`` are sb3_trust's (sb3-contrib's TRPO stays reachable as ``trpo_contrib``).
Unless ``--conf-file`` is given, ``train`` reads the hyperparameters shipped in ``zoo_configs/<algo>.yml``
(``trpo_contrib``: rl-zoo3's own ``hyperparams/trpo.yml``).
Needs the ``zoo`` extra (``pip install -e ".[zoo]"``).
"""

import sys
from pathlib import Path

from sb3_trust.train import ALGORITHMS, CONFIG_DIR

COMMANDS = ("train", "enjoy")


def register_algorithms() -> None:
    """
    Add the sb3_trust algorithms to rl-zoo3's ``ALGOS`` table (in place: every rl-zoo3 module shares it).
    """
    from rl_zoo3.utils import ALGOS

    if "trpo" in ALGOS and ALGOS["trpo"] is not ALGORITHMS["trpo"]:
        ALGOS.setdefault("trpo_contrib", ALGOS["trpo"])
    ALGOS.update(ALGORITHMS)


def _option_value(arguments: list[str], *names: str) -> str | None:
    """
    :param arguments: command-line arguments
    :param names: spellings of one option
    :return: its value, given as ``--name value`` or ``--name=value``, or None when absent
    """
    for index, argument in enumerate(arguments):
        for name in names:
            if argument == name and index + 1 < len(arguments):
                return arguments[index + 1]
            if argument.startswith(f"{name}="):
                return argument.split("=", 1)[1]
    return None


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


def main(argv: list[str] | None = None) -> None:
    """
    :param argv: ``[command, *rl-zoo3 arguments]`` with command ``train`` or ``enjoy`` (default: ``sys.argv[1:]``)
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        raise SystemExit(f"usage: python -m sb3_trust.zoo {{{','.join(COMMANDS)}}} [rl-zoo3 arguments]\n\n{__doc__}")
    command, arguments = argv[0], argv[1:]
    register_algorithms()
    if command == "train" and _option_value(arguments, "--conf-file", "-conf") is None:
        config = default_config(_option_value(arguments, "--algo") or "ppo")
        if config is not None:
            arguments += ["--conf-file", str(config)]
    sys.argv = [f"rl_zoo3.{command}", *arguments]
    if command == "train":
        from rl_zoo3.train import train

        train()
    else:
        from rl_zoo3.enjoy import enjoy

        enjoy()


if __name__ == "__main__":
    main()
