// CUDA sparse attention (stage "sparse attention"): split-K flash decoding over
// gathered K/V rows, writing the same partials as sparse_attention_partial_cpu.
//
// Grid (lists, splits, head chunks), 128 threads; see kv_gather_cuda.cuh for the
// mapping. Each block streams the K/V rows of its split through a 4-stage
// cp.async pipeline (16-byte copies, ~16 KiB per stage) and, per row group,
// computes the logits of all its query heads from one read of each K row, then
// folds the V row into fp32 online-softmax accumulators (SoftmaxState
// semantics; log-weights are added to the logits; entries < 0 or >= length are
// skipped, as are entries with log-weight -inf). The row groups' states are
// merged through shared memory into the split's partial (out, lse).
#include "kv_gather_cuda.cuh"
#include "sparse_attention.h"

namespace vattention {
namespace {

using namespace cuda_detail;

template <typename T, int D, int HB>
__global__ void __launch_bounds__(GatherConfig<T, D>::kThreads)
sparse_attention_kernel(const SparseAttentionParams p, const bool aligned) {
  using C = GatherConfig<T, D>;
  unsigned char* pipe = dynamic_smem();
  float* bias = reinterpret_cast<float*>(pipe + C::kPipeBytes);

  const ListWork<T> w = block_work<T>(p.qkv, p.list, HB, p.num_splits);
  const int tid = threadIdx.x;
  const int grp = tid / C::kTpr;
  const int lane = tid % C::kTpr;
  const float scale = p.qkv.scale;

  float q[HB][C::kEpt];
#pragma unroll
  for (int g = 0; g < HB; ++g) {
    if (g < w.heads) {
      load_query_slice<T, D>(p.qkv, w.b, w.h0 + g, lane, q[g]);
    } else {
#pragma unroll
      for (int e = 0; e < C::kEpt; ++e) q[g][e] = 0.f;
    }
  }
  float acc[HB][C::kEpt];
  float m[HB], l[HB];
#pragma unroll
  for (int g = 0; g < HB; ++g) {
    m[g] = kNegInf;
    l[g] = 0.f;
#pragma unroll
    for (int e = 0; e < C::kEpt; ++e) acc[g][e] = 0.f;
  }

  const int64_t tiles = ceil_div(w.end - w.begin, C::kRows);
#pragma unroll
  for (int s = 0; s < C::kStages - 1; ++s) {
    if (s < tiles) {
      issue_tile<T, D>(pipe, bias, s, w, w.begin + int64_t(s) * C::kRows, p.qkv.k_row_stride,
                       p.qkv.v_row_stride, p.qkv.length, aligned);
    }
    cp_async_commit();
  }

  for (int64_t t = 0; t < tiles; ++t) {
    cp_async_wait<C::kStages - 2>();
    __syncthreads();  // tile t landed for every thread; stage (t - 1) % kStages is free
    {
      const int64_t next = t + C::kStages - 1;
      if (next < tiles) {
        issue_tile<T, D>(pipe, bias, int(next % C::kStages), w, w.begin + next * C::kRows,
                         p.qkv.k_row_stride, p.qkv.v_row_stride, p.qkv.length, aligned);
      }
      cp_async_commit();
    }
    const int stage = int(t % C::kStages);
    const unsigned char* k_tile = pipe + stage * C::kStageBytes;
    const unsigned char* v_tile = k_tile + C::kTileBytes;
#pragma unroll
    for (int rr = 0; rr < C::kRowsPerGroup; ++rr) {
      const int r = grp + rr * C::kGroups;
      const float row_bias = bias[stage * C::kRows + r];
      float kf[C::kEpt];
      load_row_slice<T, D>(k_tile + r * C::kRowBytes, lane, kf);
      float dot[HB];
#pragma unroll
      for (int g = 0; g < HB; ++g) {
        float acc_dot = 0.f;
#pragma unroll
        for (int e = 0; e < C::kEpt; ++e) acc_dot = fmaf(q[g][e], kf[e], acc_dot);
        dot[g] = acc_dot;
      }
#pragma unroll
      for (int g = 0; g < HB; ++g) dot[g] = group_sum<C::kTpr>(dot[g]);
      if (row_bias == kNegInf) continue;  // uniform in the row group: skipped or zero-weight row
      float vf[C::kEpt];
      load_row_slice<T, D>(v_tile + r * C::kRowBytes, lane, vf);
#pragma unroll
      for (int g = 0; g < HB; ++g) {
        if (g >= w.heads) continue;
        const float s = dot[g] * scale + row_bias;
        if (s == kNegInf) continue;
        if (s > m[g]) {
          const float alpha = m[g] == kNegInf ? 0.f : __expf(m[g] - s);
          m[g] = s;
          l[g] = l[g] * alpha + 1.f;
#pragma unroll
          for (int e = 0; e < C::kEpt; ++e) acc[g][e] = fmaf(acc[g][e], alpha, vf[e]);
        } else {
          const float pw = __expf(s - m[g]);
          l[g] += pw;
#pragma unroll
          for (int e = 0; e < C::kEpt; ++e) acc[g][e] = fmaf(pw, vf[e], acc[g][e]);
        }
      }
    }
  }

  // Merge the row groups' states. The pipeline buffers are reused as scratch.
  cp_async_wait<0>();
  __syncthreads();
  float* merge_acc = reinterpret_cast<float*>(pipe);         // [kGroups][HB][D]
  float* merge_m = merge_acc + C::kGroups * HB * D;          // [kGroups][HB]
  float* merge_l = merge_m + C::kGroups * HB;                // [kGroups][HB]
  static_assert(C::kGroups * HB * (D + 2) * sizeof(float) <= C::kPipeBytes, "merge scratch");
#pragma unroll
  for (int g = 0; g < HB; ++g) {
    if (g >= w.heads) continue;
    float* dst = merge_acc + (grp * HB + g) * D;
#pragma unroll
    for (int e = 0; e < C::kEpt; ++e) dst[C::dim_of(lane, e)] = acc[g][e];
    if (lane == 0) {
      merge_m[grp * HB + g] = m[g];
      merge_l[grp * HB + g] = l[g];
    }
  }
  __syncthreads();

  const int64_t q_heads = p.qkv.q_heads;
  for (int o = tid; o < w.heads * D; o += C::kThreads) {
    const int g = o / D, d = o - g * D;
    float mx = kNegInf;
    for (int k = 0; k < C::kGroups; ++k) mx = fmaxf(mx, merge_m[k * HB + g]);
    float value = 0.f, total = 0.f;
    if (mx != kNegInf) {
      for (int k = 0; k < C::kGroups; ++k) {
        const float mk = merge_m[k * HB + g];
        if (mk == kNegInf) continue;
        const float scale_k = __expf(mk - mx);
        total = fmaf(merge_l[k * HB + g], scale_k, total);
        value = fmaf(merge_acc[(k * HB + g) * D + d], scale_k, value);
      }
    }
    const int64_t item = ((w.b * q_heads + w.h0 + g) * p.num_splits + blockIdx.y);
    p.partial_out[item * D + d] = total > 0.f ? value / total : 0.f;
    if (d == 0) p.partial_lse[item] = total > 0.f ? mx + __logf(total) : kNegInf;
  }
}

template <typename T, int D, int HB>
cudaError_t launch_attention(const SparseAttentionParams& p, int64_t lists, int64_t chunks,
                             cudaStream_t stream) {
  using C = GatherConfig<T, D>;
  static std::atomic<int> smem_set[kMaxDevices];
  auto kernel = sparse_attention_kernel<T, D, HB>;
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  err = ensure_dynamic_smem(reinterpret_cast<const void*>(kernel), C::kSmemBytes, device, smem_set);
  if (err != cudaSuccess) return err;
  const dim3 grid{unsigned(lists), unsigned(p.num_splits), unsigned(chunks)};
  return launch_kernel(kernel, grid, dim3(C::kThreads), size_t(C::kSmemBytes), stream, 1, p,
                       rows_are_aligned(p.qkv));
}

template <typename T, int D>
cudaError_t dispatch_heads(const SparseAttentionParams& p, cudaStream_t stream) {
  const int64_t lists = p.qkv.batch * p.list.list_heads;
  const int64_t group = p.qkv.group_size();
  if (p.list.list_heads == p.qkv.q_heads || group == 1) {
    return launch_attention<T, D, 1>(p, lists, 1, stream);
  }
  if (group <= 4) return launch_attention<T, D, 4>(p, lists, 1, stream);
  return launch_attention<T, D, 8>(p, lists, ceil_div(group, 8), stream);
}

template <typename T>
cudaError_t dispatch_dim(const SparseAttentionParams& p, cudaStream_t stream) {
  switch (p.qkv.head_dim) {
    case 64: return dispatch_heads<T, 64>(p, stream);
    case 128: return dispatch_heads<T, 128>(p, stream);
    case 256: return dispatch_heads<T, 256>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t sparse_attention_partial_cuda(const SparseAttentionParams& p, cudaStream_t stream) {
  if (p.qkv.batch <= 0 || p.qkv.q_heads <= 0 || p.num_splits <= 0) return cudaSuccess;
  if (p.num_splits > 65535 || p.qkv.batch * p.list.list_heads > 0x7fffffff) {
    return cudaErrorInvalidValue;
  }
  switch (p.qkv.dtype) {
    case DType::kFloat32: return dispatch_dim<float>(p, stream);
    case DType::kFloat16: return dispatch_dim<half_t>(p, stream);
    case DType::kBFloat16: return dispatch_dim<bfloat16_t>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace vattention
