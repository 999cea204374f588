"""Trust-region policy optimisation for Stable-Baselines3."""

import os

from sb3_trust.acktr import ACKTR
from sb3_trust.npg import NPG
from sb3_trust.ppokl import PPOKL
from sb3_trust.trpo import TRPO

with open(os.path.join(os.path.dirname(__file__), "version.txt")) as file_handler:
    __version__ = file_handler.read().strip()

__all__ = ["ACKTR", "NPG", "PPOKL", "TRPO", "__version__"]
