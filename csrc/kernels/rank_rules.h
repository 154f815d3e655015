// Numerical-rank rules on singular values known only up to intervals.
// Torch-free and usable from host and device code.
//
// A matrix with k = min(m, n) singular values s_0 >= s_1 >= ... >= s_{k-1}
// is described by
//   s_i in [lo[i], hi[i]]   for i < l        (computed, with error bounds)
//   s_i in [0, tail]        for l <= i < k   (outside a randomized sketch)
// Exact values are the special case lo == hi, l == k.
//
// The gap and ratio rules first raise every value to the noise floor:
// s'_i = max(s_i, floor) (floor = rtol * s_0; the threshold rule uses its own
// threshold instead). Values at the floor are indistinguishable from each
// other (ratio 1, gap 0), and the ratio into the floor, s_i / floor, is
// finite: zeroing them instead would put an infinite ratio wherever a cluster
// of noise values happens to straddle the floor. A rule returns the rank the exact values would give and
// whether that answer is certified, i.e. the same for every spectrum inside
// the intervals; callers recompute uncertified matrices more accurately.
//
// Rules (0-based indices; rank = index of the decisive gap + 1):
//   gap       the normal-bundle reference rule: rank = argmax_i (s'_i - s'_{i+1}) + 1
//             over i = 0 .. k-2 (first maximum on ties); k = 1 gives 1.
//   threshold rank = #{ i : s_i > threshold }.
//   ratio     rank = argmax_i s'_i / s'_{i+1} + 1 when that largest ratio exceeds
//             min_ratio, else k (no significant gap: full rank). With a zero
//             floor (rtol = 0) x / 0 = inf for x > 0 and 0 / 0 = 1 (two zeros
//             are not a gap), so no NaN arises.
// The gap and ratio rules give 0 for a zero matrix (s'_0 = 0).
#pragma once

#include <cmath>
#include <cstdint>

#include "host_device.h"

namespace mmh {
namespace rank_rules {

enum Rule : int { kGap = 0, kThreshold = 1, kRatio = 2 };

struct Decision {
  int64_t rank;
  bool certified;
};

// The spectrum of one matrix as intervals (see the header comment).
struct Spectrum {
  const double* lo;
  const double* hi;
  int64_t l;    // number of computed intervals
  int64_t k;    // number of singular values, k >= l
  double tail;  // upper bound of s_i for i >= l

  MMH_HD double lo_at(int64_t i) const { return i < l ? lo[i] : 0.0; }
  MMH_HD double hi_at(int64_t i) const { return i < l ? hi[i] : tail; }
};

MMH_HD double floored(double x, double floor) { return x > floor ? x : floor; }

// x / y for the ratio rule: x / 0 = inf (x > 0), 0 / 0 = 1.
MMH_HD double ratio_div(double x, double y) {
  if (y > 0.0) return x / y;
  return x > 0.0 ? INFINITY : 1.0;
}

MMH_HD Decision threshold_rule(const Spectrum& s, double thr) {
  int64_t count = 0;
  bool cert = true;
  for (int64_t i = 0; i < s.l; ++i) {
    if (s.lo[i] > thr) {
      ++count;
    } else if (s.hi[i] > thr) {
      cert = false;  // the interval straddles the threshold
    }
  }
  if (s.k > s.l && s.tail > thr) cert = false;
  return {count, cert};
}

// Gap (absolute) and ratio rules share the scan: candidate gaps i = 0 .. last,
// last = min(k - 2, l - 1); gaps at i >= l (inside the tail) are bounded
// above by tail' - floor (gap) and tail' / floor (ratio).
MMH_HD Decision gap_or_ratio_rule(const Spectrum& s, double floor, int rule,
                                  double min_ratio, bool exact) {
  const double hi0 = floored(s.hi_at(0), floor);
  if (s.k == 0 || hi0 == 0.0) return {0, true};  // zero matrix (after the floor)
  const double lo0 = floored(s.lo_at(0), floor);
  const bool nonzero = exact || lo0 > 0.0;
  if (s.k == 1) return {1, nonzero};
  const double tail = floored(s.tail, floor);
  const bool ratio = rule == kRatio;
  const int64_t last = (s.k - 2 < s.l - 1) ? s.k - 2 : s.l - 1;
  // pick the best candidate by its lower bound (exact: by its value)
  int64_t best = 0;
  double best_lo = -INFINITY;
  for (int64_t i = 0; i <= last; ++i) {
    const double a = floored(s.lo_at(i), floor);
    const double b = floored(s.hi_at(i + 1), floor);
    double g = ratio ? ratio_div(a, b) : a - b;
    if (ratio && g < 1.0) g = 1.0;
    if (g > best_lo) {
      best_lo = g;
      best = i;
    }
  }
  if (exact) {
    if (ratio && !(best_lo > min_ratio)) return {s.k, true};
    return {best + 1, true};
  }
  // largest upper bound among the other candidates, tail gaps included
  double other_hi = -INFINITY, all_hi = -INFINITY;
  for (int64_t i = 0; i <= last; ++i) {
    const double a = floored(s.hi_at(i), floor);
    const double b = floored(s.lo_at(i + 1), floor);
    const double g = ratio ? ratio_div(a, b) : a - b;
    if (g > all_hi) all_hi = g;
    if (i != best && g > other_hi) other_hi = g;
  }
  if (s.k - 2 >= s.l) {  // gaps between two tail values
    const double bottom = floored(0.0, floor);  // a tail value can sit at the floor
    const double g = ratio ? ratio_div(tail, bottom) : tail - bottom;
    if (g > all_hi) all_hi = g;
    if (g > other_hi) other_hi = g;
  }
  if (!nonzero) return {best + 1, false};
  if (ratio) {
    if (best_lo > min_ratio && best_lo > other_hi) return {best + 1, true};
    if (all_hi <= min_ratio) return {s.k, true};
    return {best + 1, false};
  }
  return {best + 1, best_lo > other_hi};
}

// One matrix: rule 0 gap, 1 threshold, 2 ratio.
MMH_HD Decision decide(const Spectrum& s, int rule, double floor, double thr,
                       double min_ratio, bool exact) {
  if (rule == kThreshold) return threshold_rule(s, thr);
  return gap_or_ratio_rule(s, floor, rule, min_ratio, exact);
}

}  // namespace rank_rules
}  // namespace mmh
