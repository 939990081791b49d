"""attn_implementation="vattention" on SmolLM2 (needs the ``models`` extra, see README)."""
import contextlib
import copy

import pytest
import torch

from tests.helpers import cuda_only, no_sync, requires_model
import vattention
from vattention import VAttentionConfig
from vattention.models import capture, smollm2

pytestmark = [pytest.mark.model, requires_model]

# A small deterministic set so that a few hundred tokens leave a residual to sample.
SMALL = VAttentionConfig(sink=16, local=16, heavy=0.05)


@pytest.fixture(scope="module")
def vt():
    from vattention.integrations import transformers as vt

    return vt


@pytest.fixture(scope="module")
def model(vt):
    model, _ = smollm2.load_smollm2()  # shared, lru_cached: leave it as we found it
    original = model.config._attn_implementation
    yield model
    vt.disable(model, original)


@pytest.fixture(scope="module")
def tokenizer(model):
    return smollm2.load_smollm2()[1]


@pytest.fixture(scope="module")
def ids(tokenizer):
    return tokenizer(smollm2.real_text(4000), return_tensors="pt").input_ids[:, :512]


def _generate(model, ids, new_tokens, **kwargs):
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, **kwargs)
    return out[:, ids.shape[1]:]


def _dense(model, vt, ids, new_tokens, **kwargs):
    vt.disable(model, "sdpa")
    return _generate(model, ids, new_tokens, **kwargs)


def test_tiny_epsilon_generates_the_dense_tokens(model, vt, ids):
    dense = _dense(model, vt, ids, 6)
    vt.configure(model, SMALL.replace(epsilon=1e-4), seed=0)
    assert model.config._attn_implementation == "vattention"
    with vt.collect_stats(model) as stats:
        sparse = _generate(model, ids, 6)
    assert torch.equal(sparse, dense)
    assert sorted(stats.layers) == list(range(30))
    for layer in range(30):
        assert stats.steps(layer) == 5                 # the first token comes from the prefill
        assert bool(stats.stack("exact", layer).all())  # the budget covers the residual


def test_decode_step_equals_vattention_decode(model, vt, ids):
    layer, seed = 5, 11
    cfg = SMALL.replace(epsilon=0.1)
    # Layers before `layer` run dense, so its q/k/v are those of a dense step.
    vt.configure(model, lambda i: cfg if i == layer else None, seed=seed)
    with torch.no_grad():
        prefill = model(ids, use_cache=True)
    cache = prefill.cache if hasattr(prefill, "cache") else prefill.past_key_values
    token = prefill.logits[:, -1:].argmax(-1)

    attention = model.model.layers[layer].self_attn
    got = {}
    hook = attention.o_proj.register_forward_pre_hook(
        lambda mod, args: got.setdefault("out", args[0].detach().clone()))
    try:
        with torch.no_grad(), vt.collect_stats(model) as stats:
            model(token, cache=copy.deepcopy(cache), use_cache=True)
    finally:
        hook.remove()

    seen = {}

    def record(module, query, key, value, out, scaling):
        if module.layer_idx == layer:
            seen.update(q=query[:, :, 0].clone(), k=key.clone(), v=value.clone(), scale=scaling)

    vt.disable(model, "sdpa")
    with torch.no_grad(), capture.capturing(model, "sdpa", record):
        model(token, cache=copy.deepcopy(cache), use_cache=True)
    assert seen["k"].shape == (1, 3, ids.shape[1] + 1, 64)       # the cache, not repeated

    expected, expected_stats = vattention.decode(
        seen["q"], seen["k"], seen["v"], cfg, scale=seen["scale"],
        seed=vt.layer_seed(seed, layer, 0), return_stats=True)
    torch.testing.assert_close(got["out"].view(1, 9, 64), expected, rtol=1e-5, atol=1e-6)
    assert list(stats.layers) == [layer]
    recorded = stats.layers[layer][0]
    for name in ("budget", "density", "pilot", "exact", "heavy_indices"):
        assert torch.equal(recorded[name], expected_stats[name]), name
    assert not bool(recorded["exact"].all())                       # it did sample
    dense = torch.nn.functional.scaled_dot_product_attention(
        seen["q"][:, :, None], seen["k"], seen["v"], scale=seen["scale"], enable_gqa=True)[:, :, 0]
    assert not torch.equal(expected, dense)


