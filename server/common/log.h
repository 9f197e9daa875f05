#pragma once

// A tiny logging shim: one line per event on stderr, "LEVEL time message". Never pass
// patient data (references, codes, values) to it: log rule-set names, versions, counts,
// status codes and durations only.

#include <string>

#include "absl/strings/str_cat.h"

namespace cds::log {

enum class Level { kDebug = 0, kInfo = 1, kWarning = 2, kError = 3 };

// Lines below this level are dropped (default kInfo). Thread-safe.
void SetMinLevel(Level level);
void Write(Level level, const std::string& message);

template <typename... Args>
void Info(const Args&... args) {
  Write(Level::kInfo, absl::StrCat(args...));
}
template <typename... Args>
void Warning(const Args&... args) {
  Write(Level::kWarning, absl::StrCat(args...));
}
template <typename... Args>
void Error(const Args&... args) {
  Write(Level::kError, absl::StrCat(args...));
}

}  // namespace cds::log
