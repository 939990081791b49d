"""vattention as a Hugging Face transformers attention implementation: ``"vattention"``.

Importing this module registers the name with transformers' ``AttentionInterface`` (and
the matching mask function with ``ALL_MASK_ATTENTION_FUNCTIONS``), so that any model whose
attention modules dispatch through that interface (the Llama family: Llama, SmolLM2,
Mistral, Qwen2, ...) can run it::

    import vattention
    from vattention.integrations import transformers as vt

    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="vattention")
    vt.configure(model, vattention.VAttentionConfig(epsilon=0.05), seed=0)  # optional
    with vt.collect_stats(model) as stats:
        model.generate(**inputs, max_new_tokens=64)
    print(stats.summary())

What runs where:

- **Prefill** (any call whose query length is > 1) runs transformers' dense ``sdpa``
  attention, unchanged.
- **Decode steps** (query length 1) call ``vattention.decode`` directly on the KV-cache
  tensors ``[B, Hkv, N, D]`` (no repeat of K/V over GQA groups) with the module's own
  ``scaling`` and the layer's configuration.
- **Masks / padding**: a decode step's mask says which keys each row may see. Every row's
  visible keys must form one contiguous range ``[start, end)`` of the cache (no padding,
  right padding, a static cache's unused tail, left padding, a sliding window). Rows that
  all start at 0 go to one batched ``decode`` call with ``seq_lens = end``; when some row
  starts later (left padding), each row is decoded on its own view
  ``k[b, :, start:end]`` (no copy). Masks with holes, per-head masks that differ between
  heads, and additive float masks with values other than 0 / -inf are rejected with a
  ``ValueError``. The mask is read once on the host per forward pass (one small device to
  host copy per step on CUDA, shared by all layers), not once per layer.
- **Sliding-window layers stay dense**: a layer whose attention module says it is a
  sliding-window (or chunked) layer (``is_sliding``, a ``sliding_window`` attribute or
  argument, or ``config.layer_types[layer]`` naming sliding / chunked attention, e.g. five
  of every six Gemma-3 layers) always runs transformers' dense attention; only the global
  (full-attention) layers go through ``vattention.decode``. ``layer_configs`` shows them as
  ``None``; a mapping that names one with a config is an error.
- **Scaling**: the module's ``scaling`` (Gemma: ``query_pre_attn_scalar ** -0.5``, not
  ``head_dim ** -0.5``) is passed to ``decode`` as its ``scale``. GQA groups of any size
  and any head dim ``decode`` accepts (Gemma-3-270M: 4 query heads on 1 KV head, dim 256)
  go through unchanged.
- **Key summary** (``VAttentionConfig(selector="int4")`` or ``"int3_channel"``): each such
  layer keeps a ``vattention.key_summary.KeySummary`` of its cache's keys, built at the
  layer's first decode step after a prefill (from the whole cache) and updated in place
  with each token the cache appends (``update_key_summary``), then passed to ``decode(key_summary=...)``
  so a step scores the summary instead of reading K. A growing (dynamic) cache appends
  rows at its end; a fixed-size (static) cache writes row ``seq_len - 1`` of each batch
  row. A prefill drops the summary. Caches reordered in place between steps (beam search)
  are not tracked: call ``reset_summaries(model)`` after reordering.
- **Per-layer configuration**: ``configure(model, config, seed=...)`` takes one
  ``VAttentionConfig`` for every layer, a mapping ``{layer: entry}`` (layers not listed
  keep the default ``VAttentionConfig()``), a sequence with one entry per layer, or a
  callable ``layer -> entry``. An entry is a ``VAttentionConfig``, ``None`` (dense
  attention for that layer) or any object with a ``decode(q, k, v, seq_lens=, scale=,
  seed=, return_stats=)`` method of ``vattention.decode``'s contract (e.g. the
  matched-density baselines of ``vattention.baselines``).
- **Seeds**: with an int ``seed`` every sampled index is a function of ``(seed, layer,
  step)``: layer ``l`` calls ``decode`` with ``seed=(mix(seed, l), step)``, where ``step``
  counts that layer's decode steps since its last prefill (or since ``configure`` /
  ``reset_steps``), so the same prompt and seed give the same generation. Rows decoded
  one by one (left padding) mix their row index into the seed as well. ``seed=None``
  (default) draws from torch's generator: reproducible under ``torch.manual_seed``.
- **Stats**: ``collect_stats(model)`` records, for every decode step of every layer, the
  stats dict of ``vattention.decode`` (``budget``, ``density``, ``pilot``, ``exact``, ...:
  device tensors ``[B, Hq]``); see ``DecodeStats``.
- ``disable(model, "sdpa")`` switches back and forgets the per-layer state;
  ``layer_configs(model)`` shows what each layer runs; ``layer_seed(seed, layer, step)``
  is the seed pair a decode step passes to ``vattention.decode``.

Limits: only decode steps with a KV cache are sparse (``use_cache=False`` runs dense
prefill-style passes); attention dropout, logit softcapping (a ``softcap`` argument or the
module's ``attn_logit_softcapping``), attention sinks / ``s_aux`` and position biases are
rejected on decode steps of the layers that run vattention; reading the mask on the host makes the
step unsuitable for CUDA-graph capture or ``torch.compile(fullgraph=True)`` when a mask is
present (no padding and a dynamic cache: no mask, no host read), unless
``configure(..., cuda_graphs=True)``: then seeds and lengths stay on the device and
``DecodeGraph`` captures a whole decode step (every layer) on a static cache and replays it
with new tokens, seeds and lengths. The module needs only
transformers' public attention and mask interfaces; on CUDA it runs the extension's CUDA
kernels like ``vattention.decode`` itself does.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from statistics import median
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Union

import torch

from ..config import VAttentionConfig
from ..decode import MAX_RNG_OFFSET, decode as vattention_decode
from ..device import capturing
from .. import key_summary as _ks

from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

Tensor = torch.Tensor

NAME = "vattention"
_STATE_ATTR = "_vattention_state"
_MASK64 = (1 << 64) - 1
_DEFAULT = VAttentionConfig()
_SLIDING_TYPES = ("sliding_attention", "chunked_attention")

#: What a layer runs on decode steps: vAttention with a config, dense attention (None), or
#: a custom decode method (an object with vattention.decode's signature minus cfg).
LayerEntry = Any
LayerConfigs = Union[LayerEntry, Mapping[int, LayerEntry], Sequence[LayerEntry],
                     Callable[[int], LayerEntry]]


# --------------------------------------------------------------------------- registration

def register() -> None:
    """Registers ``"vattention"`` with transformers (idempotent; done on import)."""
    AttentionInterface.register(NAME, attention_forward)
    # Without a registered mask function transformers builds no causal mask at all. The
    # sdpa mask is a boolean [B, 1, q_len, kv_len] mask, or None when nothing is masked.
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)


# --------------------------------------------------------------------------- per-layer state

class _Shared:
    """State shared by all layers of one model: the seed, stats recorders, the mask cache."""

    def __init__(self, seed: Optional[int] = None, cuda_graphs: bool = False):
        self.seed = seed
        self.cuda_graphs = cuda_graphs
        self.recorders: List["DecodeStats"] = []
        self._mask_cache: Optional[tuple] = None
        self._lengths_cache: Optional[tuple] = None

    def device_lengths(self, mask: Optional[Tensor], batch: int, length: int) -> Optional[Tensor]:
        """cuda_graphs mode: each row's valid length from the mask, on the device (no host
        read, so a step can be captured). Every row must see a prefix [0, n) of the cache,
        as a static cache without padding gives; outside capture that is checked on the
        device (torch._assert_async)."""
        if mask is None:
            return None
        cached = self._lengths_cache
        # One analysis per forward pass; a reused mask buffer (DecodeGraph) bumps its version.
        key = (batch, length, _version(mask))
        if cached is not None and cached[0] is mask and cached[1] == key:
            return cached[2]
        valid, bias, heads_differ = _mask_keys(mask, batch, length)
        lengths = valid.sum(-1)
        if not capturing(mask.device):
            prefix = torch.arange(length, device=mask.device)[None, :] < lengths[:, None]
            torch._assert_async((valid == prefix).all() & ~bias & ~heads_differ,
                                "vattention (cuda_graphs=True): every row of a decode step must "
                                "see a prefix of the cache (no left padding, no holes), with one "
                                "mask for all heads and no additive bias")
        self._lengths_cache = (mask, key, lengths)
        return lengths

    def key_ranges(self, mask: Optional[Tensor], batch: int, length: int) -> "KeyRanges":
        if mask is None:
            return KeyRanges(None, None, None)
        cached = self._mask_cache
        # All layers of one forward pass get the same mask tensor: analyse it once.
        version = _version(mask)
        if (cached is not None and cached[0] is mask and cached[1] == version
                and cached[2] == (batch, length)):
            return cached[3]
        ranges = key_ranges(mask, batch, length)
        self._mask_cache = (mask, version, (batch, length), ranges)
        return ranges


def _version(t: Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter (and are never mutated)
        return -1


@dataclass
class _LayerState:
    shared: _Shared
    layer: int
    entry: LayerEntry
    step: int = 0
    # The int4 key summary of this layer's cache rows [0, summary_rows), with spare capacity
    # (rows beyond summary_rows are unwritten) so that appending a token copies nothing.
    summary: Optional[Any] = None
    summary_rows: int = 0
    # cuda_graphs mode: the [seed, step] pair of the next decode step as a device tensor,
    # advanced in place after each step, so that a captured step replays with new draws.
    rng: Optional[Tensor] = None

    def drop_summary(self) -> None:
        self.summary, self.summary_rows = None, 0

    def device_seed(self, device: torch.device) -> Optional[Tensor]:
        """cuda_graphs mode: this step's [seed, offset] device tensor (layer_seed's values),
        or None for torch's generator (whose CUDA draws are graph-safe already)."""
        if self.shared.seed is None:
            return None
        if self.rng is None or self.rng.device != device:
            if capturing(device):
                raise RuntimeError(
                    "vattention (cuda_graphs=True): run one decode step eagerly after each "
                    "prefill before capturing (it creates the layer's seed tensor and key "
                    "summary, which a graph must not re-create on every replay)")
            self.rng = torch.tensor(layer_seed(self.shared.seed, self.layer, self.step),
                                    dtype=torch.int64).to(device)
        return self.rng

    def seed_for_step(self) -> Optional[tuple]:
        """(seed, offset) of this decode step, or None (torch's generator); advances the step."""
        step = self.step
        self.step += 1
        if self.shared.seed is None:
            return None
        if step >= MAX_RNG_OFFSET:
            raise RuntimeError(f"vattention: layer {self.layer} ran {step} decode steps since its "
                               f"last prefill; seeds cover 2^30 steps (call reset_steps(model))")
        return layer_seed(self.shared.seed, self.layer, step)


