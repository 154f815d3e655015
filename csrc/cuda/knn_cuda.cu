// Exact brute-force kNN on CUDA, faiss-style: per (query block, data tile)
// one GEMM gives -2 q.x, then a selection kernel, one CUDA block per
// query row, merges the tile's keys |x|^2 - 2 q.x into the row's running k'
// best (k' = k + extra), kept in global memory between tiles. Keys below the
// row's threshold are appended to a shared-memory buffer; when it fills, and
// at the end of the tile, list and buffer are bitonic-sorted together and cut
// back to k'. Finally the k' candidates' distances are recomputed exactly
// (one warp per candidate, float64 accumulation) and re-ranked by (distance,
// index), as on the CPU. Memory: one [block, tile] key matrix at a time.
//
// The screen is the CPU's full screen: keys in the data dtype from a GEMM in
// full precision. torch may run float32 GEMMs in TF32 (10-bit mantissa;
// torch.backends.cuda.matmul.allow_tf32, set_float32_matmul_precision("high"),
// often enabled by diffusers scripts), whose key errors (~5e-4 of |q||x|)
// reorder near-duplicates far beyond the k' - k spare candidates. When torch's
// setting allows that, the float32 screen's GEMM runs in float64 instead (the
// keys rounded back to float32: a float32 GEMM's accuracy). Keys of float32
// data whose centred squared norms pass kKeyNormLimit (or whose float32 mean
// overflows) could overflow: such inputs are searched in float64, as on the CPU.
#include "knn_cuda.h"

#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <limits>

#include "../common/knn_checks.h"
#include "../kernels/topk.h"

