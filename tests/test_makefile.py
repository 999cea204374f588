"""The README's `make train` reads ALGO= and ENV=; the shell's own exported ENV must not be taken for an environment id."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def _train_command(command_line: list[str], environment: dict[str, str]) -> str:
    """
    :param command_line: variables given on make's command line
    :param environment: variables exported to make
    :return: the `python -m sb3_trust.train` line `make -n train` would run
    """
    env = {key: value for key, value in os.environ.items() if key not in ("ENV", "ALGO", "TIMESTEPS")}
    env.update(environment)
    result = subprocess.run(
        ["make", "-n", "-C", str(REPO), "train", *command_line], env=env, capture_output=True, text=True, check=True
    )
    (line,) = [line for line in result.stdout.splitlines() if "-m sb3_trust.train" in line]
    return line


def test_default_is_trpo_on_cartpole() -> None:
    line = _train_command([], {})
    assert "--algo TRPO --env CartPole-v1" in line and "--timesteps" not in line


def test_variables_choose_algorithm_and_environment() -> None:
    line = _train_command(["ALGO=ACKTR", "TIMESTEPS=500"], {"ENV": "Pendulum-v1"})
    assert "--algo ACKTR --env Pendulum-v1 --timesteps 500" in line


def test_shell_startup_file_in_env_is_ignored(tmp_path: Path) -> None:
    startup_file = tmp_path / ".shrc"
    startup_file.write_text("")
    assert "--env CartPole-v1" in _train_command([], {"ENV": str(startup_file)})
    assert "--env Hopper-v5" in _train_command(["ENV=Hopper-v5"], {"ENV": str(startup_file)})
