#pragma once

// The one place an absl::Status becomes a grpc::Status (as TF Serving's
// grpc_status_util.cc): the codes are numerically equal, and the message is capped so a
// long error cannot bloat a response or a client's log.

#include <cstddef>

#include "absl/status/status.h"
#include "grpcpp/support/status.h"

namespace cds::service {

inline constexpr size_t kMaxStatusMessageChars = 512;

grpc::Status ToGrpcStatus(const absl::Status& status);

}  // namespace cds::service
