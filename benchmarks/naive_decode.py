"""The straightforward PyTorch composition of vAttention: the baseline the kernels must beat.

Written the way one would without custom kernels: full logits, torch.topk, masks,
torch.randint, gathers, and a host read of the budget to size the sample (a
synchronisation that the fused path avoids). Same algorithm and budget rule as
vattention.decode with cfg.rule == "ratio"; used only for timing.
"""
import math

import torch

from vattention.budget import z_two_sided
from vattention.config import resolve_size


def naive_decode(q, k, v, sink=128, local=128, heavy=0.05, base_rate=0.05, epsilon=0.05,
                 delta=0.05):
    batch, q_heads, dim = q.shape
    kv_heads, length = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    scale = 1.0 / math.sqrt(dim)
    heavy_k = resolve_size(heavy, length)
    n_res = length - sink - local - heavy_k

    logits = (q.view(batch, kv_heads, group, dim) @ k.transpose(-1, -2)).float() * scale
    scores = (logits - logits.logsumexp(-1, keepdim=True)).amax(2)
    heavy_idx = torch.topk(scores[..., sink:length - local], heavy_k).indices + sink
    deterministic = torch.zeros(batch, kv_heads, length, dtype=torch.bool, device=q.device)
    deterministic[..., :sink] = True
    deterministic[..., length - local:] = True
    deterministic.scatter_(-1, heavy_idx, True)
    residual = torch.argsort(deterministic.to(torch.int8), dim=-1, stable=True)[..., :n_res]

    def gather(positions):
        rows = positions[:, :, None, :].expand(-1, -1, group, -1)
        s = logits.gather(-1, rows)
        vals = v.gather(2, positions[..., None].expand(-1, -1, -1, dim)).float()
        return s, vals[:, :, None]

    shift = logits.amax(-1, keepdim=True)
    w_all = torch.exp(logits - shift)
    mask = deterministic[:, :, None, :]
    z_det = (w_all * mask).sum(-1)
    n_det = (w_all * mask) @ v[:, :, None].float().squeeze(2)

    pilot_n = max(2, resolve_size(float(base_rate), n_res))
    pilot = residual.gather(-1, torch.randint(0, n_res, (batch, kv_heads, pilot_n), device=q.device))
    s_p, v_p = gather(pilot)
    w_p = torch.exp(s_p - shift)
    z_hat = z_det + n_res * w_p.mean(-1)
    o_hat = (n_det + n_res * (w_p[..., None] * v_p).mean(-2)) / z_hat[..., None]
    terms = w_p[..., None] * (v_p - o_hat[..., None, :])
    trace = terms.var(-2).sum(-1)
    z = z_two_sided(delta)
    budget = (z * n_res) ** 2 * trace / (epsilon * z_hat * o_hat.norm(dim=-1)) ** 2
    b = int(min(max(budget.max().item(), pilot_n), n_res))  # host sync sizes the sample

    sample = residual.gather(-1, torch.randint(0, n_res, (batch, kv_heads, b), device=q.device))
    s_s, v_s = gather(sample)
    w_s = torch.exp(s_s - shift) * (n_res / b)
    z_total = z_det + w_s.sum(-1)
    n_total = n_det + (w_s[..., None] * v_s).sum(-2)
    return (n_total / z_total[..., None]).reshape(batch, q_heads, dim).to(q.dtype)