def layer_seed(seed: int, layer: int, step: int, row: Optional[int] = None) -> tuple:
    """The ``(seed, offset)`` pair that decode step ``step`` of ``layer`` passes to decode.

    ``row``: the batch row, for rows decoded one at a time (left-padded batches).
    """
    layer_key = _mix(seed, layer)
    return (layer_key if row is None else _mix(layer_key, row), step)


def _mix(seed: int, value: int) -> int:
    """A 63-bit hash of (seed, value) (splitmix64): one independent Philox key per layer/row."""
    x = (seed * 0x9E3779B97F4A7C15 + value + 1) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) & ((1 << 63) - 1)


def _attention_modules(model: torch.nn.Module) -> Dict[int, torch.nn.Module]:
    """The model's attention modules by layer index (modules with layer_idx and scaling)."""
    found: Dict[int, torch.nn.Module] = {}
    for module in model.modules():
        layer = getattr(module, "layer_idx", None)
        if isinstance(layer, int) and hasattr(module, "scaling") and hasattr(module, "config"):
            if layer in found and found[layer] is not module:
                raise ValueError(f"vattention: two attention modules claim layer_idx {layer} "
                                 f"({type(found[layer]).__name__}, {type(module).__name__})")
            found[layer] = module
    if not found:
        raise TypeError(f"vattention: {type(model).__name__} has no attention modules with a "
                        f"layer_idx and scaling; the integration supports transformers models "
                        f"whose attention dispatches through AttentionInterface (Llama family)")
    return dict(sorted(found.items()))


