#pragma once

// A tiny logging shim: one JSON object per line on stderr, for log collectors:
//   {"time":"2026-11-23T23:50:00.123Z","level":"INFO","message":"..."}
// Never pass patient data (references, codes, values) to it: log rule-set names,
// versions, counts, status codes and durations only.

#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"

namespace cds::log {

enum class Level { kDebug = 0, kInfo = 1, kWarning = 2, kError = 3 };

// Lines below this level are dropped (default kInfo). Thread-safe.
void SetMinLevel(Level level);
// "debug", "info", "warning" or "error" (any case); false for anything else.
bool ParseLevel(absl::string_view text, Level* level);
// The line Write emits, newline included (exposed for tests).
std::string FormatLine(Level level, absl::string_view time, absl::string_view message);
void Write(Level level, const std::string& message);

template <typename... Args>
void Debug(const Args&... args) {
  Write(Level::kDebug, absl::StrCat(args...));
}
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
