#pragma once

// "HOST:PORT" addresses as the server's flags take them (--listen, --metrics_listen):
// "127.0.0.1:50051", "localhost:0", "[::1]:9090". One parser, so that every flag accepts
// and refuses the same spellings.

#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace cds::common {

struct HostPort {
  std::string host;  // as written: brackets kept around an IPv6 literal ("[::1]")
  int port = 0;      // 0..65535; 0 asks the system for a free port
};

// Splits `address` at its last colon. INVALID_ARGUMENT "<flag> must be HOST:PORT, got
// '<address>'" when the host is empty or the port is not a number in 0..65535.
absl::StatusOr<HostPort> ParseHostPort(absl::string_view address, absl::string_view flag);

// The host without the brackets of an IPv6 literal ("[::1]" -> "::1"), for socket APIs.
std::string Unbracketed(absl::string_view host);

}  // namespace cds::common
