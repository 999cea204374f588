"""
Saved states of Gymnasium environments, restored into other instances of them (TRPO's vine sampling).

``copy.deepcopy`` is no snapshot for most simulators: MuJoCo, Box2D and ALE environments are ``EzPickle``, whose
copy is a *new* environment built from the constructor's arguments. A snapshot here is the state of every wrapper
and of the environment (their attributes, e.g. ``TimeLimit``'s step count or a goal drawn at reset), the simulator's
state by a handler that knows it, and the environment's random generator (so that every branch restored from one
snapshot draws the same environment noise). Handlers: a user environment's own ``get_vine_state()`` /
``set_vine_state(state)``; MuJoCo (``mj_copyData``, exact where ``set_state(qpos, qvel)`` is not, e.g. on Ant); ALE
(``cloneState(include_rng=True)``); and environments of plain Python objects. Anything else (Box2D's LunarLander, an
environment holding another environment, …) is refused.

The branch environments leave out the wrappers with effects outside the environment (SB3's ``Monitor``, video
recording, human rendering) and do not render: the branches' episodes are not the training run's.
"""

import copy
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.utils import EzPickle
from gymnasium.wrappers import HumanRendering, RecordVideo, RenderCollection
from stable_baselines3.common.monitor import Monitor

# Wrappers whose effects reach outside the environment (statistics, files, windows): not part of a branch
SKIPPED_WRAPPERS = (Monitor, RecordVideo, HumanRendering, RenderCollection)
# Attributes that are an object's structure or its rendering, not its state: never saved nor restored
KEPT_ATTRIBUTES = frozenset(
    {
        "env",
        "_action_space",
        "_observation_space",
        "action_space",
        "observation_space",
        "_metadata",
        "metadata",
        "_cached_spec",
        "spec",
        "_saved_kwargs",
        "_reward_range",
        "_ezpickle_args",
        "_ezpickle_kwargs",
        "render_mode",
        "screen",
        "clock",
        "isopen",
        "mujoco_renderer",
        "_np_random",
        "_np_random_seed",
    }
)
# Rendering objects (pygame's, MuJoCo's renderer): not copied into a branch environment, which does not render
RENDERING_ATTRIBUTES = ("screen", "clock", "mujoco_renderer", "viewer")
# The MuJoCo objects of a MujocoEnv, saved by mj_copyData (the data) or copied when a branch environment is made
MUJOCO_ATTRIBUTES = frozenset({"model", "data"})


class SnapshotError(TypeError):
    """An environment whose state vine sampling cannot save, copy or restore."""


def wrapper_chain(env: gym.Env) -> list[gym.Env]:
    """
    :param env: an environment, possibly wrapped
    :return: its wrappers from the outermost in, then the environment itself
    """
    chain = [env]
    while isinstance(chain[-1], gym.Wrapper):
        chain.append(chain[-1].env)
    return chain


def _branch_chain(env: gym.Env) -> list[gym.Env]:
    return [layer for layer in wrapper_chain(env) if not isinstance(layer, SKIPPED_WRAPPERS)]


def _state_attributes(obj: Any, chain: list[gym.Env], skipped: frozenset[str]) -> dict[str, Any]:
    """
    The attributes of a wrapper or an environment that make its state: all but its structure, its rendering,
    ``skipped`` and references to the members of its own chain (a wrapper's ``self.core = env.unwrapped`` must go on
    pointing into the branch's own chain).

    :raises SnapshotError: for an attribute holding another environment (a copy of it would be a new environment)
    """
    state = {}
    for key, value in vars(obj).items():
        if key in KEPT_ATTRIBUTES or key in skipped or any(value is layer for layer in chain):
            continue
        if isinstance(value, (gym.Env, EzPickle)):
            raise SnapshotError(
                f"{type(obj).__name__}.{key} holds an environment ({type(value).__name__}) whose state vine sampling "
                "cannot save: give the environment get_vine_state() and set_vine_state(state)"
            )
        state[key] = value
    return copy.deepcopy(state)


