#include "server/service/noop_service.h"

#include "absl/status/status.h"
#include "server/service/decision_service.h"
#include "server/service/grpc_status.h"

namespace cds::service {

grpc::ServerUnaryReactor* NoopDecisionService::Evaluate(grpc::CallbackServerContext* context,
                                                        const cds::v1::EvaluateRequest* request,
                                                        cds::v1::EvaluateResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  std::shared_ptr<const cds::v1::EvaluateResponse> canned;
  {
    absl::ReaderMutexLock lock(&mu_);
    canned = canned_;
  }
  if (canned != nullptr) {
    *response = *canned;
    reactor->Finish(grpc::Status::OK);
    return reactor;
  }
  const absl::Status status = EvaluateOnce(store_, *request, response);
  if (status.ok()) {
    absl::MutexLock lock(&mu_);
    if (canned_ == nullptr) canned_ = std::make_shared<const cds::v1::EvaluateResponse>(*response);
  }
  reactor->Finish(ToGrpcStatus(status));
  return reactor;
}

}  // namespace cds::service
