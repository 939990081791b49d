"""vAttention: verified sparse attention for LLM decoding."""
from .config import VAttentionConfig
from .decode import decode
from . import budget, key_summary, ops

__all__ = ["VAttentionConfig", "decode", "budget", "key_summary", "ops"]
__version__ = "0.1.0"