def is_sliding(module: torch.nn.Module) -> bool:
    """True for a sliding-window or chunked attention layer (these stay dense)."""
    if getattr(module, "is_sliding", False) or getattr(module, "sliding_window", None):
        return True
    config = getattr(module, "config", None)
    types = getattr(config, "layer_types", None)
    layer = getattr(module, "layer_idx", None)
    if types is not None and isinstance(layer, int) and 0 <= layer < len(types):
        return types[layer] in _SLIDING_TYPES
    return False


def _default_entry(module: torch.nn.Module) -> LayerEntry:
    return None if is_sliding(module) else _DEFAULT


def _layer_state(module: torch.nn.Module) -> _LayerState:
    state = getattr(module, _STATE_ATTR, None)
    if state is None:  # attn_implementation="vattention" without configure(): the defaults
        state = _LayerState(_Shared(), int(module.layer_idx), _default_entry(module))
        setattr(module, _STATE_ATTR, state)
    return state


def _attach(model: torch.nn.Module) -> Dict[int, _LayerState]:
    """Every attention module's state, all pointing at one _Shared (created when missing)."""
    modules = _attention_modules(model)
    states = {layer: getattr(m, _STATE_ATTR, None) for layer, m in modules.items()}
    shared = next((s.shared for s in states.values() if s is not None), None) or _Shared()
    for layer, module in modules.items():
        if states[layer] is None:
            states[layer] = _LayerState(shared, layer, _default_entry(module))
            setattr(module, _STATE_ATTR, states[layer])
        states[layer].shared = shared
    return states


# --------------------------------------------------------------------------- configuration

def _check_entry(entry: LayerEntry, where: str) -> LayerEntry:
    if entry is None or isinstance(entry, VAttentionConfig):
        return entry
    if callable(getattr(entry, "decode", None)):
        return entry
    raise TypeError(f"vattention: {where} must be a VAttentionConfig, None (dense attention) or "
                    f"an object with a decode(q, k, v, seq_lens=, scale=, seed=, return_stats=) "
                    f"method, got {type(entry).__name__} {entry!r}")