def test_default_config_generation_per_layer_config_and_stats(model, vt, ids):
    configs = {0: None, -1: VAttentionConfig(rule="paper")}
    vt.configure(model, configs, seed=3)
    entries = vt.layer_configs(model)
    assert entries[0] is None and entries[29].rule == "paper" and entries[7] == VAttentionConfig()
    with vt.collect_stats(model) as stats:
        first = _generate(model, ids, 4)
    assert first.shape == (1, 4)
    assert 0 not in stats.layers and sorted(stats.layers) == list(range(1, 30))
    summary = stats.summary()
    for layer in range(1, 30):
        assert summary[layer]["steps"] == 3
        assert 0 < summary[layer]["density"] <= 1
        assert summary[layer]["budget_min"] <= summary[layer]["budget_median"] \
            <= summary[layer]["budget_max"]
        assert stats.stack("budget", layer).shape == (3, 1, 9)
    assert summary[29]["density"] >= summary[28]["density"] * 0.5  # "paper" is not sparser

    # Same seed, same samples: the stats of a second generation are identical.
    with vt.collect_stats(model, keys=("budget", "heavy_indices")) as again:
        second = _generate(model, ids, 4)
    assert torch.equal(first, second)
    for layer in range(1, 30):
        for name in ("budget", "heavy_indices"):
            assert torch.equal(stats.stack(name, layer), again.stack(name, layer))
        assert set(again.layers[layer][0]) == {"budget", "heavy_indices"}
    vt.configure(model, configs, seed=4)
    with vt.collect_stats(model, keys=("budget",)) as other:
        _generate(model, ids, 2)
    assert any(not torch.equal(stats.stack("budget", layer)[:1], other.stack("budget", layer))
               for layer in range(1, 30))


