"""Checks of constructor arguments shared by the algorithms: a bad value fails at construction, with its name."""

import numpy as np


def _check_real(name: str, value: object) -> None:
    """
    :param name: an argument's name
    :param value: its value
    :raises ValueError: when it is not a real number (None, or a string such as YAML's unquoted ``1e-3``): the
        comparisons of the checks below would raise a TypeError that does not name it
    """
    if not isinstance(value, (str, bytes)):
        try:
            float(value)  # type: ignore[arg-type]
            return
        except (TypeError, ValueError):
            pass
    raise ValueError(f"`{name}` must be a number, got {value!r}")


def check_positive(**values: float) -> None:
    """
    :param values: named numbers that must be finite and > 0
    :raises ValueError: naming the first that is not
    """
    for name, value in values.items():
        _check_real(name, value)
        if not (value > 0 and np.isfinite(value)):
            raise ValueError(f"`{name}` must be a finite positive number, got {value}")


def check_positive_or_infinite(**values: float) -> None:
    """
    :param values: named numbers that must be > 0, infinity included (``max_grad_norm=inf`` turns clipping off, as
        in SB3)
    :raises ValueError: naming the first that is not (NaN included)
    """
    for name, value in values.items():
        _check_real(name, value)
        if not value > 0:
            raise ValueError(f"`{name}` must be positive, got {value}")


def check_non_negative(**values: float) -> None:
    """
    :param values: named numbers that must be finite and >= 0
    :raises ValueError: naming the first that is not (NaN included)
    """
    for name, value in values.items():
        _check_real(name, value)
        if not (np.isfinite(value) and value >= 0):
            raise ValueError(f"`{name}` must be a finite number >= 0, got {value}")


def check_integer(minimum: int, **values: int) -> None:
    """
    :param minimum: the smallest value allowed
    :param values: named counts that must be integers >= ``minimum`` (a float such as 64.0 is refused: it would only
        fail later, inside ``train()``)
    :raises ValueError: naming the first that is not
    """
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not value >= minimum:
            raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}")


def check_unit_interval(**values: float) -> None:
    """
    :param values: named numbers that must lie in [0, 1] (discount and GAE factors)
    :raises ValueError: naming the first that does not (NaN included)
    """
    for name, value in values.items():
        _check_real(name, value)
        if not 0 <= value <= 1:
            raise ValueError(f"`{name}` must lie in [0, 1], got {value}")


def check_open_unit_interval(**values: float) -> None:
    """
    :param values: named numbers that must lie in (0, 1) (shrinking factors, decays)
    :raises ValueError: naming the first that does not (NaN included)
    """
    for name, value in values.items():
        _check_real(name, value)
        if not 0 < value < 1:
            raise ValueError(f"`{name}` must lie in (0, 1), got {value}")


def check_momentum(**values: float) -> None:
    """
    :param values: named momentum coefficients, which must lie in [0, 1)
    :raises ValueError: naming the first that does not (NaN included)
    """
    for name, value in values.items():
        _check_real(name, value)
        if not 0 <= value < 1:
            raise ValueError(f"`{name}` must lie in [0, 1), got {value}")
