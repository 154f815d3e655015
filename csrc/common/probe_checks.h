// Range check of the probe counter, shared by the CPU and CUDA launchers.
#pragma once

#include <cstdint>

#include "../kernels/philox.h"
#include "checks.h"

namespace mmh {

// Probes [probe_begin, probe_begin + n_probes) of numel elements must fit the
// Philox counter (kernels/philox.h): a key outside it is refused, never
// truncated into another key's stream. Call after probe_begin >= 0 is checked.
inline void check_counter_range(int64_t probe_begin, int64_t n_probes, int64_t numel) {
  MMH_CHECK_VALUE(philox::within_limits(probe_begin, n_probes, numel),
                  "probe indices [probe_begin, probe_begin + n_probes) = [", probe_begin, ", ",
                  probe_begin, " + ", n_probes, ") must be < 2^34 and numel (", numel,
                  ") <= 2^32: the Philox counter has no room for larger keys");
}

}  // namespace mmh
