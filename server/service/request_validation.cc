#include "server/service/request_validation.h"

#include <string>
#include <utility>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/cord.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "google/rpc/error_details.pb.h"
#include "server/service/grpc_status.h"

namespace cds::service {
namespace {

using engine::kMaxNameChars;

// Names, versions and labels: letters, digits, '.', '_' and '-'.
bool IsPlainName(absl::string_view s) {
  for (char c : s) {
    if (!absl::ascii_isalnum(static_cast<unsigned char>(c)) && c != '.' && c != '_' && c != '-') {
      return false;
    }
  }
  return true;
}

void CheckName(const std::string& value, const std::string& field, engine::Violations& out) {
  if (value.size() > kMaxNameChars) {
    out.Add(field, absl::StrCat("is longer than ", kMaxNameChars, " characters"));
  } else if (!IsPlainName(value)) {
    out.Add(field, "may hold only letters, digits, '.', '_' and '-'");
  }
}

}  // namespace

std::vector<FieldViolation> CheckEvaluateRequest(const cds::v1::EvaluateRequest& request,
                                                 int* total) {
  engine::Violations out(kMaxViolations);
  // Which version: rule_set, or rule_set "name@version" / "name@label".
  const std::string& rule_set = request.rule_set();
  const size_t at = rule_set.find('@');
  const std::string name = rule_set.substr(0, at);
  if (rule_set.empty()) {
    out.Add("rule_set", "is required");
  } else if (rule_set.size() > 2 * kMaxNameChars + 1) {
    out.Add("rule_set", absl::StrCat("is longer than ", 2 * kMaxNameChars + 1, " characters"));
  } else {
    if (name.empty()) out.Add("rule_set", "has no name before '@'");
    CheckName(name, "rule_set", out);
    if (at != std::string::npos) {
      const std::string pin = rule_set.substr(at + 1);
      if (pin.empty()) {
        out.Add("rule_set", "has an empty pin after '@'");
      } else if (!out.Has("rule_set")) {
        CheckName(pin, "rule_set", out);
      }
      if (!request.version().empty() || !request.label().empty()) {
        out.Add(request.version().empty() ? "label" : "version",
                "must be empty when rule_set pins name@version or name@label");
      }
    }
  }
  CheckName(request.version(), "version", out);
  CheckName(request.label(), "label", out);
  if (!request.version().empty() && !request.label().empty()) {
    out.Add("label", "is exclusive with version");
  }
  if (!request.has_patient()) {
    out.Add("patient", "is required");
  } else {
    engine::CheckPatient(request.patient(), out);
  }
  if (total != nullptr) *total = out.total();
  return out.Take();
}

absl::Status ValidateEvaluateRequest(const cds::v1::EvaluateRequest& request) {
  int total = 0;
  std::vector<FieldViolation> violations = CheckEvaluateRequest(request, &total);
  if (violations.empty()) return absl::OkStatus();
  return InvalidArgument(violations, total);
}

absl::Status InvalidArgument(const std::vector<FieldViolation>& violations, int total) {
  google::rpc::BadRequest bad_request;
  for (const FieldViolation& v : violations) {
    google::rpc::BadRequest::FieldViolation* fv = bad_request.add_field_violations();
    fv->set_field(v.field);
    fv->set_description(v.description);
  }
  std::string message = violations.empty()
                            ? std::string("malformed request")
                            : absl::StrCat(violations[0].field, " ", violations[0].description);
  if (total > 1) absl::StrAppend(&message, " (and ", total - 1, " more problems)");
  absl::Status status = absl::InvalidArgumentError(message);
  status.SetPayload(kBadRequestTypeUrl, absl::Cord(bad_request.SerializeAsString()));
  return status;
}

FieldViolation ViolationFromMessage(const std::string& message, const std::string& fallback_field) {
  const size_t space = message.find(' ');
  const absl::string_view head = absl::string_view(message).substr(0, space);
  bool is_path = !head.empty() && space != std::string::npos;
  for (char c : head) {
    if (!absl::ascii_islower(static_cast<unsigned char>(c)) &&
        !absl::ascii_isdigit(static_cast<unsigned char>(c)) && c != '_' && c != '.' && c != '[' &&
        c != ']') {
      is_path = false;
    }
  }
  if (!is_path) return {fallback_field, message};
  return {std::string(head), message.substr(space + 1)};
}

}  // namespace cds::service
