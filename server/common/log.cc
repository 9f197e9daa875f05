#include "server/common/log.h"

#include <atomic>
#include <cstdio>

#include "absl/strings/ascii.h"
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

// JSON string escaping (RFC 8259 section 7): quote, backslash and control characters.
void AppendJsonString(absl::string_view text, std::string* out) {
  out->push_back('"');
  for (const char c : text) {
    switch (c) {
      case '"': out->append("\\\""); break;
      case '\\': out->append("\\\\"); break;
      case '\n': out->append("\\n"); break;
      case '\r': out->append("\\r"); break;
      case '\t': out->append("\\t"); break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          static constexpr char kHex[] = "0123456789abcdef";
          out->append("\\u00");
          out->push_back(kHex[(c >> 4) & 0xf]);
          out->push_back(kHex[c & 0xf]);
        } else {
          out->push_back(c);
        }
    }
  }
  out->push_back('"');
}

}  // namespace

void SetMinLevel(Level level) { min_level.store(static_cast<int>(level)); }

bool ParseLevel(absl::string_view text, Level* level) {
  const std::string lower = absl::AsciiStrToLower(text);
  if (lower == "debug") *level = Level::kDebug;
  else if (lower == "info") *level = Level::kInfo;
  else if (lower == "warning") *level = Level::kWarning;
  else if (lower == "error") *level = Level::kError;
  else return false;
  return true;
}

std::string FormatLine(Level level, absl::string_view time, absl::string_view message) {
  std::string line = "{\"time\":";
  AppendJsonString(time, &line);
  absl::StrAppend(&line, ",\"level\":\"", LevelName(level), "\",\"message\":");
  AppendJsonString(message, &line);
  line.append("}\n");
  return line;
}

void Write(Level level, const std::string& message) {
  if (static_cast<int>(level) < min_level.load(std::memory_order_relaxed)) return;
  const std::string line = FormatLine(
      level, absl::FormatTime("%Y-%m-%dT%H:%M:%E3SZ", absl::Now(), absl::UTCTimeZone()),
      message);
  // One fwrite per line keeps lines from interleaving between threads.
  std::fwrite(line.data(), 1, line.size(), stderr);
}

}  // namespace cds::log
