#pragma once

// Request checks of the service layer that report every problem at once (up to
// kMaxViolations), each as a google.rpc.BadRequest field violation: the request's own
// fields (rule set, version, label) here, the patient's by engine::CheckPatient
// (server/engine/patient_check.h, the one definition of the limits and rules). Descriptions
// name the rule broken, never the offending value, so no patient data reaches an error
// message. Thread-safe (pure functions).

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "cds/v1/service.pb.h"
#include "server/engine/patient_check.h"

namespace cds::service {

using FieldViolation = engine::FieldViolation;

// At most this many violations are reported (the details travel in a trailer, whose size
// gRPC limits); the message says how many more there were.
inline constexpr int kMaxViolations = 20;

// Problems found in `request` (empty when none), in field order, at most kMaxViolations;
// `total` (when non-null) gets the number found, including those left out.
std::vector<FieldViolation> CheckEvaluateRequest(const cds::v1::EvaluateRequest& request,
                                                 int* total = nullptr);

// OK, or InvalidArgument() of CheckEvaluateRequest's violations.
absl::Status ValidateEvaluateRequest(const cds::v1::EvaluateRequest& request);

// INVALID_ARGUMENT for `violations` (REQUIRES: non-empty): the message is the first one,
// "<field> <description>", plus "(and N more problems)"; the whole list is attached as a
// serialized google.rpc.BadRequest payload (kBadRequestTypeUrl) that ToGrpcStatus sends
// as the call's google.rpc.Status details.
absl::Status InvalidArgument(const std::vector<FieldViolation>& violations, int total);

// Splits an engine message "<field path> <problem>" into a violation; a message that does
// not start with a field path becomes a violation of `fallback_field`.
FieldViolation ViolationFromMessage(const std::string& message, const std::string& fallback_field);

}  // namespace cds::service
