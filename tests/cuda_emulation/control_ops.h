// The emulator's controls as ops of the module's own library (torch.ops.<library>.emu_*), so
// that Python reaches them without a pybind11 module (which would cost a slow compile).
// Included by the registration file that build.py generates.
#pragma once

#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "cuda_emulation.h"

namespace cuda_emu {

inline void register_control_ops(torch::Library& m) {
  m.def("emu_configure(int? seed=None, int? workers=None, bool? allow_exited_lanes=None) -> ()",
        [](std::optional<int64_t> seed, std::optional<int64_t> workers,
           std::optional<bool> allow_exited_lanes) {
          if (workers) set_workers(static_cast<int>(*workers));
          if (allow_exited_lanes) set_allow_exited_lanes(*allow_exited_lanes);
          if (seed) set_seed(static_cast<uint64_t>(*seed));
        });
  // [seed, workers, allow_exited_lanes]
  m.def("emu_config() -> int[]", []() {
    const Config c = config();
    return std::vector<int64_t>{static_cast<int64_t>(c.seed), c.workers, c.allow_exited_lanes};
  });
  m.def("emu_counter_names() -> str[]", []() {
    std::vector<std::string> names;
    for (const auto& [name, value] : counters()) names.emplace_back(name);
    return names;
  });
  m.def("emu_counters() -> int[]", []() {
    std::vector<int64_t> values;
    for (const auto& [name, value] : counters()) values.push_back(static_cast<int64_t>(value));
    return values;
  });
  m.def("emu_reset_counters() -> ()", []() { reset_counters(); });
}

}  // namespace cuda_emu