def _resolve(config: LayerConfigs, layers: Sequence[int]) -> Dict[int, LayerEntry]:
    n = len(layers)
    if config is None or isinstance(config, VAttentionConfig) or callable(
            getattr(config, "decode", None)):
        return {layer: config for layer in layers}
    if isinstance(config, Mapping):
        entries = {layer: _DEFAULT for layer in layers}
        for key, entry in config.items():
            if isinstance(key, bool) or not isinstance(key, int):
                raise TypeError(f"vattention: per-layer config keys must be int layer indices, "
                                f"got {key!r}")
            if not -n <= key < n:
                raise ValueError(f"vattention: per-layer config names layer {key}, but the model "
                                 f"has {n} layers (0..{n - 1})")
            entries[layers[key]] = _check_entry(entry, f"the config of layer {key}")
        return entries
    if isinstance(config, (list, tuple)):
        if len(config) != n:
            raise ValueError(f"vattention: a per-layer config sequence needs one entry per layer "
                             f"({n}), got {len(config)}")
        return {layer: _check_entry(e, f"the config of layer {layer}")
                for layer, e in zip(layers, config)}
    if callable(config):
        return {layer: _check_entry(config(layer), f"config({layer})") for layer in layers}
    raise TypeError(f"vattention: config must be a VAttentionConfig, None (dense), a mapping "
                    f"layer -> config, a sequence of per-layer configs or a callable "
                    f"layer -> config, got {type(config).__name__} {config!r}")


def configure(model: torch.nn.Module, config: LayerConfigs = _DEFAULT, *,
              seed: Optional[int] = None, cuda_graphs: bool = False) -> torch.nn.Module:
    """Switches ``model`` to ``attn_implementation="vattention"`` and sets what each layer runs.

    config: a ``VAttentionConfig`` for every layer (default ``VAttentionConfig()``), ``None``
        (dense attention everywhere), a mapping ``{layer: entry}`` (negative indices count
        from the end; layers not listed run ``VAttentionConfig()``), a sequence of one entry
        per layer, or a callable ``layer -> entry``. An entry is a ``VAttentionConfig``,
        ``None`` (dense) or an object with a ``decode`` method like ``vattention.decode``'s.
    seed: ``None`` (torch's generator) or an int in [0, 2^63): every sample is then a
        function of ``(seed, layer, step)``.
    cuda_graphs: decode steps read nothing on the host, so that a whole step can be captured
        in a CUDA graph and replayed (see ``DecodeGraph``): the seed pair lives in a device
        tensor per layer, advanced in place, and each row's length comes from the mask on the
        device. Rows must then see a prefix of the cache (a static cache, no left padding),
        and stats cannot be collected inside a captured step. The draws are the same as
        without it.

    Resets every layer's step counter. Returns the model.
    """
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)
                             or not 0 <= seed < 2 ** 63):
        raise ValueError(f"vattention: seed must be None or an int in [0, 2^63), got {seed!r}")
    modules = _attention_modules(model)
    entries = _resolve(config, list(modules))
    if isinstance(config, Mapping):
        for key, entry in config.items():
            layer = list(modules)[key]
            if entry is not None and is_sliding(modules[layer]):
                raise ValueError(f"vattention: layer {key} is a sliding-window layer, which "
                                 f"always runs dense attention; give it None or leave it out")
    for layer, module in modules.items():
        if is_sliding(module):
            entries[layer] = None  # the window is short: dense is what it should run
    old = [getattr(m, _STATE_ATTR, None) for m in modules.values()]
    shared = _Shared(seed, cuda_graphs)
    # Recorders of a collect_stats block in progress keep recording.
    for state in old:
        if state is not None:
            shared.recorders = state.shared.recorders
            break
    for layer, module in modules.items():
        setattr(module, _STATE_ATTR, _LayerState(shared, layer, entries[layer]))
    _enable(model)
    return model


def _enable(model: torch.nn.Module) -> None:
    if getattr(model.config, "_attn_implementation", None) == NAME:
        return
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(NAME)
    if getattr(model.config, "_attn_implementation", None) != NAME:
        # Older transformers, or a model that refuses dynamic switching: set every config.
        for module in model.modules():
            cfg = getattr(module, "config", None)
            if cfg is not None and hasattr(cfg, "_attn_implementation"):
                cfg._attn_implementation = NAME


def disable(model: torch.nn.Module, attn_implementation: str = "sdpa") -> torch.nn.Module:
    """Switches ``model`` back to ``attn_implementation`` and forgets its vattention state."""
    for module in _attention_modules(model).values():
        if hasattr(module, _STATE_ATTR):
            delattr(module, _STATE_ATTR)
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(attn_implementation)
    else:
        for module in model.modules():
            cfg = getattr(module, "config", None)
            if cfg is not None and hasattr(cfg, "_attn_implementation"):
                cfg._attn_implementation = attn_implementation
    return model


def layer_configs(model: torch.nn.Module) -> Dict[int, LayerEntry]:
    """What each layer runs on decode steps (a VAttentionConfig, None for dense, or a method)."""
    return {layer: state.entry for layer, state in _attach(model).items()}


def reset_steps(model: torch.nn.Module) -> None:
    """Restarts every layer's step counter (the seed offset) at 0."""
    for state in _attach(model).values():
        state.step = 0
        if state.rng is not None:
            state.rng[1:].zero_()  # in place: a captured graph keeps reading this tensor


def reset_summaries(model: torch.nn.Module) -> None:
    """Drops every layer's key summary; the next decode step rebuilds it from the cache."""
    for state in _attach(model).values():
        state.drop_summary()