def _restore_attributes(obj: Any, state: dict[str, Any], chain: list[gym.Env], skipped: frozenset[str]) -> None:
    # Attributes a branch created since are removed: the object must be as saved
    for key, value in list(vars(obj).items()):
        if (
            key not in state
            and key not in KEPT_ATTRIBUTES
            and key not in skipped
            and not any(value is layer for layer in chain)
        ):
            delattr(obj, key)
    vars(obj).update(copy.deepcopy(state))


@dataclass
class _StateHandler:
    """How the state of one kind of environment is read and written, besides its attributes."""

    name: str
    skipped: frozenset[str]
    save: Callable[[Any], Any]
    restore: Callable[[Any, Any], None]
    # Whether the environment's attributes are saved besides (not when its own methods save everything)
    saves_attributes: bool = True
    # Made ready as a branch of another environment of its kind, beyond a copy (branch, original)
    prepare_branch: Callable[[Any, Any], None] | None = None


def _user_handler() -> _StateHandler:
    return _StateHandler(
        "get_vine_state/set_vine_state",
        frozenset(),
        lambda env: env.get_vine_state(),
        lambda env, state: env.set_vine_state(copy.deepcopy(state)),
        saves_attributes=False,
    )


def _mujoco_handler() -> _StateHandler:
    import mujoco

    def save(env: Any) -> Any:
        data = mujoco.MjData(env.model)
        mujoco.mj_copyData(data, env.model, env.data)
        return data

    def prepare_branch(branch: Any, original: Any) -> None:
        # The model as it is now: a constructor call would not reproduce one changed since
        branch.model = copy.copy(original.model)
        branch.data = mujoco.MjData(branch.model)

    return _StateHandler(
        "MuJoCo",
        MUJOCO_ATTRIBUTES,
        save,
        lambda env, data: mujoco.mj_copyData(env.data, env.model, data),
        prepare_branch=prepare_branch,
    )


def _ale_handler() -> _StateHandler:
    return _StateHandler(
        "ALE",
        frozenset({"ale"}),
        lambda env: env.ale.cloneState(include_rng=True),
        lambda env, state: env.ale.restoreState(state),
    )


def _plain_handler() -> _StateHandler:
    return _StateHandler("attributes", frozenset(), lambda env: None, lambda env, state: None)


def _is_instance_of(env: gym.Env, module: str, class_name: str) -> bool:
    # The simulators are optional dependencies: a class is only looked up if its module is already imported
    loaded = sys.modules.get(module)
    cls = getattr(loaded, class_name, None) if loaded is not None else None
    return cls is not None and isinstance(env, cls)


def state_handler(unwrapped: gym.Env) -> _StateHandler:
    """
    :param unwrapped: an environment without its wrappers
    :return: how to save and restore its state
    :raises SnapshotError: when no handler knows it
    """
    if callable(getattr(unwrapped, "get_vine_state", None)) and callable(getattr(unwrapped, "set_vine_state", None)):
        return _user_handler()
    if _is_instance_of(unwrapped, "gymnasium.envs.mujoco.mujoco_env", "MujocoEnv"):
        return _mujoco_handler()
    if _is_instance_of(unwrapped, "ale_py.env", "AtariEnv"):
        return _ale_handler()
    if not isinstance(unwrapped, EzPickle):
        return _plain_handler()
    raise SnapshotError(
        f"Cannot save the state of {type(unwrapped).__name__} for vine sampling: it is no MuJoCo, ALE or plain-Python "
        "environment (e.g. Box2D's, whose copies are new environments). Give it the methods get_vine_state() and "
        "set_vine_state(state), or use sampling='single_path'"
    )