def test_left_padded_batch(model, vt, tokenizer):
    text = tokenizer(smollm2.real_text(3000), return_tensors="pt").input_ids[0]
    rows = [text[:200], text[300:440]]
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((2, width), pad, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for b, r in enumerate(rows):
        input_ids[b, width - len(r):] = r
        mask[b, width - len(r):] = 1
    dense = _dense(model, vt, input_ids, 4, attention_mask=mask, pad_token_id=pad)
    vt.configure(model, SMALL.replace(epsilon=1e-4), seed=1)
    with vt.collect_stats(model, keys=("exact", "density")) as stats:
        sparse = _generate(model, input_ids, 4, attention_mask=mask, pad_token_id=pad)
    assert torch.equal(sparse, dense)
    assert bool(stats.stack("exact", 3).all())
    # density is relative to each row's own tokens: exact attention reads all of them.
    torch.testing.assert_close(stats.stack("density", 3), torch.ones(3, 2, 9))
    # Row by row (no padding) gives the same tokens.
    single = _generate(model, rows[1][None], 4)
    assert torch.equal(single[0], sparse[1])


def test_static_cache(model, vt, ids):
    # A static cache hands attention its whole buffer and a mask of the valid prefix.
    prompt = ids[:, :300]
    dense = _dense(model, vt, prompt, 4, cache_implementation="static")
    vt.configure(model, SMALL.replace(epsilon=1e-4), seed=2)
    with vt.collect_stats(model, keys=("exact", "n_residual")) as stats:
        sparse = _generate(model, prompt, 4, cache_implementation="static")
    assert torch.equal(sparse, dense)
    assert bool(stats.stack("exact", 0).all())
    # n_residual follows the valid length (301, 302, 303 tokens), not the buffer's.
    assert stats.stack("n_residual", 0)[:, 0, 0].tolist() == [
        n - 32 - round(0.05 * n + 0.499) for n in (301, 302, 303)]


def test_key_ranges(vt):
    n = 6
    assert vt.key_ranges(None, 2, n).seq_lens is None
    full = torch.ones(2, 1, 1, n, dtype=torch.bool)
    assert vt.key_ranges(full, 2, n) == vt.KeyRanges(None, None, None)
    prefix = full.clone()
    prefix[1, ..., 4:] = False
    assert vt.key_ranges(prefix, 2, n).seq_lens.tolist() == [6, 4]
    left = full.clone()
    left[0, ..., :2] = False
    assert vt.key_ranges(left, 2, n) == vt.KeyRanges(None, [2, 0], [6, 6])
    additive = torch.where(left, 0.0, torch.finfo(torch.float32).min)
    assert vt.key_ranges(additive, 2, n) == vt.KeyRanges(None, [2, 0], [6, 6])
    assert vt.key_ranges(full[:1], 2, n) == vt.KeyRanges(None, None, None)   # broadcast batch
    holes = full.clone()
    holes[0, ..., 3] = False
    with pytest.raises(ValueError, match="contiguous"):
        vt.key_ranges(holes, 2, n)
    with pytest.raises(ValueError, match="additive"):
        vt.key_ranges(torch.where(full, 0.5, 0.0), 2, n)
    heads = torch.ones(2, 3, 1, n, dtype=torch.bool)
    heads[0, 1, 0, 0] = False
    with pytest.raises(ValueError, match="per-head"):
        vt.key_ranges(heads, 2, n)
    with pytest.raises(ValueError, match="4D"):
        vt.key_ranges(torch.ones(2, n, dtype=torch.bool), 2, n)


def test_bad_configuration(model, vt):
    with pytest.raises(TypeError, match="VAttentionConfig"):
        vt.configure(model, "ratio")
    with pytest.raises(ValueError, match="30 layers"):
        vt.configure(model, {30: SMALL})
    with pytest.raises(TypeError, match="layer indices"):
        vt.configure(model, {"layer0": SMALL})
    with pytest.raises(TypeError, match="layer 2"):
        vt.configure(model, {2: {"epsilon": 0.1}})
    with pytest.raises(ValueError, match="one entry per layer"):
        vt.configure(model, [SMALL] * 3)
    with pytest.raises(TypeError, match=r"config\(4\)"):
        vt.configure(model, lambda layer: 0.05 if layer == 4 else SMALL)
    with pytest.raises(ValueError, match="seed"):
        vt.configure(model, SMALL, seed=-1)
    with pytest.raises(TypeError, match="no attention modules"):
        vt.configure(torch.nn.Linear(2, 2), SMALL)
    with pytest.raises(ValueError, match="epsilon"):
        VAttentionConfig(epsilon=2.0)


def _static_steps(model, vt, prompt, steps, cuda_graphs, device="cpu", capture=True,
                  record=True, replay_guard=contextlib.nullcontext):
    """Greedy steps on a StaticCache: through vt.DecodeGraph (cuda_graphs) or plain forward
    calls with the same 4D mask and positions. Returns (logits [steps, vocab], stats or None).
    replay_guard() wraps the steps after the first two (DecodeGraph's eager and capture
    calls): the replays."""
    from transformers import StaticCache

    prompt = prompt.to(device)
    cache = StaticCache(config=model.config, max_cache_len=prompt.shape[1] + steps + 2)
    with torch.no_grad():
        token = model(prompt, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1)
    graph = vt.DecodeGraph(model, cache, batch=1, capture=capture) if cuda_graphs else None
    logits = []
    with (vt.collect_stats(model, keys=("exact",)) if record
          else contextlib.nullcontext()) as stats:
        for t in range(steps):
            position = prompt.shape[1] + t
            if graph is not None:
                with replay_guard() if t >= 2 else contextlib.nullcontext():
                    step = graph.step(token, position)
            else:
                mask = (torch.arange(cache.get_max_length(), device=device) <= position)
                with torch.no_grad():
                    step = model(input_ids=token[:, None], position_ids=torch.tensor(
                                     [[position]], device=device),
                                 cache_position=torch.tensor([position], device=device),
                                 past_key_values=cache, attention_mask=mask[None, None, None],
                                 use_cache=True, logits_to_keep=1).logits[:, -1]
            logits.append(step)
            token = step.argmax(-1)
    return torch.cat(logits), stats


def test_cuda_graph_mode_draws_what_host_seeds_draw(model, vt, ids):
    """configure(cuda_graphs=True): the seed pair advances in a device tensor and lengths
    come from the mask on the device, yet every step samples exactly what the host-seeded
    step samples (same (seed, layer, step) pairs, same lengths): equal logits."""
    cfg = SMALL.replace(epsilon=0.2, delta=0.2)
    prompt = ids[:, :200]
    vt.configure(model, cfg, seed=5)
    host, _ = _static_steps(model, vt, prompt, 4, cuda_graphs=False)
    vt.configure(model, cfg, seed=5, cuda_graphs=True)
    device, stats = _static_steps(model, vt, prompt, 4, cuda_graphs=True)
    assert not bool(torch.stack([stats.stack("exact", layer) for layer in stats.layers]).all()), \
        "no layer sampled: the comparison would not see the seeds"
    assert torch.equal(device, host)
    # The seeds do matter: another seed gives other draws, hence other logits.
    vt.configure(model, cfg, seed=6, cuda_graphs=True)
    other, _ = _static_steps(model, vt, prompt, 4, cuda_graphs=True)
    assert not torch.equal(other, host)


def test_decode_graph_rejects_an_unprepared_model(model, vt):
    from transformers import StaticCache

    vt.configure(model, SMALL, seed=0)
    with pytest.raises(ValueError, match="cuda_graphs=True"):
        vt.DecodeGraph(model, StaticCache(config=model.config, max_cache_len=16), batch=1)


@cuda_only
def test_decode_graph_replays_the_eager_steps_on_cuda(model, vt, ids):
    """A whole decode step (all 30 layers) captured once and replayed with new tokens,
    seeds and lengths gives the eager steps' logits, with no host sync in a replay."""
    gpu_model = copy.deepcopy(model).to("cuda")
    cfg = SMALL.replace(epsilon=0.2, delta=0.2)
    prompt = ids[:, :300]
    vt.configure(gpu_model, cfg, seed=3, cuda_graphs=True)
    eager, _ = _static_steps(gpu_model, vt, prompt, 6, cuda_graphs=True, device="cuda",
                             capture=False, record=False)
    vt.configure(gpu_model, cfg, seed=3, cuda_graphs=True)
    replayed, _ = _static_steps(gpu_model, vt, prompt, 6, cuda_graphs=True, device="cuda",
                                record=False, replay_guard=no_sync)
    torch.testing.assert_close(replayed, eager, rtol=1e-5, atol=1e-5)
