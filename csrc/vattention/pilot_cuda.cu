// CUDA pilot statistics (stage "pilot"), the same quantities as pilot_stats_cpu.
//
// The gather pipeline of the sparse-attention kernel (kv_gather_cuda.cuh): one
// block per (list, split, head chunk) reads each K/V row of its split once for
// all its query heads. Instead of a max-first second pass, every row group keeps
// running sums relative to its running max m (rescaled by exp(m_old - m_new),
// squared weights by its square when m grows):
//   s1 = sum w, s2 = sum w^2, s3 = sum w^2 ||V||^2, v1 = sum w V, v2 = sum w^2 V,
// with w = exp(s - m). Row groups are merged in shared memory; with one split the
// block writes the final outputs, otherwise a record per (head, split) goes to the
// workspace and pilot_merge_kernel merges the splits the same way.
#include "kv_gather_cuda.cuh"
#include "pilot.h"

namespace vattention {
namespace {

using namespace cuda_detail;

// Workspace record of one (head, split): [m, s1, s2, s3, v1[D], v2[D]].
__host__ __device__ __forceinline__ int64_t record_floats(int64_t dim) { return 4 + 2 * dim; }

template <typename T, int D, int HB>
__global__ void __launch_bounds__(GatherConfig<T, D>::kThreads)
pilot_kernel(const PilotParams p, const int64_t num_splits, float* workspace, const bool aligned) {
  using C = GatherConfig<T, D>;
  unsigned char* pipe = dynamic_smem();
  float* bias = reinterpret_cast<float*>(pipe + C::kPipeBytes);

  IndexListParams list = p.list;
  list.log_weights = nullptr;  // the pilot has no weights
  const ListWork<T> w = block_work<T>(p.qkv, list, HB, num_splits);
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
  float v1[HB][C::kEpt], v2[HB][C::kEpt];
  float m[HB], s1[HB], s2[HB], s3[HB];
#pragma unroll
  for (int g = 0; g < HB; ++g) {
    m[g] = kNegInf;
    s1[g] = s2[g] = s3[g] = 0.f;
#pragma unroll
    for (int e = 0; e < C::kEpt; ++e) v1[g][e] = v2[g][e] = 0.f;
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
    __syncthreads();
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
      const float row_bias = bias[stage * C::kRows + r];  // 0 or -inf (skipped entry)
      float kf[C::kEpt], vf[C::kEpt];
      load_row_slice<T, D>(k_tile + r * C::kRowBytes, lane, kf);
      load_row_slice<T, D>(v_tile + r * C::kRowBytes, lane, vf);
      float dot[HB];
#pragma unroll
      for (int g = 0; g < HB; ++g) {
        float acc_dot = 0.f;
#pragma unroll
        for (int e = 0; e < C::kEpt; ++e) acc_dot = fmaf(q[g][e], kf[e], acc_dot);
        dot[g] = acc_dot;
      }
      float norm2 = 0.f;
#pragma unroll
      for (int e = 0; e < C::kEpt; ++e) norm2 = fmaf(vf[e], vf[e], norm2);
#pragma unroll
      for (int g = 0; g < HB; ++g) dot[g] = group_sum<C::kTpr>(dot[g]);
      norm2 = group_sum<C::kTpr>(norm2);
      if (row_bias == kNegInf) continue;
#pragma unroll
      for (int g = 0; g < HB; ++g) {
        if (g >= w.heads) continue;
        const float s = dot[g] * scale;
        if (s == kNegInf) continue;
        if (s > m[g]) {
          const float a = m[g] == kNegInf ? 0.f : __expf(m[g] - s);
          const float a2 = a * a;
          m[g] = s;
          s1[g] = fmaf(s1[g], a, 1.f);
          s2[g] = fmaf(s2[g], a2, 1.f);
          s3[g] = fmaf(s3[g], a2, norm2);
#pragma unroll
          for (int e = 0; e < C::kEpt; ++e) {
            v1[g][e] = fmaf(v1[g][e], a, vf[e]);
            v2[g][e] = fmaf(v2[g][e], a2, vf[e]);
          }
        } else {
          const float wt = __expf(s - m[g]);
          const float wt2 = wt * wt;
          s1[g] += wt;
          s2[g] += wt2;
          s3[g] = fmaf(wt2, norm2, s3[g]);
#pragma unroll
          for (int e = 0; e < C::kEpt; ++e) {
            v1[g][e] = fmaf(wt, vf[e], v1[g][e]);
            v2[g][e] = fmaf(wt2, vf[e], v2[g][e]);
          }
        }
      }
    }
  }

