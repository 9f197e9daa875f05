#include "server/service/noop_service.h"

#include "absl/status/status.h"
#include "google/protobuf/arena.h"
#include "server/service/grpc_status.h"

namespace cds::service {

grpc::ServerUnaryReactor* NoopDecisionService::Evaluate(grpc::CallbackServerContext* context,
                                                        const grpc::ByteBuffer* request_bytes,
                                                        grpc::ByteBuffer* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  // Parsed as the real service parses it (same arena), so that only the evaluation differs.
  StackArenaRequest<cds::v1::EvaluateRequest> request;
  if (grpc::Status parsed = request.Parse(*request_bytes); !parsed.ok()) {
    reactor->Finish(parsed);
    return reactor;
  }
  {
    absl::ReaderMutexLock lock(&mu_);
    if (canned_.has_value()) {
      grpc::Slice shared = *canned_;  // a reference, not a copy of the bytes
      *response = grpc::ByteBuffer(&shared, 1);
      reactor->Finish(grpc::Status::OK);
      return reactor;
    }
  }
  auto* evaluated =
      google::protobuf::Arena::CreateMessage<cds::v1::EvaluateResponse>(&request.arena());
  const absl::Status status = EvaluateOnce(store_, request.request(), evaluated);
  if (status.ok()) {
    const std::string bytes = evaluated->SerializeAsString();
    grpc::Slice slice(bytes);
    *response = grpc::ByteBuffer(&slice, 1);
    absl::MutexLock lock(&mu_);
    if (!canned_.has_value()) canned_ = slice;
  }
  reactor->Finish(ToGrpcStatus(status));
  return reactor;
}

}  // namespace cds::service
