// Hutchinson probes on the CPU: counter-based generation and the fused
// v . (A v) reduction, parallel over fixed-size chunks so that the summation
// order (and hence every bit of the result) does not depend on thread count.
#include "hutchinson_cpu.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

#include "../common/checks.h"
#include "../common/probe_checks.h"
#include "../kernels/philox.h"

namespace mmh {
namespace {

constexpr int64_t kChunk = 1 << 14;  // elements per reduction chunk (multiple of 4)

void check_common(const at::Tensor& sample_ids, int64_t probe_begin,
                  int64_t n_probes, int64_t numel, int64_t seed, int64_t kind) {
  MMH_CHECK_DIM(sample_ids, 1, "sample_ids");
  MMH_CHECK_TYPE(sample_ids.scalar_type() == at::kLong,
                 "sample_ids must be int64, got ", sample_ids.scalar_type());
  MMH_CHECK_CPU(sample_ids, "sample_ids");
  MMH_CHECK_VALUE(probe_begin >= 0, "probe_begin must be >= 0, got ", probe_begin);
  MMH_CHECK_VALUE(kind == 0 || kind == 1,
                  "probe kind must be 0 (rademacher) or 1 (gaussian), got ", kind);
  check_counter_range(probe_begin, n_probes, numel);
  (void)seed;
}

}  // namespace

at::Tensor hutchinson_probes_cpu(const at::Tensor& sample_ids, int64_t numel,
                                 int64_t probe_begin, int64_t n_probes,
                                 int64_t seed, int64_t kind,
                                 at::ScalarType dtype) {
  MMH_CHECK_VALUE(numel > 0, "numel must be positive, got ", numel);
  MMH_CHECK_VALUE(n_probes > 0, "n_probes must be positive, got ", n_probes);
  check_common(sample_ids, probe_begin, n_probes, numel, seed, kind);
  MMH_CHECK_TYPE(at::isFloatingType(dtype), "probe dtype must be floating, got ", dtype);
  const auto ids = sample_ids.contiguous();
  const int64_t B = ids.size(0);
  auto out = at::empty({n_probes, B, numel}, ids.options().dtype(dtype));
  if (B == 0) return out;
  const int64_t* id_ptr = ids.data_ptr<int64_t>();
  const int64_t blocks = (numel + 3) / 4;
  const int64_t rows = n_probes * B;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "hutchinson_probes_cpu", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows * blocks, 1024, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t row = i / blocks, blk = i % blocks;
        const int64_t p = row / B, b = row % B;
        const auto w = philox::block_words(static_cast<uint64_t>(seed),
                                           static_cast<uint64_t>(id_ptr[b]),
                                           static_cast<uint64_t>(probe_begin + p),
                                           static_cast<uint64_t>(blk));
        double v[4];
        philox::block_values(w, static_cast<int>(kind), v);
        scalar_t* dst = o + row * numel + blk * 4;
        const int64_t n = std::min<int64_t>(4, numel - blk * 4);
        for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<scalar_t>(v[j]);
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> hutchinson_reduce_cpu(
    const at::Tensor& av, const at::Tensor& sample_ids, int64_t probe_begin,
    int64_t seed, int64_t kind) {
  MMH_CHECK_DIM(av, 3, "av");
  check_common(sample_ids, probe_begin, av.size(0), av.size(2), seed, kind);
  MMH_CHECK_FLOATING(av, "av");
  MMH_CHECK_CPU(av, "av");
  MMH_CHECK_VALUE(av.size(1) == sample_ids.size(0), "av has ", av.size(1),
                  " samples but sample_ids has ", sample_ids.size(0));
  const auto a = av.contiguous();
  const auto ids = sample_ids.contiguous();
  const int64_t P = a.size(0), B = a.size(1), n = a.size(2);
  const auto f64 = a.options().dtype(at::kDouble);
  auto dots = at::zeros({P, B}, f64);
  if (P == 0 || B == 0 || n == 0) {
    auto nan = at::full({B}, NAN, f64);
    return {P == 0 ? nan : dots.mean(0), nan, dots};
  }
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  std::vector<double> partial(static_cast<size_t>(P * B * chunks), 0.0);
  const int64_t* id_ptr = ids.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "hutchinson_reduce_cpu", [&] {
    const scalar_t* src = a.data_ptr<scalar_t>();
    at::parallel_for(0, P * B * chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t row = i / chunks, c = i % chunks;
        const int64_t p = row / B, b = row % B;
        const int64_t e0 = c * kChunk, e1 = std::min<int64_t>(n, e0 + kChunk);
        const scalar_t* x = src + row * n;
        double acc = 0.0;
        for (int64_t e = e0; e < e1; e += 4) {
          const auto w = philox::block_words(static_cast<uint64_t>(seed),
                                             static_cast<uint64_t>(id_ptr[b]),
                                             static_cast<uint64_t>(probe_begin + p),
                                             static_cast<uint64_t>(e / 4));
          double v[4];
          philox::block_values(w, static_cast<int>(kind), v);
          const int64_t m = std::min<int64_t>(4, e1 - e);
          for (int64_t j = 0; j < m; ++j) acc += v[j] * static_cast<double>(x[e + j]);
        }
        partial[static_cast<size_t>(i)] = acc;
      }
    });
  });
  double* d = dots.data_ptr<double>();
  for (int64_t row = 0; row < P * B; ++row) {
    double s = 0.0;
    for (int64_t c = 0; c < chunks; ++c) s += partial[static_cast<size_t>(row * chunks + c)];
    d[row] = s;
  }
  auto mean = dots.mean(0);
  auto stderr_ = P > 1 ? (dots.std(0, /*unbiased=*/true) / std::sqrt(static_cast<double>(P)))
                       : at::full({B}, NAN, f64);
  return {mean, stderr_, dots};
}

}  // namespace mmh