  // Merge the row groups in shared memory (the pipeline buffers become scratch).
  cp_async_wait<0>();
  __syncthreads();
  float* merge_v = reinterpret_cast<float*>(pipe);          // [kGroups][HB][2][D]
  float* merge_s = merge_v + C::kGroups * HB * 2 * D;       // [kGroups][HB][4]: m, s1, s2, s3
  static_assert(C::kGroups * HB * (2 * D + 4) * sizeof(float) <= C::kPipeBytes, "merge scratch");
#pragma unroll
  for (int g = 0; g < HB; ++g) {
    if (g >= w.heads) continue;
    float* dst = merge_v + (grp * HB + g) * 2 * D;
#pragma unroll
    for (int e = 0; e < C::kEpt; ++e) {
      dst[C::dim_of(lane, e)] = v1[g][e];
      dst[D + C::dim_of(lane, e)] = v2[g][e];
    }
    if (lane == 0) {
      float* st = merge_s + (grp * HB + g) * 4;
      st[0] = m[g];
      st[1] = s1[g];
      st[2] = s2[g];
      st[3] = s3[g];
    }
  }
  __syncthreads();

  const int64_t q_heads = p.qkv.q_heads;
  // Outputs per head: 2 * D vector entries, then the 4 scalars (index 2 * D).
  for (int o = tid; o < w.heads * (2 * D + 1); o += C::kThreads) {
    const int g = o / (2 * D + 1);
    const int x = o - g * (2 * D + 1);
    float mx = kNegInf;
    for (int k = 0; k < C::kGroups; ++k) mx = fmaxf(mx, merge_s[(k * HB + g) * 4]);
    const int64_t t = w.b * q_heads + w.h0 + g;
    if (x < 2 * D) {
      const bool squared = x >= D;
      float value = 0.f;
      if (mx != kNegInf) {
        for (int k = 0; k < C::kGroups; ++k) {
          const float mk = merge_s[(k * HB + g) * 4];
          if (mk == kNegInf) continue;
          float a = __expf(mk - mx);
          if (squared) a *= a;
          value = fmaf(merge_v[(k * HB + g) * 2 * D + x], a, value);
        }
      }
      if (num_splits == 1) {
        p.vector_moments[t * 2 * D + x] = value;
      } else {
        workspace[(t * num_splits + blockIdx.y) * record_floats(D) + 4 + x] = value;
      }
    } else {
      float sums[3] = {0.f, 0.f, 0.f};
      if (mx != kNegInf) {
        for (int k = 0; k < C::kGroups; ++k) {
          const float* st = merge_s + (k * HB + g) * 4;
          if (st[0] == kNegInf) continue;
          const float a = __expf(st[0] - mx);
          sums[0] = fmaf(st[1], a, sums[0]);
          sums[1] = fmaf(st[2], a * a, sums[1]);
          sums[2] = fmaf(st[3], a * a, sums[2]);
        }
      }
      if (num_splits == 1) {
        p.max_logit[t] = mx;
        for (int i = 0; i < kPilotMoments; ++i) p.moments[t * kPilotMoments + i] = sums[i];
      } else {
        float* rec = workspace + (t * num_splits + blockIdx.y) * record_floats(D);
        rec[0] = mx;
        rec[1] = sums[0];
        rec[2] = sums[1];
        rec[3] = sums[2];
      }
    }
  }
}

// Merges the per-split records of each (batch, query head): one block per head.
__global__ void __launch_bounds__(128)
pilot_merge_kernel(const PilotParams p, const int64_t num_splits, const float* workspace) {
  const int64_t dim = p.qkv.head_dim;
  const int64_t heads = p.qkv.batch * p.qkv.q_heads;
  const int64_t rec = record_floats(dim);
  for (int64_t t = blockIdx.x; t < heads; t += gridDim.x) {
    const float* base = workspace + t * num_splits * rec;
    float mx = kNegInf;
    for (int64_t s = 0; s < num_splits; ++s) mx = fmaxf(mx, base[s * rec]);
    for (int64_t x = threadIdx.x; x <= 2 * dim; x += blockDim.x) {
      if (x < 2 * dim) {
        const bool squared = x >= dim;
        float value = 0.f;
        if (mx != kNegInf) {
          for (int64_t s = 0; s < num_splits; ++s) {
            const float ms = base[s * rec];
            if (ms == kNegInf) continue;
            float a = __expf(ms - mx);
            if (squared) a *= a;
            value = fmaf(base[s * rec + 4 + x], a, value);
          }
        }
        p.vector_moments[t * 2 * dim + x] = value;
      } else {
        float sums[3] = {0.f, 0.f, 0.f};
        if (mx != kNegInf) {
          for (int64_t s = 0; s < num_splits; ++s) {
            const float* r = base + s * rec;
            if (r[0] == kNegInf) continue;
            const float a = __expf(r[0] - mx);
            sums[0] = fmaf(r[1], a, sums[0]);
            sums[1] = fmaf(r[2], a * a, sums[1]);
            sums[2] = fmaf(r[3], a * a, sums[2]);
          }
        }
        p.max_logit[t] = mx;
        for (int i = 0; i < kPilotMoments; ++i) p.moments[t * kPilotMoments + i] = sums[i];
      }
    }
  }
}

template <typename T, int D, int HB>
cudaError_t launch_pilot(const PilotParams& p, int64_t num_splits, float* workspace,
                         int64_t lists, int64_t chunks, cudaStream_t stream) {
  using C = GatherConfig<T, D>;
  static std::atomic<int> smem_set[kMaxDevices];
  auto kernel = pilot_kernel<T, D, HB>;
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  err = ensure_dynamic_smem(reinterpret_cast<const void*>(kernel), C::kSmemBytes, device, smem_set);
  if (err != cudaSuccess) return err;
  const dim3 grid{unsigned(lists), unsigned(num_splits), unsigned(chunks)};
  return launch_kernel(kernel, grid, dim3(C::kThreads), size_t(C::kSmemBytes), stream, 1, p,
                       num_splits, workspace, rows_are_aligned(p.qkv));
}

template <typename T, int D>
cudaError_t dispatch_heads(const PilotParams& p, int64_t num_splits, float* workspace,
                           cudaStream_t stream) {
  const int64_t lists = p.qkv.batch * p.list.list_heads;
  const int64_t group = p.qkv.group_size();
  if (p.list.list_heads == p.qkv.q_heads || group == 1) {
    return launch_pilot<T, D, 1>(p, num_splits, workspace, lists, 1, stream);
  }
  return launch_pilot<T, D, 4>(p, num_splits, workspace, lists, ceil_div(group, 4), stream);
}

template <typename T>
cudaError_t dispatch_dim(const PilotParams& p, int64_t num_splits, float* workspace,
                         cudaStream_t stream) {
  switch (p.qkv.head_dim) {
    case 64: return dispatch_heads<T, 64>(p, num_splits, workspace, stream);
    case 128: return dispatch_heads<T, 128>(p, num_splits, workspace, stream);
    case 256: return dispatch_heads<T, 256>(p, num_splits, workspace, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

size_t pilot_stats_cuda_workspace_bytes(const PilotParams& p, int64_t num_splits) {
  if (num_splits <= 1) return 0;
  return size_t(p.qkv.batch * p.qkv.q_heads * num_splits * record_floats(p.qkv.head_dim)) *
         sizeof(float);
}

cudaError_t pilot_stats_cuda(const PilotParams& p, int64_t num_splits, void* workspace,
                             cudaStream_t stream) {
  const int64_t heads = p.qkv.batch * p.qkv.q_heads;
  if (heads <= 0) return cudaSuccess;
  if (num_splits < 1 || num_splits > 65535 || p.qkv.batch * p.list.list_heads > 0x7fffffff) {
    return cudaErrorInvalidValue;
  }
  if (num_splits > 1 && workspace == nullptr) return cudaErrorInvalidValue;
  float* ws = static_cast<float*>(workspace);
  cudaError_t err = cudaErrorInvalidValue;
  switch (p.qkv.dtype) {
    case DType::kFloat32: err = dispatch_dim<float>(p, num_splits, ws, stream); break;
    case DType::kFloat16: err = dispatch_dim<half_t>(p, num_splits, ws, stream); break;
    case DType::kBFloat16: err = dispatch_dim<bfloat16_t>(p, num_splits, ws, stream); break;
  }
  if (err != cudaSuccess || num_splits == 1) return err;
  const int64_t blocks = std::min<int64_t>(heads, 65535);
  return launch_kernel(pilot_merge_kernel, dim3(unsigned(blocks)), dim3(128), 0, stream, 1, p,
                       num_splits, static_cast<const float*>(ws));
}

cudaError_t pilot_stats_cuda(const PilotParams& p, cudaStream_t stream) {
  return pilot_stats_cuda(p, 1, nullptr, stream);
}

}  // namespace vattention
