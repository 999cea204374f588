from sb3_trust.trpo.policies import CnnPolicy, MlpPolicy, MultiInputPolicy
from sb3_trust.trpo.trpo import TRPO

__all__ = ["TRPO", "CnnPolicy", "MlpPolicy", "MultiInputPolicy"]
