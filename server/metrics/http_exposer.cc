#include "server/metrics/http_exposer.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "httplib.h"
#include "server/common/host_port.h"

namespace cds::metrics {

absl::StatusOr<std::unique_ptr<HttpExposer>> HttpExposer::Start(const std::string& address,
                                                                const Registry& registry) {
  absl::StatusOr<common::HostPort> parsed = common::ParseHostPort(address, "--metrics_listen");
  if (!parsed.ok()) return parsed.status();
  const std::string host = common::Unbracketed(parsed->host);
  const int port = parsed->port;
  std::unique_ptr<HttpExposer> exposer(new HttpExposer());
  exposer->server_ = std::make_unique<httplib::Server>();
  exposer->server_->Get("/metrics", [&registry](const httplib::Request&, httplib::Response& res) {
    res.set_content(registry.Render(), "text/plain; version=0.0.4; charset=utf-8");
  });
  exposer->port_ = port == 0 ? exposer->server_->bind_to_any_port(host)
                             : (exposer->server_->bind_to_port(host, port) ? port : -1);
  if (exposer->port_ <= 0) {
    return absl::UnavailableError(absl::StrCat("cannot listen for metrics on ", address));
  }
  httplib::Server* server = exposer->server_.get();
  exposer->thread_ = std::thread([server] { server->listen_after_bind(); });
  return exposer;
}

HttpExposer::~HttpExposer() {
  if (server_ != nullptr) server_->stop();
  if (thread_.joinable()) thread_.join();
}

}  // namespace cds::metrics
