"""A GGUF file through transformers' GGUF loader, as a plain float32 model (shared by the
Gemma-3 conversion and the SmolLM2 HF export)."""
from __future__ import annotations

import contextlib
import pathlib
from typing import Callable, ContextManager

import torch


def load_float32(path: pathlib.Path,
                 parse_guard: Callable[[], ContextManager] = contextlib.nullcontext):
    """(model, tokenizer) from the GGUF at `path`, float32 (the exact de-quantised values),
    offline. The de-quantised weights are plain tensors, so the quantisation marks are
    removed: save_pretrained refuses a model that looks quantised, and a reload would look
    for the GGUF file. parse_guard() wraps the two loads (e.g. one parse of a big file)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    common = dict(gguf_file=path.name, local_files_only=True)
    with parse_guard():
        tokenizer = AutoTokenizer.from_pretrained(path.parent, **common)
        model = AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32, **common)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        with contextlib.suppress(AttributeError):
            model.is_quantized = False
    return model, tokenizer