def key_summary(model: torch.nn.Module, layer: int):
    """The ``KeySummary`` layer ``layer`` keeps (cut to the cache rows it covers), or None."""
    state = _attach(model)[layer]
    if state.summary is None:
        return None
    return _rows(state.summary, 0, state.summary_rows)


# --------------------------------------------------------------------------- masks

@dataclass(frozen=True)
class KeyRanges:
    """Which cache positions each row of a decode step may attend to.

    ``starts is None``: every row's keys are the prefix ``[0, seq_lens[b])`` (``seq_lens``
    None: all ``N``). Otherwise row ``b`` sees ``[starts[b], ends[b])`` (host ints).
    """

    seq_lens: Optional[Tensor]
    starts: Optional[List[int]]
    ends: Optional[List[int]]


def _mask_keys(mask, batch: int, length: int):
    """A decode step's 4D mask ([B or 1, H or 1, 1, N], bool True = attend, or additive float
    0 = attend, -inf / the dtype's min = masked) read on its device, nothing on the host:
    (visible [batch, length] bool of the first head, additive-bias flag, heads-differ flag;
    the flags 0-dim bool tensors). Raises a ValueError on any other shape or dtype."""
    if not isinstance(mask, Tensor) or mask.dim() != 4:
        got = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"vattention: the attention mask of a decode step must be a 4D tensor "
                         f"[batch, heads, 1, kv_length] or None, got {got}")
    if mask.shape[-1] < length or mask.shape[0] not in (1, batch):
        raise ValueError(f"vattention: the attention mask {tuple(mask.shape)} does not cover "
                         f"batch {batch} x {length} keys")
    last = mask[:, :, -1, :length]
    if mask.dtype == torch.bool:
        valid = last
        bias = torch.zeros((), dtype=torch.bool, device=mask.device)
    elif mask.is_floating_point():
        valid = last == 0
        bias = ((last != 0) & (last > torch.finfo(last.dtype).min / 2)).any()
    else:
        raise ValueError(f"vattention: attention masks must be bool or float, got {mask.dtype}")
    heads_differ = (valid != valid[:, :1]).any()
    return valid[:, 0].expand(batch, length), bias, heads_differ


def key_ranges(mask: Optional[Tensor], batch: int, length: int) -> KeyRanges:
    """The valid key range of each row from a decode step's 4D mask ([B or 1, H or 1, 1, N]).

    Boolean masks (True = attend) and additive float masks (0 = attend, -inf or the dtype's
    min = masked) are accepted; each row's visible keys must be one contiguous range.
    """
    if mask is None:
        return KeyRanges(None, None, None)
    valid, bias, heads_differ = _mask_keys(mask, batch, length)
    counts = valid.sum(-1)
    positions = torch.arange(length, device=mask.device)
    first = torch.where(valid, positions, length).amin(-1)
    final = torch.where(valid, positions, -1).amax(-1)
    holes = ((counts > 0) & (final - first + 1 != counts)).any()
    host = torch.cat([counts, first, torch.stack([holes, heads_differ, bias]).long()]).cpu()
    counts_h, first_h = host[:batch], host[batch:2 * batch]
    holes_h, heads_h, bias_h = (bool(x) for x in host[2 * batch:])
    if bias_h:
        raise ValueError("vattention: additive attention biases (mask values other than 0 and "
                         "-inf) are not supported on decode steps")
    if heads_h:
        raise ValueError("vattention: per-head attention masks that differ between heads are "
                         "not supported on decode steps")
    if holes_h:
        raise ValueError("vattention: every row of a decode step must see one contiguous range "
                         "of keys (padding on the left or right, a sliding window); this mask "
                         "has holes (e.g. padding inside the sequence)")
    starts = torch.where(counts_h > 0, first_h, torch.zeros_like(first_h))
    ends = starts + counts_h
    if bool((starts == 0).all()):
        return KeyRanges(None if bool((ends == length).all()) else ends, None, None)
    return KeyRanges(None, starts.tolist(), ends.tolist())


# --------------------------------------------------------------------------- attention

