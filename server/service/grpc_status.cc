#include "server/service/grpc_status.h"

#include <string>
#include <utility>

#include "absl/strings/cord.h"
#include "google/rpc/error_details.pb.h"
#include "google/rpc/status.pb.h"
#include "server/service/request_validation.h"

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
  if (code != static_cast<int>(grpc::StatusCode::INVALID_ARGUMENT)) {
    return grpc::Status(static_cast<grpc::StatusCode>(code), std::move(message));
  }
  google::rpc::Status details;
  details.set_code(code);
  details.set_message(message);
  google::protobuf::Any* any = details.add_details();
  any->set_type_url(kBadRequestTypeUrl);
  if (auto payload = status.GetPayload(kBadRequestTypeUrl); payload.has_value()) {
    any->set_value(std::string(*payload));
  } else {
    google::rpc::BadRequest bad_request;
    const FieldViolation violation = ViolationFromMessage(message, "");
    google::rpc::BadRequest::FieldViolation* fv = bad_request.add_field_violations();
    fv->set_field(violation.field);
    fv->set_description(violation.description);
    any->set_value(bad_request.SerializeAsString());
  }
  return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, message, details.SerializeAsString());
}

}  // namespace cds::service
