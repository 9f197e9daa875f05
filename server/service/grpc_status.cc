#include "server/service/grpc_status.h"

#include <string>
#include <utility>

namespace cds::service {

grpc::Status ToGrpcStatus(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  int code = static_cast<int>(status.code());
  // absl and gRPC share the canonical codes 0..16; anything else is not ours to invent.
  if (code < 0 || code > static_cast<int>(grpc::StatusCode::UNAUTHENTICATED)) {
    code = static_cast<int>(grpc::StatusCode::UNKNOWN);
  }
  std::string message(status.message().substr(0, kMaxStatusMessageChars));
  if (status.message().size() > kMaxStatusMessageChars) message += "...";
  return grpc::Status(static_cast<grpc::StatusCode>(code), std::move(message));
}

}  // namespace cds::service
