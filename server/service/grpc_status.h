#pragma once

// The one place an absl::Status becomes a grpc::Status (as TF Serving's
// grpc_status_util.cc): the codes are numerically equal, and the message is capped so a
// long error cannot bloat a response or a client's log. INVALID_ARGUMENT always carries
// google.rpc.Status details (the `grpc-status-details-bin` trailer) holding a
// google.rpc.BadRequest: the one attached to the absl::Status as a kBadRequestTypeUrl
// payload, else one field violation read from the message ("<field path> <problem>").

#include <cstddef>

#include "absl/status/status.h"
#include "grpcpp/support/status.h"

namespace cds::service {

inline constexpr size_t kMaxStatusMessageChars = 512;
inline constexpr char kBadRequestTypeUrl[] = "type.googleapis.com/google.rpc.BadRequest";

grpc::Status ToGrpcStatus(const absl::Status& status);

}  // namespace cds::service