def _rows(summary, begin: int, end: int, batch: Optional[int] = None):
    """Rows [begin, end) of a summary (of batch row ``batch`` alone when given): views.
    None for an int3_channel summary cut inside a block (its blocks start at multiples of
    64): decode then builds one from those keys."""
    b = slice(None) if batch is None else slice(batch, batch + 1)
    if summary.format == "int3_channel":
        if begin % _ks.CHANNEL_BLOCK:
            return None
        blocks = slice(begin // _ks.CHANNEL_BLOCK, _param_rows(summary, end))
        return _ks.KeySummary(summary.codes[b, :, begin:end], summary.params[b, :, blocks],
                              summary.format)
    return _ks.KeySummary(summary.codes[b, :, begin:end], summary.params[b, :, begin:end])


def _param_rows(summary, rows: int) -> int:
    """Rows of summary.params that describe its first ``rows`` tokens."""
    if summary.format == "int3_channel":
        return -(-rows // _ks.CHANNEL_BLOCK)
    return rows


def _uses_summary(entry: LayerEntry) -> bool:
    return isinstance(entry, VAttentionConfig) and entry.selector in _ks.FORMATS


def _sync_summary(state: _LayerState, key: Tensor, seq_lens: Optional[Tensor]):
    """Brings the layer's key summary in step with the cache ``key`` [B, Hkv, N, D]."""
    batch, kv_heads, length, dim = key.shape
    summary = state.summary
    if summary is not None and (summary.codes.shape[:2] != (batch, kv_heads)
                                or summary.head_dim != dim
                                or summary.codes.device != key.device
                                or length < state.summary_rows):
        state.drop_summary()  # another cache: start again from its contents
        summary = None
    fmt = state.entry.selector
    if summary is not None and summary.format != fmt:
        state.drop_summary()
        summary = None
    if summary is None:
        # Spare rows for the tokens decode will append, so appending copies nothing.
        capacity = length + max(256, length // 4)
        summary = _ks.empty_key_summary(batch, kv_heads, capacity, dim, device=key.device,
                                        format=fmt)
        if fmt == "int3_channel":
            # Rows beyond a row's length (a fixed-size cache) stay out of its blocks.
            fresh = _ks.build_key_summary(key, fmt, seq_lens)
            summary.codes[:, :, :length] = fresh.codes
            summary.params[:, :, :fresh.params.shape[2]] = fresh.params
        else:
            _ks.update_key_summary(summary, key, 0)
        state.summary, state.summary_rows = summary, length
    elif length > state.summary_rows:
        if length > summary.length:
            grown = _ks.empty_key_summary(batch, kv_heads, length + max(256, length // 4), dim,
                                          device=key.device, format=fmt)
            rows, params = state.summary_rows, _param_rows(summary, state.summary_rows)
            grown.codes[:, :, :rows] = summary.codes[:, :, :rows]
            grown.params[:, :, :params] = summary.params[:, :, :params]
            summary = state.summary = grown
        _ks.update_key_summary(summary, key[:, :, state.summary_rows:], state.summary_rows,
                               k_cache=key)
        state.summary_rows = length
    else:
        # A fixed-size cache: this step wrote row seq_len - 1 of every batch row.
        ends = (torch.full((batch,), length, dtype=torch.int64, device=key.device)
                if seq_lens is None else seq_lens.to(torch.int64))
        last = (ends - 1).clamp_min(0)
        new = key.gather(2, last.view(batch, 1, 1, 1).expand(batch, kv_heads, 1, dim))
        _ks.update_key_summary(summary, new, last, k_cache=key)
    return _rows(summary, 0, length)


def _run(entry: LayerEntry, q: Tensor, k: Tensor, v: Tensor, seq_lens, scale, seed,
         return_stats: bool, summary=None):
    if isinstance(entry, VAttentionConfig):
        extra = {} if summary is None else {"key_summary": summary}
        return vattention_decode(q, k, v, entry, seq_lens=seq_lens, scale=scale, seed=seed,
                                 return_stats=return_stats, **extra)
    return entry.decode(q, k, v, seq_lens=seq_lens, scale=scale, seed=seed,
                        return_stats=return_stats)


def _cat_stats(parts: List[Dict[str, Tensor]], starts: List[int]) -> Dict[str, Tensor]:
    """Per-row stats dicts -> one dict; heavy indices shifted back to cache positions."""
    out = {}
    for name in parts[0]:
        values = []
        for part, start in zip(parts, starts):
            value = part[name]
            if name == "heavy_indices":
                value = torch.where(value >= 0, value + start, value)
            values.append(value)
        out[name] = _pad_cat(values, dim=0)
    return out


def _pad_cat(values: List[Tensor], dim: int) -> Tensor:
    """torch.cat along dim, padding the last dim to a common width (-1 / nan)."""
    width = max(v.shape[-1] for v in values) if values[0].dim() else 0
    padded = []
    for v in values:
        if v.dim() and v.shape[-1] < width:
            fill = float("nan") if v.is_floating_point() else -1
            v = torch.nn.functional.pad(v, (0, width - v.shape[-1]), value=fill)
        padded.append(v)
    return torch.cat(padded, dim=dim)


def attention_forward(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                      attention_mask: Optional[Tensor], dropout: float = 0.0,
                      scaling: Optional[float] = None, is_causal: Optional[bool] = None,
                      **kwargs):
    """The registered attention function: dense sdpa on prefill, vattention.decode on decode.

    query [B, Hq, T, D]; key/value [B, Hkv, N, D] (the whole cache); returns
    ([B, T, Hq, D], None) like transformers' own attention functions.
    """
    state = _layer_state(module)
    if query.shape[2] != 1 or state.entry is None or kwargs.get("sliding_window"):
        if query.shape[2] != 1:
            state.step = 0  # a new prompt: seeds restart at step 0
            if state.rng is not None:
                state.rng[1:].zero_()
            state.drop_summary()  # and a new cache (or new rows): rebuilt at the next step
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    if module.training and dropout > 0:
        raise NotImplementedError("vattention: attention dropout is not supported on decode "
                                  "steps (call model.eval())")
    for name in ("softcap", "s_aux", "sinks", "position_bias"):
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"vattention: the model passes {name!r} to attention; "
                                      f"only plain softmax attention (Llama family) is supported")
    if getattr(module, "attn_logit_softcapping", None) is not None:
        raise NotImplementedError("vattention: this layer soft-caps its attention logits "
                                  "(attn_logit_softcapping); vattention's estimator assumes "
                                  "plain softmax attention: configure the layer as None (dense)")
    if kwargs.get("output_attentions"):
        warnings.warn("vattention: attention weights are not returned on decode steps",
                      stacklevel=2)
    if scaling is None:
        scaling = getattr(module, "scaling", None)
    batch, length = query.shape[0], key.shape[2]
    q = query[:, :, 0]
    recording = bool(state.shared.recorders)
    if state.shared.cuda_graphs:
        return _graph_step(state, q, key, value, attention_mask, scaling, recording, query.dtype)
    ranges = state.shared.key_ranges(attention_mask, batch, length)
    seed = state.seed_for_step()
    summary = None
    if _uses_summary(state.entry):
        ends = (ranges.seq_lens if ranges.starts is None
                else torch.tensor(ranges.ends, dtype=torch.int64, device=key.device))
        summary = _sync_summary(state, key, ends)
    if ranges.starts is None:
        result = _run(state.entry, q, key, value, ranges.seq_lens, scaling, seed, recording,
                      summary)
        out, stats = result if recording else (result, None)
    else:
        outs, parts = [], []
        for b, (start, end) in enumerate(zip(ranges.starts, ranges.ends)):
            row_seed = None if seed is None else (_mix(seed[0], b), seed[1])  # layer_seed(row=b)
            result = _run(state.entry, q[b:b + 1], key[b:b + 1, :, start:],
                          value[b:b + 1, :, start:],
                          torch.tensor([end - start], dtype=torch.int64), scaling, row_seed,
                          recording,
                          None if summary is None else _rows(summary, start, length, b))
            out_b, stats_b = result if recording else (result, None)
            outs.append(out_b)
            parts.append(stats_b)
        out = torch.cat(outs, dim=0)
        stats = _cat_stats(parts, ranges.starts) if recording else None
    return _step_output(state, out, stats, query.dtype)


def _step_output(state: _LayerState, out: Tensor, stats, dtype):
    """What attention returns for a decode step ([B, 1, Hq, D] in the query's dtype, None),
    after giving the step's stats (None when nothing records) to every recorder."""
    if stats is not None:
        for recorder in state.shared.recorders:
            recorder.record(state.layer, stats)
    return out.to(dtype).unsqueeze(1), None


def _graph_step(state: _LayerState, q: Tensor, key: Tensor, value: Tensor,
                attention_mask: Optional[Tensor], scaling, recording: bool, dtype):
    """A decode step of configure(cuda_graphs=True): the same decode call with its seed and
    lengths on the device, nothing read on the host."""
    if recording and capturing(q.device):
        raise RuntimeError("vattention: collect_stats cannot record inside a captured CUDA "
                           "graph (its stats would be overwritten by every replay)")
    seq_lens = state.shared.device_lengths(attention_mask, q.shape[0], key.shape[2])
    seed = state.device_seed(key.device)
    state.step += 1
    summary = _sync_summary(state, key, seq_lens) if _uses_summary(state.entry) else None
    result = _run(state.entry, q, key, value, seq_lens, scaling, seed, recording, summary)
    if seed is not None:
        seed[1:].add_(1)  # after the samplers read it, on the same stream
    out, stats = result if recording else (result, None)
    return _step_output(state, out, stats, dtype)


class DecodeGraph:
    """One decode step of a whole model (every layer) as a replayable unit: static input
    buffers, a static cache, and on CUDA a captured graph.

        vt.configure(model, VAttentionConfig(epsilon=0.05), seed=0, cuda_graphs=True)
        graph = vt.DecodeGraph(model, cache, batch=B)     # cache: a filled StaticCache
        logits = graph.step(next_tokens, position)        # [B, vocab]; replays on CUDA

    ``cache`` is a ``transformers.StaticCache`` holding the prompt (rows [0, position) of
    every batch row). ``step(tokens [B], position)`` writes the token at cache row
    ``position`` (an int, or a device int64 tensor [1] for a fully device-side loop), runs
    the model on it and returns the last-token logits (a fresh tensor). The first call runs
    eagerly (it creates the per-layer seeds and key summaries), the second captures the
    graph on CUDA, every later call only updates the buffers in place and replays. On the
    CPU every call runs eagerly through the same buffers: the same computation, so CPU
    tests check what a GPU replays (``capture=False`` runs every step eagerly on CUDA too).
    The mask is a 4D bool buffer passed to the model as a
    prepared mask, so transformers builds none and reads nothing on the host. Models
    whose layers need different masks (sliding windows) are not supported.
    """

    def __init__(self, model: torch.nn.Module, cache, batch: int, capture: bool = True):
        state = next(iter(_attach(model).values()), None)
        if state is None or not state.shared.cuda_graphs:
            raise ValueError("vattention: DecodeGraph needs configure(model, ..., "
                             "cuda_graphs=True) first")
        if any(t in _SLIDING_TYPES for t in getattr(model.config, "layer_types", None) or ()):
            raise ValueError("vattention: DecodeGraph supports models with one mask for every "
                             "layer; this model has sliding-window layers")
        self.model, self.cache = model, cache
        device = next(model.parameters()).device
        self.device = device
        length = (cache.get_max_length() if hasattr(cache, "get_max_length")
                  else cache.max_cache_len)
        if not isinstance(length, int) or length <= 0:
            raise ValueError("vattention: DecodeGraph needs a fixed-size cache "
                             "(transformers.StaticCache)")
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.position_ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.mask = torch.zeros(batch, 1, 1, length, dtype=torch.bool, device=device)
        self._arange = torch.arange(length, device=device)
        self.logits: Optional[Tensor] = None
        self.graph = None
        self.capture = capture and device.type == "cuda"   # False: every step eager
        self.calls = 0

    def _set_inputs(self, tokens: Tensor, position) -> None:
        self.ids.copy_(tokens.reshape(-1, 1))
        if isinstance(position, Tensor):
            self.position.copy_(position.reshape(1))
        else:
            self.position.fill_(int(position))
        self.position_ids.copy_(self.position.expand_as(self.position_ids))
        self.mask.copy_(torch.le(self._arange, self.position).expand_as(self.mask))

    def _forward(self) -> Tensor:
        out = self.model(input_ids=self.ids, position_ids=self.position_ids,
                         cache_position=self.position, past_key_values=self.cache,
                         attention_mask=self.mask, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1]

    def step(self, tokens: Tensor, position) -> Tensor:
        """Logits [B, vocab] of the token at cache row `position` (see the class)."""
        with torch.no_grad():
            self._set_inputs(tokens.to(self.device), position)
            self.calls += 1
            if not self.capture or self.calls == 1:
                return self._forward().clone()
            if self.graph is None:
                # Capture replays what it records: undo nothing, the captured step IS this
                # call's step (its cache row and seeds are this call's).
                torch.cuda.synchronize(self.device)
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph):
                    self.logits = self._forward()
            self.graph.replay()
            return self.logits.clone()


# --------------------------------------------------------------------------- stats

class DecodeStats:
    """Stats of every decode step of every layer run inside ``collect_stats``.

    ``layers[layer]`` is a list with one dict per decode step (the stats dict of
    ``vattention.decode``: device tensors ``[B, Hq]``, ``heavy_indices`` ``[B, lists, k]``).
    Dense layers (config None) record nothing.
    """

    def __init__(self, keys: Optional[Sequence[str]] = None):
        self.keys = None if keys is None else tuple(keys)
        self.layers: Dict[int, List[Dict[str, Tensor]]] = {}

    def record(self, layer: int, stats: Dict[str, Tensor]) -> None:
        if stats is None:
            return
        kept = {name: value.detach() for name, value in stats.items()
                if self.keys is None or name in self.keys}
        self.layers.setdefault(layer, []).append(kept)

    def steps(self, layer: int) -> int:
        return len(self.layers.get(layer, ()))

    def stack(self, name: str, layer: Optional[int] = None):
        """``name`` over steps: a tensor ``[steps, ...]`` for one layer, else {layer: tensor}."""
        if layer is None:
            return {lay: self.stack(name, lay) for lay in self.layers}
        steps = self.layers.get(layer)
        if not steps:
            raise KeyError(f"vattention: no decode steps recorded for layer {layer}")
        return _pad_cat([s[name][None] for s in steps], dim=0)

    def summary(self) -> Dict[int, Dict[str, float]]:
        """Per layer: steps, mean density, budget per head (min / median / max), exact share."""
        result = {}
        for layer, steps in self.layers.items():
            row: Dict[str, float] = {"steps": len(steps)}
            if "density" in steps[0]:
                row["density"] = float(self.stack("density", layer).double().mean())
            if "budget" in steps[0]:
                budget = self.stack("budget", layer).double().flatten().tolist()
                row.update(budget_min=min(budget), budget_median=median(budget),
                           budget_max=max(budget))
            if "exact" in steps[0]:
                row["exact"] = float(self.stack("exact", layer).double().mean())
            result[layer] = row
        return result


@contextlib.contextmanager
def collect_stats(model: torch.nn.Module, keys: Optional[Sequence[str]] = None
                  ) -> Iterator[DecodeStats]:
    """Records the decode stats of every layer while the block runs (see DecodeStats).

    keys: only these stats (default all). Asking for stats makes every decode call also
    compute them (a little extra work per step).
    """
    states = _attach(model)
    shared = next(iter(states.values())).shared
    recorder = DecodeStats(keys)
    shared.recorders.append(recorder)
    try:
        yield recorder
    finally:
        # configure() inside the block may have replaced the shared state.
        for state in _attach(model).values():
            if recorder in state.shared.recorders:
                state.shared.recorders.remove(recorder)
                break


register()
