"""vattention.decode on a GPU: same answer as the CPU, no host sync, CUDA graphs, compile."""
import pytest
import torch

import vattention
from vattention.config import VAttentionConfig
from vattention.coverage import synthetic_heads

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CFG = VAttentionConfig(sink=16, local=16, heavy=0.03, base_rate=0.05, epsilon=0.1, delta=0.1)


def peaked_inputs(batch, heads, length, dtype, seed):
    # Peaked logits keep the top-k boundary far from ties, so CPU and GPU select alike.
    q, k, v = synthetic_heads("peaked", heads, length, 64, torch.Generator().manual_seed(seed))
    q, k, v = (t.expand(batch, *t.shape[1:]).contiguous() for t in (q, k, v))
    return q.to(dtype), k.to(dtype), v.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("share", [True, False])
def test_cuda_matches_cpu(dtype, share):
    q, k, v = peaked_inputs(3, 4, 5000, dtype, seed=1)
    k = k[:, :2].contiguous()
    v = v[:, :2].contiguous()
    cfg = CFG.replace(share_gqa=share)
    lengths = torch.tensor([5000, 3100, 40])
    out_cpu, stats_cpu = vattention.decode(q, k, v, cfg, seq_lens=lengths, seed=5,
                                           return_stats=True)
    out_gpu, stats_gpu = vattention.decode(q.cuda(), k.cuda(), v.cuda(), cfg,
                                           seq_lens=lengths.cuda(), seed=5, return_stats=True)
    assert torch.equal(stats_cpu["heavy_indices"], stats_gpu["heavy_indices"].cpu())
    assert torch.equal(stats_cpu["budget"], stats_gpu["budget"].cpu())
    assert torch.allclose(out_cpu.float(), out_gpu.float().cpu(), atol=2e-2 if dtype != torch.float32 else 1e-4)


def test_decode_never_syncs():
    q, k, v = (t.cuda() for t in peaked_inputs(2, 8, 8192, torch.bfloat16, seed=2))
    k, v = k[:, :2].contiguous(), v[:, :2].contiguous()
    seq_lens = torch.tensor([8192, 5000], device="cuda")
    seed = torch.tensor([3, 0], dtype=torch.int64, device="cuda")
    vattention.decode(q, k, v, CFG, seq_lens=seq_lens, seed=seed)  # warm up allocator/caches
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        vattention.decode(q, k, v, CFG, seq_lens=seq_lens, seed=seed)
        vattention.decode(q, k, v, CFG, seq_lens=seq_lens, seed=None, return_stats=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_cuda_graph_capture_and_replay():
    q, k, v = (t.cuda() for t in peaked_inputs(2, 8, 4096, torch.float16, seed=3))
    k, v = k[:, :2].contiguous(), v[:, :2].contiguous()
    seq_lens = torch.tensor([4096, 3000], device="cuda")
    seed = torch.tensor([7, 0], dtype=torch.int64, device="cuda")
    static = [t.clone() for t in (q, k, v)]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            vattention.decode(*static, CFG, seq_lens=seq_lens, seed=seed)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = vattention.decode(*static, CFG, seq_lens=seq_lens, seed=seed)
    for trial in range(3):
        fresh = peaked_inputs(2, 8, 4096, torch.float16, seed=10 + trial)
        fresh = (fresh[0], fresh[1][:, :2], fresh[2][:, :2])
        for dst, src in zip(static, fresh):
            dst.copy_(src)
        seed.copy_(torch.tensor([100 + trial, 0]))
        graph.replay()
        expected = vattention.decode(*static, CFG, seq_lens=seq_lens,
                                     seed=torch.tensor([100 + trial, 0], device="cuda"))
        torch.cuda.synchronize()
        assert torch.allclose(captured.float(), expected.float(), atol=1e-3)


def test_compile_fullgraph_on_cuda():
    q, k, v = (t.cuda() for t in peaked_inputs(1, 4, 4096, torch.bfloat16, seed=4))
    seed = torch.tensor([9, 0], dtype=torch.int64, device="cuda")
    compiled = torch.compile(lambda q, k, v: vattention.decode(q, k, v, CFG, seed=seed),
                             fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), vattention.decode(q, k, v, CFG, seed=seed))
