"""Capture of real SmolLM2 decode attention (needs the ``models`` extra, see README)."""

import pytest
import torch

from tests.helpers import requires_model
from vattention.models import smollm2

pytestmark = [pytest.mark.model, requires_model]

N_TOKENS = 2048
POSITIONS = (-1, 1000)
LAYERS = (0, 1, 15, 29)


@pytest.fixture(scope="module")
def records():
    return smollm2.capture_decode_attention(N_TOKENS, positions=POSITIONS, layers=LAYERS)


def _reference_output(rec):
    """softmax(scale * q k^T) v in float64, with k/v repeated over each GQA group."""
    q, k, v = rec["q"].double(), rec["k"].double(), rec["v"].double()
    group = q.shape[0] // k.shape[0]
    k = k.repeat_interleave(group, dim=0)
    v = v.repeat_interleave(group, dim=0)
    logits = rec["scale"] * torch.einsum("hd,hnd->hn", q, k)
    return torch.einsum("hn,hnd->hd", torch.softmax(logits, dim=-1), v)


def test_model_config():
    model, tokenizer = smollm2.load_smollm2()
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 9, 3)
    assert cfg.hidden_size // cfg.num_attention_heads == 64
    assert not model.training
    assert smollm2.load_smollm2(torch.float32, "eager") is smollm2.load_smollm2()


def test_shapes(records):
    assert [(r["layer"], r["position"]) for r in records] == [
        (layer, p) for layer in LAYERS for p in (N_TOKENS - 1, 1000)
    ]
    for r in records:
        p = r["position"]
        assert r["q"].shape == (9, 64)
        assert r["k"].shape == (3, p + 1, 64)
        assert r["v"].shape == (3, p + 1, 64)
        assert r["out"].shape == (9, 64)
        assert r["scale"] == pytest.approx(64**-0.5)
        for name in ("q", "k", "v", "out"):
            t = r[name]
            assert t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous()
            assert torch.isfinite(t).all()


def test_softmax_of_captured_qkv_matches_model_output(records):
    for r in records:
        expected = _reference_output(r)
        got = r["out"].double()
        rel = (got - expected).norm() / expected.norm()
        assert rel < 1e-4, (r["layer"], r["position"], rel.item())


def test_attention_is_not_trivial(records):
    # Real decode attention: no head is uniform, and some head is peaked.
    peaks = []
    for r in records:
        q, k = r["q"].double(), r["k"].double().repeat_interleave(3, dim=0)
        probs = torch.softmax(r["scale"] * torch.einsum("hd,hnd->hn", q, k), dim=-1)
        peaks.append(probs.max(dim=-1).values)
    peaks = torch.cat(peaks)
    assert peaks.max() > 0.3
    assert peaks.min() > 2.0 / N_TOKENS


def test_capture_is_deterministic_and_copies(records):
    again = smollm2.capture_decode_attention(N_TOKENS, positions=POSITIONS, layers=LAYERS)
    assert again[0]["q"] is not records[0]["q"]
    again[0]["q"].zero_()  # must not reach the in-process cache
    fresh = smollm2.capture_decode_attention(N_TOKENS, positions=POSITIONS, layers=LAYERS)
    assert torch.equal(fresh[0]["q"], records[0]["q"])

    # An uncached second forward pass gives identical tensors.
    n = 256
    first = smollm2.capture_decode_attention(n, positions=(-1,), layers=(0, 29))
    second = smollm2._capture.__wrapped__(n, (-1,), (0, 29), None, torch.float32, "sdpa")
    for a, b in zip(first, second):
        for name in ("q", "k", "v", "out"):
            assert torch.equal(a[name], b[name])


def test_n_tokens_is_honoured(records):
    n = 300
    short = smollm2.capture_decode_attention(n, positions=(-1, 0), layers=(0, 29))
    assert [(r["layer"], r["position"]) for r in short] == [(0, n - 1), (0, 0), (29, n - 1), (29, 0)]
    assert short[0]["k"].shape == (3, n, 64)
    assert short[1]["k"].shape == (3, 1, 64)
    # Causal model: the short prompt is a prefix of the long one, so its keys agree.
    long_k = {r["layer"]: r["k"] for r in records if r["position"] == N_TOKENS - 1}
    for r in short[::2]:
        torch.testing.assert_close(r["k"], long_k[r["layer"]][:, :n], rtol=1e-4, atol=1e-4)


def test_eager_and_sdpa_agree():
    kw = dict(positions=(-1,), layers=(0, 29))
    eager = smollm2.capture_decode_attention(128, attn_implementation="eager", **kw)
    sdpa = smollm2.capture_decode_attention(128, attn_implementation="sdpa", **kw)
    for a, b in zip(eager, sdpa):
        for name in ("q", "k", "v", "out"):
            torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-4)


def test_real_text_is_deterministic():
    text = smollm2.real_text(10_000)
    assert len(text) >= 10_000
    assert text == smollm2.real_text(10_000)
    assert smollm2.real_text(100) == text[: len(smollm2.real_text(100))]
