"""What the model loaders share: the prompt's token ids and the recording of real attention.

`capturing(model, impl, recorder)` routes every attention call of a transformers model
through transformers' own `impl` attention ("sdpa", "eager", ...) and hands each call's
(module, query, key, value, out, scaling) to `recorder`; smollm2.py and gemma3.py build
their `capture_decode_attention` on it.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Callable, Optional

import torch

_CAPTURE_PREFIX = "vattention_capture_"
_recorder: Optional[Callable] = None


def token_ids(tokenizer, n_tokens: int, text: Optional[str], default_text: Callable[[int], str],
              chars_per_token: int) -> torch.Tensor:
    """The first ``n_tokens`` token ids of ``text``, or of ``default_text(chars)`` grown until
    it holds that many tokens (``chars_per_token`` is the first guess of its density)."""
    if text is not None:
        ids = tokenizer(text, return_tensors="pt").input_ids[0]
    else:
        chars = chars_per_token * n_tokens
        while True:
            ids = tokenizer(default_text(chars), return_tensors="pt").input_ids[0]
            if ids.numel() >= n_tokens:
                break
            chars *= 2
    if ids.numel() < n_tokens:
        raise ValueError(f"the text has {ids.numel()} tokens, {n_tokens} asked for")
    return ids[:n_tokens]


def absolute_indices(values, count: int, what: str, unit: str) -> list:
    """``values`` (negative ones count from the end) as indices into ``count`` items."""
    out = []
    for value in values:
        a = value + count if value < 0 else value
        if not 0 <= a < count:
            raise IndexError(f"{what} {value} out of range for {count} {unit}")
        out.append(a)
    return out


def to_f32(t: torch.Tensor) -> torch.Tensor:
    """A contiguous float32 CPU copy that owns its storage (safe to keep past the forward)."""
    return t.detach().to("cpu", torch.float32).clone(memory_format=torch.contiguous_format)


def _recording_attention(inner_name: str) -> Callable:
    """An attention function that runs transformers' ``inner_name`` attention and records each call."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        inner = ALL_ATTENTION_FUNCTIONS.get(inner_name)
        if inner is None:  # "eager" is not registered: each model file defines its own
            inner = sys.modules[type(module).__module__].eager_attention_forward
        out, weights = inner(module, query, key, value, attention_mask, *args, **kwargs)
        if _recorder is not None:
            scaling = kwargs.get("scaling")
            if scaling is None:
                scaling = args[0] if args else module.scaling
            _recorder(module, query, key, value, out, scaling)
        return out, weights

    return attention


@contextlib.contextmanager
def capturing(model, attn_implementation: str, recorder: Callable):
    """Route every attention call of ``model`` through ``attn_implementation``, recording each call."""
    global _recorder
    from transformers import AttentionInterface

    name = _CAPTURE_PREFIX + attn_implementation
    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, _recording_attention(attn_implementation))
        try:
            from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
        except ImportError:  # older transformers build masks without this registry
            pass
        else:
            # Without a registered mask function transformers builds no (causal) mask at all.
            mask = ALL_MASK_ATTENTION_FUNCTIONS[attn_implementation]
            ALL_MASK_ATTENTION_FUNCTIONS.register(name, mask)
    configs = {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}
    original = {k: c._attn_implementation for k, c in configs.items()}
    _recorder = recorder
    try:
        for c in configs.values():
            c._attn_implementation = name
        yield
    finally:
        _recorder = None
        for k, c in configs.items():
            c._attn_implementation = original[k]
