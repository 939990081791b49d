"""vAttention: verified sparse attention for LLM decoding."""
from .config import VAttentionConfig
from .decode import decode
from . import budget, ops

__all__ = ["VAttentionConfig", "decode", "budget", "ops"]
__version__ = "0.1.0"
