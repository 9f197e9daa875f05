#include "server/common/log.h"

#include <atomic>
#include <cstdio>

#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace cds::log {
namespace {

std::atomic<int> min_level{static_cast<int>(Level::kInfo)};

const char* LevelName(Level level) {
  switch (level) {
    case Level::kDebug: return "DEBUG";
    case Level::kInfo: return "INFO";
    case Level::kWarning: return "WARNING";
    case Level::kError: return "ERROR";
  }
  return "?";
}

}  // namespace

void SetMinLevel(Level level) { min_level.store(static_cast<int>(level)); }

void Write(Level level, const std::string& message) {
  if (static_cast<int>(level) < min_level.load(std::memory_order_relaxed)) return;
  const std::string line =
      absl::StrCat(LevelName(level), " ",
                   absl::FormatTime("%Y-%m-%dT%H:%M:%E3SZ", absl::Now(), absl::UTCTimeZone()),
                   " ", message, "\n");
  // One fwrite per line keeps lines from interleaving between threads.
  std::fwrite(line.data(), 1, line.size(), stderr);
}

}  // namespace cds::log
