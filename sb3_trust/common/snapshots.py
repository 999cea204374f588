"""
Saved states of Gymnasium environments, restored into other instances of them (TRPO's vine sampling).

``copy.deepcopy`` is no snapshot for most simulators: MuJoCo, Box2D and ALE environments are ``EzPickle``, whose
copy is a *new* environment built from the constructor's arguments. A snapshot here is the state of every wrapper
(their attributes, e.g. ``TimeLimit``'s step count), the simulator's state by a handler that knows it, and the
environment's random generator (so that every branch restored from one snapshot draws the same environment noise).
Handlers: a user environment's own ``get_vine_state()`` / ``set_vine_state(state)``; MuJoCo (``mj_copyData``, exact
where ``set_state(qpos, qvel)`` is not, e.g. on Ant); ALE (``cloneState(include_rng=True)``); and environments of
plain Python objects (a deep copy of their attributes). Anything else (Box2D's LunarLander, …) is refused.

SB3's ``Monitor`` is left out of the branch environments, so their episodes never reach the training statistics.
"""

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.utils import EzPickle
from stable_baselines3.common.monitor import Monitor

# A wrapper's attributes that are its structure, not its state: not saved, not restored
STRUCTURE_ATTRIBUTES = frozenset(
    {"env", "_action_space", "_observation_space", "_metadata", "_cached_spec", "_saved_kwargs", "spec", "_reward_range"}
)
# An environment's attributes that a plain-Python snapshot leaves alone (its spaces and description; its generator
# is saved on its own)
PLAIN_STRUCTURE_ATTRIBUTES = frozenset(
    {"action_space", "observation_space", "metadata", "spec", "render_mode", "_np_random", "_np_random_seed"}
)


def wrapper_chain(env: gym.Env) -> list[gym.Env]:
    """
    :param env: an environment, possibly wrapped
    :return: its wrappers from the outermost in, then the environment itself
    """
    chain = [env]
    while isinstance(chain[-1], gym.Wrapper):
        chain.append(chain[-1].env)
    return chain


def _wrapper_state(wrapper: gym.Env) -> dict[str, Any]:
    return copy.deepcopy({key: value for key, value in vars(wrapper).items() if key not in STRUCTURE_ATTRIBUTES})


@dataclass
class _StateHandler:
    """How the state of one kind of environment is read and written."""

    name: str
    save: Callable[[Any], Any]
    restore: Callable[[Any, Any], None]


def _user_handler() -> _StateHandler:
    return _StateHandler(
        "get_vine_state/set_vine_state",
        lambda env: env.get_vine_state(),
        lambda env, state: env.set_vine_state(copy.deepcopy(state)),
    )


def _mujoco_handler() -> _StateHandler:
    import mujoco

    def save(env: Any) -> Any:
        data = mujoco.MjData(env.model)
        mujoco.mj_copyData(data, env.model, env.data)
        return data

    return _StateHandler("MuJoCo", save, lambda env, data: mujoco.mj_copyData(env.data, env.model, data))


def _ale_handler() -> _StateHandler:
    return _StateHandler(
        "ALE", lambda env: env.ale.cloneState(include_rng=True), lambda env, state: env.ale.restoreState(state)
    )


def _plain_handler() -> _StateHandler:
    def save(env: Any) -> dict[str, Any]:
        return copy.deepcopy({key: value for key, value in vars(env).items() if key not in PLAIN_STRUCTURE_ATTRIBUTES})

    return _StateHandler("attributes", save, lambda env, state: vars(env).update(copy.deepcopy(state)))


def _is_instance_of(env: gym.Env, module: str, class_name: str) -> bool:
    # The simulators are optional dependencies: a class is only looked up if its module is already imported
    import sys

    loaded = sys.modules.get(module)
    cls = getattr(loaded, class_name, None) if loaded is not None else None
    return cls is not None and isinstance(env, cls)


def state_handler(unwrapped: gym.Env) -> _StateHandler:
    """
    :param unwrapped: an environment without its wrappers
    :return: how to save and restore its state
    :raises TypeError: when no handler knows it
    """
    if callable(getattr(unwrapped, "get_vine_state", None)) and callable(getattr(unwrapped, "set_vine_state", None)):
        return _user_handler()
    if _is_instance_of(unwrapped, "gymnasium.envs.mujoco.mujoco_env", "MujocoEnv"):
        return _mujoco_handler()
    if _is_instance_of(unwrapped, "ale_py.env", "AtariEnv"):
        return _ale_handler()
    if not isinstance(unwrapped, EzPickle):
        return _plain_handler()
    raise TypeError(
        f"Cannot save the state of {type(unwrapped).__name__} for vine sampling: it is no MuJoCo, ALE or plain-Python "
        "environment (e.g. Box2D's, whose copies are new environments). Give it the methods get_vine_state() and "
        "set_vine_state(state), or use sampling='single_path'"
    )


@dataclass
class EnvSnapshot:
    """
    An environment's saved state.

    :param wrapper_states: the attributes of each wrapper, outermost first, ``Monitor`` left out
    :param simulator_state: what the environment's handler saved
    :param generator: a copy of the environment's random generator
    """

    wrapper_states: list[dict[str, Any]]
    simulator_state: Any
    generator: np.random.Generator


def snapshot_env(env: gym.Env) -> EnvSnapshot:
    """
    Save an environment's state (it is left unchanged).

    :param env: an environment of a ``DummyVecEnv``, with its wrappers
    :return: the snapshot
    :raises TypeError: when its state cannot be saved (:func:`state_handler`)
    """
    chain = wrapper_chain(env)
    unwrapped = chain[-1]
    return EnvSnapshot(
        [_wrapper_state(wrapper) for wrapper in chain[:-1] if not isinstance(wrapper, Monitor)],
        state_handler(unwrapped).save(unwrapped),
        copy.deepcopy(unwrapped.np_random),
    )


def make_branch_env(env: gym.Env) -> gym.Env:
    """
    An environment to restore snapshots of ``env`` into: its wrapper chain without SB3's ``Monitor``, so that the
    branches' episodes are not recorded.

    :param env: an environment of a ``DummyVecEnv``, with its wrappers
    :return: the branch environment (in no particular state until a snapshot is restored into it)
    """
    # A Monitor's copy is its inner environment's: the wrapper above it (if any) gets that in its place
    monitors = {id(wrapper): copy.deepcopy(wrapper.env) for wrapper in wrapper_chain(env) if isinstance(wrapper, Monitor)}
    return copy.deepcopy(env, memo=dict(monitors))


def restore_env(branch_env: gym.Env, snapshot: EnvSnapshot) -> None:
    """
    Put a branch environment in the saved state.

    :param branch_env: an environment from :func:`make_branch_env` of the environment the snapshot was taken of
    :param snapshot: the saved state (left unchanged: it can be restored again)
    """
    chain = wrapper_chain(branch_env)
    for wrapper, state in zip(chain[:-1], snapshot.wrapper_states, strict=True):
        vars(wrapper).update(copy.deepcopy(state))
    unwrapped = chain[-1]
    state_handler(unwrapped).restore(unwrapped, snapshot.simulator_state)
    unwrapped.np_random = copy.deepcopy(snapshot.generator)
