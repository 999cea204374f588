"""
Run rl-zoo3's scripts with the sb3_trust algorithms registered.

rl-zoo3 fixes its ``--algo`` choices when it parses the command line, so the algorithms must be in its ``ALGOS``
table before its script starts; this wrapper does that and then hands over to rl-zoo3::

    python -m sb3_trust.zoo train --algo trpo --env HalfCheetah-v5
    python -m sb3_trust.zoo enjoy --algo trpo --env HalfCheetah-v5 -f logs/

``--algo trpo`` and ``--algo npg`` are sb3_trust's (sb3-contrib's TRPO stays reachable as ``trpo_contrib``).
Unless ``--conf-file`` is given, ``train`` reads the hyperparameters shipped in ``zoo_configs/<algo>.yml``.
Needs the ``zoo`` extra (``pip install -e ".[zoo]"``).
"""

import sys

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


def main(argv: list[str] | None = None) -> None:
    """
    :param argv: ``[command, *rl-zoo3 arguments]`` with command ``train`` or ``enjoy`` (default: ``sys.argv[1:]``)
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        raise SystemExit(f"usage: python -m sb3_trust.zoo {{{','.join(COMMANDS)}}} [rl-zoo3 arguments]\n\n{__doc__}")
    command, arguments = argv[0], argv[1:]
    register_algorithms()
    if command == "train" and not {"--conf-file", "-conf"} & set(arguments):
        algo = arguments[arguments.index("--algo") + 1] if "--algo" in arguments else "ppo"
        config = CONFIG_DIR / f"{algo}.yml"
        if config.exists():
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
