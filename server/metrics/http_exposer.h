#pragma once

// Serves a registry over plain HTTP for Prometheus: GET /metrics in the text exposition
// format, on its own port (metrics carry no patient data, and scrapers rarely speak mTLS).
// Uses cpp-httplib (Debian's libcpp-httplib-dev) on one background thread.

#include <memory>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "server/metrics/registry.h"

namespace httplib {
class Server;
}

namespace cds::metrics {

class HttpExposer {
 public:
  // Listens on "host:port" (port 0 picks a free one) and serves until destroyed.
  // Borrows the registry, which must outlive this.
  static absl::StatusOr<std::unique_ptr<HttpExposer>> Start(const std::string& address,
                                                            const Registry& registry);
  ~HttpExposer();
  HttpExposer(const HttpExposer&) = delete;
  HttpExposer& operator=(const HttpExposer&) = delete;

  int port() const { return port_; }

 private:
  HttpExposer() = default;
  std::unique_ptr<httplib::Server> server_;
  std::thread thread_;
  int port_ = 0;
};

}  // namespace cds::metrics
