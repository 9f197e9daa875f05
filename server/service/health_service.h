#pragma once

// grpc.health.v1.Health, our own instead of gRPC's default service: gRPC's starts out
// SERVING the moment the server starts and can only be corrected afterwards, so a probe
// could see SERVING before any rule set was loaded. This one starts NOT_SERVING and
// serves the names it is given ("" for the whole server, and each service's full name).
//   Check: the current status; NOT_FOUND for a name it does not serve (as the protocol says).
//   Watch: the current status, then every change; SERVICE_UNKNOWN for an unknown name.
// Shutdown() sends NOT_SERVING and ends every Watch, so that watchers do not hold up the
// server's shutdown. Thread-safe.

#include <set>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "grpc/health/v1/health.grpc.pb.h"

namespace cds::service {

class HealthService final : public grpc::health::v1::Health::CallbackService {
 public:
  using ServingStatus = grpc::health::v1::HealthCheckResponse::ServingStatus;

  explicit HealthService(std::vector<std::string> services);
  ~HealthService() override;

  // Every served name becomes SERVING or NOT_SERVING (ignored after Shutdown).
  void SetServing(bool serving) ABSL_LOCKS_EXCLUDED(mu_);
  void Shutdown() ABSL_LOCKS_EXCLUDED(mu_);

  grpc::ServerUnaryReactor* Check(grpc::CallbackServerContext* context,
                                  const grpc::health::v1::HealthCheckRequest* request,
                                  grpc::health::v1::HealthCheckResponse* response) override;
  grpc::ServerWriteReactor<grpc::health::v1::HealthCheckResponse>* Watch(
      grpc::CallbackServerContext* context,
      const grpc::health::v1::HealthCheckRequest* request) override;

 private:
  class Watcher;
  // The status of `service`, or SERVICE_UNKNOWN.
  ServingStatus StatusLocked(const std::string& service) const ABSL_SHARED_LOCKS_REQUIRED(mu_);
  void Remove(Watcher* watcher) ABSL_LOCKS_EXCLUDED(mu_);

  const std::vector<std::string> services_;
  mutable absl::Mutex mu_;
  bool serving_ ABSL_GUARDED_BY(mu_) = false;
  bool shut_down_ ABSL_GUARDED_BY(mu_) = false;
  std::set<Watcher*> watchers_ ABSL_GUARDED_BY(mu_);
};

}  // namespace cds::service
