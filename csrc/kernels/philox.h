// Counter-based random numbers for Hutchinson probes (Philox4x32-10,
// Salmon et al., SC'11). Torch-free and usable from host and device code.
//
// Every probe entry is a pure function of (seed, sample id, probe index,
// element index): a sample's probes never depend on the batch it is in or on
// the order in which samples or probes are visited, and CPU, CUDA and the
// plain-PyTorch reference produce the same bits.
//
// Counter layout for element e of probe p of sample s (one Philox call gives
// four 32-bit words, i.e. four consecutive elements; block = e / 4):
//   c0 = block | (p >> 32) << 30, c1 = low 32 bits of p,
//   c2 = low 32 bits of s, c3 = high 32 bits of s,
//   key = (low 32 bits of seed, high 32 bits of seed).
// The 192 input bits of Philox4x32 (128 counter + 64 key) hold the whole
// 64-bit seed, the whole 64-bit sample id, a 34-bit probe index and a 30-bit
// block index, and distinct (seed, s, p, block) give distinct inputs: no two
// keys alias. A 64-bit probe index cannot fit beside the element index, so
// probe indices >= 2^34 (kProbeLimit) and probes of more than 2^32 elements
// (kNumelLimit) are rejected by the callers (within_limits), never truncated.
// For p < 2^32 the layout is the earlier (block, p, s, seed) one, so every
// probe of index < 2^32 keeps its values.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define MMH_HD __host__ __device__ __forceinline__
#define MMH_UNROLL _Pragma("unroll")
#else
#define MMH_HD inline
#define MMH_UNROLL
#endif

namespace mmh {
namespace philox {

constexpr uint32_t kM0 = 0xD2511F53u;
constexpr uint32_t kM1 = 0xCD9E8D57u;
constexpr uint32_t kW0 = 0x9E3779B9u;
constexpr uint32_t kW1 = 0xBB67AE85u;

struct U32x4 {
  uint32_t v[4];
};

MMH_HD void mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
}

MMH_HD U32x4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                           uint32_t k0, uint32_t k1) {
MMH_UNROLL
  for (int r = 0; r < 10; ++r) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo(kM0, c0, hi0, lo0);
    mulhilo(kM1, c2, hi1, lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += kW0;
    k1 += kW1;
  }
  U32x4 out;
  out.v[0] = c0;
  out.v[1] = c1;
  out.v[2] = c2;
  out.v[3] = c3;
  return out;
}

constexpr int kBlockBits = 30;
constexpr uint64_t kProbeLimit = uint64_t{1} << (64 - kBlockBits);  // probe indices < 2^34
constexpr uint64_t kNumelLimit = uint64_t{4} << kBlockBits;         // elements per probe <= 2^32

// True when probes [probe_begin, probe_begin + n_probes) of numel elements
// each have a counter (see the layout above). All arguments are >= 0.
inline bool within_limits(int64_t probe_begin, int64_t n_probes, int64_t numel) {
  return static_cast<uint64_t>(numel) <= kNumelLimit &&
         static_cast<uint64_t>(probe_begin) < kProbeLimit &&
         static_cast<uint64_t>(n_probes) <= kProbeLimit - static_cast<uint64_t>(probe_begin);
}

// The four words that cover elements [4 * block, 4 * block + 4); requires
// probe < kProbeLimit and block < 2^kBlockBits (within_limits).
MMH_HD U32x4 block_words(uint64_t seed, uint64_t sample, uint64_t probe,
                         uint64_t block) {
  const uint32_t c0 = static_cast<uint32_t>(block | ((probe >> 32) << kBlockBits));
  return philox4x32_10(c0, static_cast<uint32_t>(probe),
                       static_cast<uint32_t>(sample),
                       static_cast<uint32_t>(sample >> 32),
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// Rademacher value (+1 / -1) from the top bit of a word.
MMH_HD double rademacher(uint32_t w) { return (w >> 31) ? -1.0 : 1.0; }

// Uniform in the open interval (0, 1) from a 32-bit word.
MMH_HD double open_uniform(uint32_t w) {
  return (static_cast<double>(w) + 0.5) * 2.3283064365386963e-10;  // 2^-32
}

// Four values of one block. kind 0: Rademacher; kind 1: standard Gaussian by
// Box-Muller on the word pairs (0, 1) and (2, 3), evaluated in double.
MMH_HD void block_values(const U32x4& w, int kind, double out[4]) {
  if (kind == 0) {
MMH_UNROLL
    for (int i = 0; i < 4; ++i) out[i] = rademacher(w.v[i]);
    return;
  }
  constexpr double kTwoPi = 6.283185307179586476925286766559;
MMH_UNROLL
  for (int pair = 0; pair < 2; ++pair) {
    const double u1 = open_uniform(w.v[2 * pair]);
    const double u2 = open_uniform(w.v[2 * pair + 1]);
    const double r = sqrt(-2.0 * log(u1));
    const double th = kTwoPi * u2;
    out[2 * pair] = r * cos(th);
    out[2 * pair + 1] = r * sin(th);
  }
}

}  // namespace philox
}  // namespace mmh