@dataclass
class EnvSnapshot:
    """
    An environment's saved state.

    :param wrapper_states: the attributes of each wrapper of the branch chain, outermost first
    :param env_state: the attributes of the environment (none with the user's handler)
    :param simulator_state: what the environment's handler saved
    :param generator: a copy of the environment's random generator
    """

    wrapper_states: list[dict[str, Any]]
    env_state: dict[str, Any]
    simulator_state: Any
    generator: np.random.Generator


def snapshot_env(env: gym.Env) -> EnvSnapshot:
    """
    Save an environment's state (it is left unchanged).

    :param env: an environment of a ``DummyVecEnv``, with its wrappers
    :return: the snapshot
    :raises SnapshotError: when its state cannot be saved (:func:`state_handler`)
    """
    chain = _branch_chain(env)
    unwrapped = chain[-1]
    handler = state_handler(unwrapped)
    return EnvSnapshot(
        [_state_attributes(wrapper, chain, frozenset()) for wrapper in chain[:-1]],
        _state_attributes(unwrapped, chain, handler.skipped) if handler.saves_attributes else {},
        handler.save(unwrapped),
        copy.deepcopy(unwrapped.np_random),
    )


def make_branch_env(env: gym.Env) -> gym.Env:
    """
    An environment to restore snapshots of ``env`` into: its wrapper chain without the wrappers that act outside
    the environment (``SKIPPED_WRAPPERS``), not rendering, and for MuJoCo with a copy of ``env``'s model (which a
    constructor call would not reproduce if the model was changed since).

    :param env: an environment of a ``DummyVecEnv``, with its wrappers
    :return: the branch environment (in no particular state until a snapshot is restored into it)
    """
    # A skipped wrapper's copy is its inner environment's copy: the wrapper above it (if any) gets that in its place
    memo: dict[int, Any] = {}
    for layer in wrapper_chain(env):
        for key in RENDERING_ATTRIBUTES:
            if vars(layer).get(key) is not None:
                memo[id(vars(layer)[key])] = None
    for layer in reversed(wrapper_chain(env)):
        if isinstance(layer, SKIPPED_WRAPPERS):
            memo[id(layer)] = copy.deepcopy(layer.env, memo)
    branch = copy.deepcopy(env, memo)
    unwrapped = branch.unwrapped
    unwrapped.render_mode = None
    prepare_branch = state_handler(unwrapped).prepare_branch
    if prepare_branch is not None:
        prepare_branch(unwrapped, env.unwrapped)
    return branch


def restore_env(branch_env: gym.Env, snapshot: EnvSnapshot) -> None:
    """
    Put a branch environment in the saved state.

    :param branch_env: an environment from :func:`make_branch_env` of the environment the snapshot was taken of
    :param snapshot: the saved state (left unchanged: it can be restored again)
    """
    chain = wrapper_chain(branch_env)
    for wrapper, state in zip(chain[:-1], snapshot.wrapper_states, strict=True):
        _restore_attributes(wrapper, state, chain, frozenset())
    unwrapped = chain[-1]
    handler = state_handler(unwrapped)
    if handler.saves_attributes:
        _restore_attributes(unwrapped, snapshot.env_state, chain, handler.skipped)
    handler.restore(unwrapped, snapshot.simulator_state)
    unwrapped.np_random = copy.deepcopy(snapshot.generator)


def check_snapshots(env: gym.Env) -> None:
    """
    Save, copy and restore an environment once, so that one that vine sampling cannot branch from fails when the
    model is made rather than after its first rollout.

    :param env: an environment of a ``DummyVecEnv``, with its wrappers
    :raises SnapshotError: when one of the three fails, with the reason
    """
    try:
        restore_env(make_branch_env(env), snapshot_env(env))
    except SnapshotError:
        raise
    except Exception as error:
        raise SnapshotError(
            f"Vine sampling cannot save, copy and restore the state of {env}: {type(error).__name__}: {error}. Give "
            "the environment get_vine_state() and set_vine_state(state), or use sampling='single_path'"
        ) from error
