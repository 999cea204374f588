"""Fixtures shared by several test modules."""

import os
from collections.abc import Iterator

import pytest
import torch as th


@pytest.fixture(autouse=True, scope="session")
def sb3_logdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """
    Every ``learn()`` without a log folder makes an empty ``SB3-<date>`` folder in the system's temporary directory
    (``stable_baselines3.common.logger.configure``): thousands per run of the suite, never removed. SB3 puts them under
    ``SB3_LOGDIR`` when it is set, so the suite points it at pytest's own temporary directory, which pytest prunes.
    """
    previous = os.environ.get("SB3_LOGDIR")
    os.environ["SB3_LOGDIR"] = str(tmp_path_factory.mktemp("sb3_logs"))
    yield
    if previous is None:
        del os.environ["SB3_LOGDIR"]
    else:
        os.environ["SB3_LOGDIR"] = previous


@pytest.fixture
def single_thread() -> Iterator[None]:
    """
    One torch thread for the test: K-FAC's eigendecompositions (and im2col) slow down many times when the pytest
    workers' LAPACK/OpenMP threads compete for the cores.
    """
    threads = th.get_num_threads()
    th.set_num_threads(1)
    yield
    th.set_num_threads(threads)
