from sb3_trust.ppokl.policies import CnnPolicy, MlpPolicy, MultiInputPolicy
from sb3_trust.ppokl.ppokl import PPOKL, adapt_kl_coef

__all__ = ["PPOKL", "CnnPolicy", "MlpPolicy", "MultiInputPolicy", "adapt_kl_coef"]
