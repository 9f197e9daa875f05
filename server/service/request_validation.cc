#include "server/service/request_validation.h"

#include <cmath>
#include <string>
#include <utility>
#include <vector>

#include "absl/functional/function_ref.h"
#include "absl/strings/ascii.h"
#include "absl/strings/cord.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "absl/strings/string_view.h"
#include "google/rpc/error_details.pb.h"
#include "server/compiler/compiled_rule_set.h"
#include "server/service/grpc_status.h"

namespace cds::service {
namespace {

using cds::v1::Finding;
using cds::v1::Relative;

constexpr double kMaxAgeDays = 150 * 365.25;

bool AllDigits(absl::string_view s) {
  if (s.empty()) return false;
  for (char c : s) {
    if (!absl::ascii_isdigit(static_cast<unsigned char>(c))) return false;
  }
  return true;
}

// Names, versions and labels: letters, digits, '.', '_' and '-'.
bool IsPlainName(absl::string_view s) {
  for (char c : s) {
    if (!absl::ascii_isalnum(static_cast<unsigned char>(c)) && c != '.' && c != '_' && c != '-') {
      return false;
    }
  }
  return true;
}

// Collects violations; counts those beyond kMaxViolations without keeping them.
class Collector {
 public:
  void Add(std::string field, std::string description) {
    ++total_;
    if (static_cast<int>(violations_.size()) < kMaxViolations) {
      violations_.push_back({std::move(field), std::move(description)});
    }
  }
  bool Has(absl::string_view field) const {
    for (const FieldViolation& v : violations_) {
      if (v.field == field) return true;
    }
    return false;
  }
  int total() const { return total_; }
  std::vector<FieldViolation> Take() { return std::move(violations_); }