namespace mmh {
namespace {

constexpr int kSelectThreads = 256;
constexpr int kMaxFused = 1024;       // largest k' handled by the fused selection
constexpr int kCandidates = 1024;     // shared candidate buffer per row
constexpr int kExactThreads = 256;    // 8 warps, one candidate each

// Whether torch would run a float32 at::mm on CUDA in reduced precision: the
// same setting its cuBLAS and cuBLASLt paths read (TF32; BF16 where a torch
// build maps "bf16" to a reduced compute type).
inline bool reduced_float32_matmul() {
  const auto p = at::globalContext().float32Precision(at::Float32Backend::CUDA, at::Float32Op::MATMUL);
  return p == at::Float32Precision::TF32 || p == at::Float32Precision::BF16;
}

inline int next_pow2(int v) {
  int p = 1;
  while (p < v) p <<= 1;
  return p;
}

template <typename T>
__device__ __forceinline__ T positive_inf() {
  return std::numeric_limits<T>::infinity();
}

// Merge the candidate buffer into the sorted list: sort list + buffer, keep
// the kk smallest. All threads call it; it ends with a barrier.
template <typename T>
__device__ void merge_candidates(T* sk, int64_t* si, int kk, int* count, T* thr) {
  const int n = kk + *count;
  int p2 = 1;
  while (p2 < n) p2 <<= 1;
  for (int t = n + threadIdx.x; t < p2; t += blockDim.x) {
    sk[t] = positive_inf<T>();
    si[t] = INT64_MAX;
  }
  __syncthreads();
  topk::block_bitonic_sort(sk, si, p2);
  if (threadIdx.x == 0) {
    *count = 0;
    *thr = sk[kk - 1];
  }
  __syncthreads();
}

// One block per query row r of the current block: merge keys g[r, :nc] +
// xn[c0 : c0 + nc] into the row's running list (best_k/best_i, kk entries,
// ascending). self_base >= 0: data index self_base + r is the row's own
// point and is skipped. Dynamic shared memory: cap * (8 + sizeof(T)) bytes.
template <typename T>
__global__ void select_kernel(const T* __restrict__ g, int64_t nc, const T* __restrict__ xn,
                              int64_t c0, T* __restrict__ best_k, int64_t* __restrict__ best_i,
                              int kk, int cap, int64_t self_base) {
  extern __shared__ unsigned char smem_raw[];
  // Layout: cap indices, then cap keys (cap = next power of two of
  // kk + kCandidates, so the bitonic sort of list + buffer fits).
  int64_t* si = reinterpret_cast<int64_t*>(smem_raw);
  T* sk = reinterpret_cast<T*>(smem_raw + static_cast<size_t>(cap) * sizeof(int64_t));
  __shared__ int count;
  __shared__ T thr;
  const int64_t row = blockIdx.x;
  const T* grow = g + row * nc;
  T* bk = best_k + row * kk;
  int64_t* bi = best_i + row * kk;
  for (int t = threadIdx.x; t < kk; t += blockDim.x) {
    sk[t] = bk[t];
    si[t] = bi[t];
  }
  if (threadIdx.x == 0) {
    count = 0;
    thr = bk[kk - 1];
  }
  __syncthreads();
  const int64_t self = self_base >= 0 ? self_base + row : -1;
  for (int64_t base = 0; base < nc; base += blockDim.x) {
    const int64_t j = base + threadIdx.x;
    if (j < nc) {
      const T v = grow[j] + xn[c0 + j];
      const int64_t gi = c0 + j;
      if (v < thr && gi != self) {
        const int slot = atomicAdd(&count, 1);
        sk[kk + slot] = v;
        si[kk + slot] = gi;
      }
    }
    __syncthreads();
    const int cnt = count;
    __syncthreads();  // everyone has read count before anyone appends again
    if (cnt > kCandidates - static_cast<int>(blockDim.x)) merge_candidates(sk, si, kk, &count, &thr);
  }
  if (count > 0) merge_candidates(sk, si, kk, &count, &thr);
  for (int t = threadIdx.x; t < kk; t += blockDim.x) {
    bk[t] = sk[t];
    bi[t] = si[t];
  }
}

// Squared distance between query row r and candidate c, accumulated in
// float64 (one warp per candidate).
template <typename T>
__global__ void exact_kernel(const T* __restrict__ x, const T* __restrict__ q, int64_t D,
                             const int64_t* __restrict__ cand, int64_t total, int kk,
                             double* __restrict__ out) {
  const int64_t w = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (w >= total) return;
  const int64_t r = w / kk;
  const int64_t idx = cand[w];
  double s = 0.0;
  if (idx != INT64_MAX) {
    const T* xr = x + idx * D;
    const T* qr = q + r * D;
    for (int64_t d = lane; d < D; d += 32) {
      const double t = static_cast<double>(qr[d]) - static_cast<double>(xr[d]);
      s += t * t;
    }
  }
  for (int off = 16; off > 0; off >>= 1) s += __shfl_down_sync(0xffffffffu, s, off);
  if (lane == 0) out[w] = idx != INT64_MAX ? s : std::numeric_limits<double>::infinity();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> knn_cuda(const at::Tensor& data, const at::Tensor& queries,
                                            int64_t k, int64_t self_offset, bool squared,
                                            int64_t extra) {
  auto L = prepare_knn(data, queries, k, self_offset, extra, /*cuda=*/true);
  const int64_t N = data.size(0), M = queries.size(0), D = data.size(1);
  c10::cuda::CUDAGuard guard(data.device());
  const auto& x = L.x;
  const auto& q = L.q;
  auto& out_d = L.out_d;
  auto& out_i = L.out_i;
  if (M == 0) return {out_d, out_i};
  const int64_t kk = L.kk;
  const auto mean = x.mean(0, /*keepdim=*/true);
  const auto xc = (x - mean).contiguous();
  const auto qm2 = ((q - mean) * -2.0).contiguous();
  const auto xn = xc.pow(2).sum(1).contiguous();
  const bool is_float = x.scalar_type() == at::kFloat;
  if (is_float) {
    // The CPU kernel's range guard: !(norm <= limit) also catches the NaN of a
    // mean whose float32 sums overflowed. qm2 is -2 (q - mean): 4 |q - mean|^2.
    const double xmax = xn.max().item<double>();
    const double qmax = qm2.pow(2).sum(1).max().item<double>();
    if (!(xmax <= kKeyNormLimit) || !(qmax <= 4.0 * kKeyNormLimit)) {
      auto res = knn_cuda(x.to(at::kDouble), q.to(at::kDouble), k, self_offset, squared, extra);
      out_d.copy_(std::get<0>(res));
      out_i.copy_(std::get<1>(res));
      return {out_d, out_i};
    }
  }
  // float32 keys from a float64 GEMM where torch would use TF32 (see top).
  const bool gemm64 = is_float && reduced_float32_matmul();
  // Blocks of queries and tiles of data: a key matrix of at most 2^26 entries;
  // with gemm64 a float64 copy of one data tile of at most 2^25 entries too.
  const int64_t tile_max = gemm64 ? std::clamp<int64_t>((int64_t(1) << 25) / D, 1024, 65536) : 65536;
  const int64_t bd = std::min<int64_t>(N, tile_max);
  const int64_t bq = std::max<int64_t>(1, std::min<int64_t>(M, (int64_t(1) << 26) / bd));
  auto stream = c10::cuda::getCurrentCUDAStream();
  const bool fused = kk <= kMaxFused;
  const int cap = fused ? next_pow2(static_cast<int>(kk) + kCandidates) : 0;

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "knn_cuda", [&] {
    const scalar_t inf = std::numeric_limits<scalar_t>::infinity();
    const size_t smem = static_cast<size_t>(cap) * (sizeof(scalar_t) + sizeof(int64_t));
    if (fused && smem > 48 * 1024) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(select_kernel<scalar_t>,
                                          cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(smem)));
    }
    for (int64_t r0 = 0; r0 < M; r0 += bq) {
      const int64_t nr = std::min(bq, M - r0);
      auto best_k = at::full({nr, kk}, inf, x.options());
      auto best_i = at::full({nr, kk}, INT64_MAX, x.options().dtype(at::kLong));
      const auto qblk = gemm64 ? qm2.narrow(0, r0, nr).to(at::kDouble) : qm2.narrow(0, r0, nr);
      for (int64_t c0 = 0; c0 < N; c0 += bd) {
        const int64_t nc = std::min(bd, N - c0);
        auto g = gemm64 ? at::mm(qblk, xc.narrow(0, c0, nc).to(at::kDouble).t()).to(x.scalar_type()).contiguous()
                        : at::mm(qblk, xc.narrow(0, c0, nc).t()).contiguous();
        if (fused) {
          select_kernel<scalar_t><<<static_cast<unsigned>(nr), kSelectThreads, smem, stream>>>(
              g.data_ptr<scalar_t>(), nc, xn.data_ptr<scalar_t>(), c0,
              best_k.data_ptr<scalar_t>(), best_i.data_ptr<int64_t>(), static_cast<int>(kk), cap,
              self_offset >= 0 ? self_offset + r0 : -1);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        } else {
          // Large k': merge with at::topk over [running list | tile keys].
          auto keys = g + xn.narrow(0, c0, nc).unsqueeze(0);
          auto ids = at::arange(c0, c0 + nc, x.options().dtype(at::kLong)).unsqueeze(0).expand({nr, nc});
          if (self_offset >= 0) {
            auto self = at::arange(self_offset + r0, self_offset + r0 + nr,
                                   x.options().dtype(at::kLong)).unsqueeze(1);
            keys = keys.masked_fill(ids == self, inf);
          }
          auto allk = at::cat({best_k, keys}, 1);
          auto alli = at::cat({best_i, ids}, 1);
          auto top = at::topk(allk, kk, /*dim=*/1, /*largest=*/false, /*sorted=*/true);
          best_k = std::get<0>(top).contiguous();
          best_i = alli.gather(1, std::get<1>(top)).contiguous();
        }
      }
      // Exact squared distances of the candidates, then rank by (d2, index).
      auto d2 = at::empty({nr, kk}, x.options().dtype(at::kDouble));
      const int64_t total = nr * kk;
      const int64_t blocks = (total * 32 + kExactThreads - 1) / kExactThreads;
      exact_kernel<scalar_t><<<static_cast<unsigned>(blocks), kExactThreads, 0, stream>>>(
          x.data_ptr<scalar_t>(), q.data_ptr<scalar_t>() + r0 * D, D,
          best_i.data_ptr<int64_t>(), total, static_cast<int>(kk), d2.data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      auto by_index = std::get<1>(at::sort(best_i, /*stable=*/true, /*dim=*/1, /*descending=*/false));
      auto d2_i = d2.gather(1, by_index);
      auto ii = best_i.gather(1, by_index);
      auto by_dist = std::get<1>(at::sort(d2_i, /*stable=*/true, /*dim=*/1, /*descending=*/false))
                         .narrow(1, 0, k);
      auto dk = d2_i.gather(1, by_dist);
      out_d.narrow(0, r0, nr).copy_(squared ? dk : dk.sqrt());
      out_i.narrow(0, r0, nr).copy_(ii.gather(1, by_dist));
    }
  });
  return {out_d, out_i};
}

}  // namespace mmh
