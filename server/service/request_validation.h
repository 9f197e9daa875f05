#pragma once

// Request checks of the service layer that report every problem at once (up to
// kMaxViolations), each as a google.rpc.BadRequest field violation: request-level fields,
// size limits, code syntax per code system (HPO "HP:" + 7 digits, LOINC digits "-" check
// digit, OMIM 6 digits, ORPHA digits), plausible ages (0 to 150 years), finite
// non-negative lab values. Descriptions name the rule broken, never the offending value, so
// no patient data reaches an error message. Thread-safe (pure functions).

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "cds/v1/service.pb.h"

namespace cds::service {

struct FieldViolation {
  std::string field;        // e.g. "patient.findings[3].term.code"
  std::string description;  // e.g. "is not an HPO id (HP: and 7 digits)"
};

// At most this many violations are reported (the details travel in a trailer, whose size
// gRPC limits); the message says how many more there were.
inline constexpr int kMaxViolations = 20;

inline constexpr int kMaxFindings = 2000;
inline constexpr int kMaxMeasurements = 1000;
inline constexpr int kMaxRelatives = 200;
inline constexpr int kMaxConditionsPerRelative = 100;
inline constexpr size_t kMaxReferenceChars = 256;
inline constexpr size_t kMaxNameChars = 128;   // rule set, version, label, code, system, unit
inline constexpr size_t kMaxDisplayChars = 512;

// Problems found in `request` (empty when none), in field order, at most kMaxViolations;
// `total` (when non-null) gets the number found, including those left out.
std::vector<FieldViolation> CheckEvaluateRequest(const cds::v1::EvaluateRequest& request,
                                                 int* total = nullptr);

// OK, or InvalidArgument() of CheckEvaluateRequest's violations.
absl::Status ValidateEvaluateRequest(const cds::v1::EvaluateRequest& request);

// True when `code` is well-formed for the (normalised, see compiler::NormalizeSystem)
// `system`; systems without a fixed syntax accept any non-empty code. `problem` gets the
// description when false.
bool CodeSyntaxOk(const std::string& system, const std::string& code, std::string* problem);

// INVALID_ARGUMENT for `violations` (REQUIRES: non-empty): the message is the first one,
// "<field> <description>", plus "(and N more problems)"; the whole list is attached as a
// serialized google.rpc.BadRequest payload (kBadRequestTypeUrl) that ToGrpcStatus sends
// as the call's google.rpc.Status details.
absl::Status InvalidArgument(const std::vector<FieldViolation>& violations, int total);

// Splits an engine message "<field path> <problem>" into a violation; a message that does
// not start with a field path becomes a violation of `fallback_field`.
FieldViolation ViolationFromMessage(const std::string& message, const std::string& fallback_field);

}  // namespace cds::service