 private:
  std::vector<FieldViolation> violations_;
  int total_ = 0;
};

void CheckName(const std::string& value, const std::string& field, Collector& out) {
  if (value.size() > kMaxNameChars) {
    out.Add(field, absl::StrCat("is longer than ", kMaxNameChars, " characters"));
  } else if (!IsPlainName(value)) {
    out.Add(field, "may hold only letters, digits, '.', '_' and '-'");
  }
}

// Age problems ("" when none): finite, 0 to 150 years, well-formed ISO 8601.
std::string AgeProblem(const cds::v1::Age& age) {
  if (age.value_case() == cds::v1::Age::VALUE_NOT_SET) return "";
  const compiler::AgeDays days = compiler::ToDays(age);
  if (!days.error.empty()) return days.error;
  if (days.days > kMaxAgeDays) return "is beyond a plausible human age (150 years)";
  return "";
}

// Field paths are built only for the problems reported: valid requests allocate nothing.
// `path(rest)` returns the path of the item being checked followed by `rest`.
using PathFn = absl::FunctionRef<std::string(absl::string_view rest)>;

// A coded term at `path("")` (".code" / ".system" appended for sub-field problems).
void CheckCode(const cds::v1::Code& code, PathFn path, Collector& out) {
  auto field = [&](absl::string_view rest) { return path(rest); };
  if (code.code().empty()) {
    out.Add(field(".code"), "is required");
    return;
  }
  if (code.code().size() > kMaxNameChars) {
    out.Add(field(".code"), absl::StrCat("is longer than ", kMaxNameChars, " characters"));
    return;
  }
  if (code.system().size() > kMaxNameChars) {
    out.Add(field(".system"), absl::StrCat("is longer than ", kMaxNameChars, " characters"));
    return;
  }
  if (code.display().size() > kMaxDisplayChars) {
    out.Add(field(".display"), absl::StrCat("is longer than ", kMaxDisplayChars, " characters"));
  }
  const std::string system = compiler::NormalizeSystem(code.system(), code.code());
  if (system.empty()) {
    out.Add(field(".system"),
            "is required unless the code is a CURIE with a known prefix (HP:, OMIM:, ORPHA:)");
    return;
  }
  std::string problem;
  if (!CodeSyntaxOk(system, code.code(), &problem)) out.Add(field(".code"), problem);
}

void CheckFinding(const Finding& f, int i, const compiler::AgeDays& age, Collector& out) {
  auto field = [i](absl::string_view rest) {
    return absl::StrCat("patient.findings[", i, "]", rest);
  };
  if (!f.has_term()) {
    out.Add(field(".term"), "is required");
  } else {
    CheckCode(f.term(), [&](absl::string_view rest) { return field(absl::StrCat(".term", rest)); }, out);
  }
  if (f.status() == Finding::STATUS_UNSPECIFIED || !Finding::Status_IsValid(f.status())) {
    out.Add(field(".status"), "is required (PRESENT, EXCLUDED or UNKNOWN)");
  }
  if (f.has_onset()) {
    const std::string problem = AgeProblem(f.onset());
    if (!problem.empty()) {
      out.Add(field(".onset"), problem);
    } else {
      const compiler::AgeDays onset = compiler::ToDays(f.onset());
      if (onset.set && age.set && age.error.empty() && onset.days > age.days + 1) {
        out.Add(field(".onset"), "is later than patient.age");
      }
    }
  }
}

void CheckMeasurement(const cds::v1::Measurement& m, int i, Collector& out) {
  auto field = [i](absl::string_view rest) {
    return absl::StrCat("patient.measurements[", i, "]", rest);
  };
  if (!m.has_assay()) {
    out.Add(field(".assay"), "is required");
  } else {
    CheckCode(m.assay(), [&](absl::string_view rest) { return field(absl::StrCat(".assay", rest)); }, out);
  }
  if (!std::isfinite(m.value()) || m.value() < 0) {
    out.Add(field(".value"), "must be a finite, non-negative number");
  }
  if (m.unit().empty()) {
    out.Add(field(".unit"), "is required");
  } else if (m.unit().size() > kMaxNameChars) {
    out.Add(field(".unit"), absl::StrCat("is longer than ", kMaxNameChars, " characters"));
  }
  if (const std::string problem = AgeProblem(m.age()); !problem.empty()) {
    out.Add(field(".age"), problem);
  }
  if (m.has_reference_range()) {
    const cds::v1::ReferenceRange& r = m.reference_range();
    auto bad = [](bool has, double v) { return has && (!std::isfinite(v) || v < 0); };
    if (bad(r.has_low(), r.low())) {
      out.Add(field(".reference_range.low"), "must be a finite, non-negative number");
    }
    if (bad(r.has_high(), r.high())) {
      out.Add(field(".reference_range.high"), "must be a finite, non-negative number");
    }
    if (r.has_low() && r.has_high() && r.low() > r.high()) {
      out.Add(field(".reference_range"), "must have low <= high");
    }
  }
}

void CheckRelative(const Relative& r, int i, Collector& out) {
  auto field = [i](absl::string_view rest) {
    return absl::StrCat("patient.family_history.relatives[", i, "]", rest);
  };
  if (r.relationship() == Relative::RELATIONSHIP_UNSPECIFIED ||
      !Relative::Relationship_IsValid(r.relationship())) {
    out.Add(field(".relationship"), "is required");
  }
  if (!cds::v1::Sex_IsValid(r.sex())) out.Add(field(".sex"), "is not a known value");
  if (r.conditions_size() > kMaxConditionsPerRelative) {
    out.Add(field(".conditions"),
            absl::StrCat("has more than ", kMaxConditionsPerRelative, " entries"));
    return;
  }
  for (int c = 0; c < r.conditions_size(); ++c) {
    CheckCode(
        r.conditions(c),
        [&](absl::string_view rest) { return field(absl::StrCat(".conditions[", c, "]", rest)); },
        out);
  }
}

void CheckPatient(const cds::v1::Patient& patient, Collector& out) {
  if (patient.reference().size() > kMaxReferenceChars) {
    out.Add("patient.reference", absl::StrCat("is longer than ", kMaxReferenceChars, " characters"));
  }
  if (patient.sex() == cds::v1::SEX_UNSPECIFIED) {
    out.Add("patient.sex", "is required (UNKNOWN_SEX when not known)");
  } else if (!cds::v1::Sex_IsValid(patient.sex())) {
    out.Add("patient.sex", "is not a known value");
  }
  const std::string age_problem = AgeProblem(patient.age());
  if (!age_problem.empty()) out.Add("patient.age", age_problem);
  compiler::AgeDays age = compiler::ToDays(patient.age());
  if (!age_problem.empty()) age.set = false;

  if (patient.findings_size() > kMaxFindings) {
    out.Add("patient.findings", absl::StrCat("has more than ", kMaxFindings, " entries"));
  } else {
    for (int i = 0; i < patient.findings_size(); ++i) {
      CheckFinding(patient.findings(i), i, age, out);
    }
  }
  if (patient.measurements_size() > kMaxMeasurements) {
    out.Add("patient.measurements", absl::StrCat("has more than ", kMaxMeasurements, " entries"));
  } else {
    for (int i = 0; i < patient.measurements_size(); ++i) {
      CheckMeasurement(patient.measurements(i), i, out);
    }
  }
  if (!patient.has_family_history()) return;
  const cds::v1::FamilyHistory& family = patient.family_history();
  if (!cds::v1::FamilyHistory::Consanguinity_IsValid(family.consanguinity())) {
    out.Add("patient.family_history.consanguinity", "is not a known value");
  }
  if (family.relatives_size() > kMaxRelatives) {
    out.Add("patient.family_history.relatives",
            absl::StrCat("has more than ", kMaxRelatives, " entries"));
    return;
  }
  for (int i = 0; i < family.relatives_size(); ++i) {
    CheckRelative(family.relatives(i), i, out);
  }
}

}  // namespace

bool CodeSyntaxOk(const std::string& system, const std::string& code, std::string* problem) {
  absl::string_view c = code;
  if (system == "HPO") {
    if (c.size() == 10 && absl::StartsWith(c, "HP:") && AllDigits(c.substr(3))) return true;
    *problem = "is not an HPO id (HP: and 7 digits)";
    return false;
  }
  if (system == "LOINC") {
    absl::ConsumePrefix(&c, "LOINC:");
    const size_t dash = c.find('-');
    if (dash != absl::string_view::npos && dash >= 1 && dash <= 7 && dash + 2 == c.size() &&
        AllDigits(c.substr(0, dash)) && AllDigits(c.substr(dash + 1))) {
      return true;
    }
    *problem = "is not a LOINC code (1 to 7 digits, '-', a check digit)";
    return false;
  }
  if (system == "OMIM") {
    absl::ConsumePrefix(&c, "OMIM:");
    if (c.size() == 6 && AllDigits(c)) return true;
    *problem = "is not an OMIM number (OMIM: and 6 digits)";
    return false;
  }
  if (system == "ORPHA") {
    absl::ConsumePrefix(&c, "ORPHA:");
    if (!c.empty() && c.size() <= 7 && AllDigits(c)) return true;
    *problem = "is not an Orphanet code (ORPHA: and up to 7 digits)";
    return false;
  }
  return true;
}

std::vector<FieldViolation> CheckEvaluateRequest(const cds::v1::EvaluateRequest& request,
                                                 int* total) {
  Collector out;
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
    CheckPatient(request.patient(), out);
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
