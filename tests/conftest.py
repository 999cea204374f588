"""Fixtures shared by several test modules."""

from collections.abc import Iterator

import pytest
import torch as th


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
