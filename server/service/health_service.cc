#include "server/service/health_service.h"

#include <algorithm>
#include <utility>

namespace cds::service {

using grpc::health::v1::HealthCheckRequest;
using grpc::health::v1::HealthCheckResponse;

// One Watch call. Writes one status at a time: a change that arrives while a write is in
// flight replaces any change still waiting (watchers want the latest status, not every
// one), and Finish waits for the write in flight. Deletes itself in OnDone.
class HealthService::Watcher final : public grpc::ServerWriteReactor<HealthCheckResponse> {
 public:
  Watcher(HealthService& health, std::string service)
      : health_(health), service_(std::move(service)) {}

  const std::string& service() const { return service_; }

  void Send(ServingStatus status) ABSL_LOCKS_EXCLUDED(mu_) {
    absl::MutexLock lock(&mu_);
    if (finishing_) return;
    if (writing_) {
      pending_ = status;
      has_pending_ = true;
      return;
    }
    WriteLocked(status);
  }

  void End(grpc::Status status) ABSL_LOCKS_EXCLUDED(mu_) {
    absl::MutexLock lock(&mu_);
    if (finishing_) return;
    finishing_ = true;
    if (writing_) {
      final_status_ = std::move(status);  // finished in OnWriteDone
      return;
    }
    Finish(std::move(status));
  }

  void OnWriteDone(bool ok) override ABSL_LOCKS_EXCLUDED(mu_) {
    absl::MutexLock lock(&mu_);
    writing_ = false;
    if (finishing_) {
      Finish(final_status_);
      return;
    }
    if (!ok) {  // the client went away
      finishing_ = true;
      Finish(grpc::Status::OK);
      return;
    }
    if (has_pending_) {
      has_pending_ = false;
      WriteLocked(pending_);
    }
  }

  void OnCancel() override { End(grpc::Status::CANCELLED); }

  void OnDone() override {
    health_.Remove(this);
    delete this;
  }

 private:
  void WriteLocked(ServingStatus status) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    response_.set_status(status);
    writing_ = true;
    StartWrite(&response_);
  }

  HealthService& health_;
  const std::string service_;
  absl::Mutex mu_;
  HealthCheckResponse response_ ABSL_GUARDED_BY(mu_);
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool finishing_ ABSL_GUARDED_BY(mu_) = false;
  bool has_pending_ ABSL_GUARDED_BY(mu_) = false;
  ServingStatus pending_ ABSL_GUARDED_BY(mu_) = HealthCheckResponse::UNKNOWN;
  grpc::Status final_status_ ABSL_GUARDED_BY(mu_);
};

HealthService::HealthService(std::vector<std::string> services) : services_(std::move(services)) {}

HealthService::~HealthService() { Shutdown(); }

HealthService::ServingStatus HealthService::StatusLocked(const std::string& service) const {
  if (std::find(services_.begin(), services_.end(), service) == services_.end()) {
    return HealthCheckResponse::SERVICE_UNKNOWN;
  }
  return serving_ ? HealthCheckResponse::SERVING : HealthCheckResponse::NOT_SERVING;
}

void HealthService::SetServing(bool serving) {
  absl::MutexLock lock(&mu_);
  if (shut_down_ || serving_ == serving) return;
  serving_ = serving;
  // Watchers remove themselves under mu_ (in OnDone) before deleting themselves, so every
  // one in the set is alive here.
  for (Watcher* watcher : watchers_) watcher->Send(StatusLocked(watcher->service()));
}

void HealthService::Shutdown() {
  absl::MutexLock lock(&mu_);
  if (shut_down_) return;
  shut_down_ = true;
  serving_ = false;
  for (Watcher* watcher : watchers_) {
    watcher->Send(StatusLocked(watcher->service()));
    watcher->End(grpc::Status(grpc::StatusCode::UNAVAILABLE, "the server is shutting down"));
  }
}

void HealthService::Remove(Watcher* watcher) {
  absl::MutexLock lock(&mu_);
  watchers_.erase(watcher);
}

grpc::ServerUnaryReactor* HealthService::Check(grpc::CallbackServerContext* context,
                                               const HealthCheckRequest* request,
                                               HealthCheckResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  ServingStatus status;
  {
    absl::ReaderMutexLock lock(&mu_);
    status = StatusLocked(request->service());
  }
  if (status == HealthCheckResponse::SERVICE_UNKNOWN) {
    reactor->Finish(grpc::Status(grpc::StatusCode::NOT_FOUND, "unknown service name"));
  } else {
    response->set_status(status);
    reactor->Finish(grpc::Status::OK);
  }
  return reactor;
}

grpc::ServerWriteReactor<HealthCheckResponse>* HealthService::Watch(
    grpc::CallbackServerContext* /*context*/, const HealthCheckRequest* request) {
  auto* watcher = new Watcher(*this, request->service());
  absl::MutexLock lock(&mu_);
  watcher->Send(StatusLocked(request->service()));
  if (shut_down_) {
    watcher->End(grpc::Status(grpc::StatusCode::UNAVAILABLE, "the server is shutting down"));
  } else {
    watchers_.insert(watcher);
  }
  return watcher;
}

}  // namespace cds::service
