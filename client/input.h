#pragma once

// Reads what `cdsctl evaluate` sends: an EvaluateRequest or a bare Patient, in protobuf's
// JSON mapping (.json) or text format (.textproto, .txtpb, .pbtxt).

#include <string>

#include "absl/status/statusor.h"
#include "cds/v1/service.pb.h"

namespace cds::cli {

// Parses `content` (named `path` in messages; its extension picks the format). A file
// holding a Patient becomes a request with only `patient` set. INVALID_ARGUMENT with the
// parser's reason when neither message parses.
absl::StatusOr<cds::v1::EvaluateRequest> ParseEvaluateInput(const std::string& path,
                                                            const std::string& content);

// Reads `path` and parses it as above. NOT_FOUND when the file cannot be read.
absl::StatusOr<cds::v1::EvaluateRequest> ReadEvaluateInput(const std::string& path);

// The whole file, or NOT_FOUND naming it.
absl::StatusOr<std::string> ReadFile(const std::string& path);

}  // namespace cds::cli
