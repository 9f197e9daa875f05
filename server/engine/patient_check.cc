#include "server/engine/patient_check.h"

#include <cmath>
#include <string>
#include <utility>

#include "absl/functional/function_ref.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "server/compiler/compiled_rule_set.h"

namespace cds::engine {
namespace {

using cds::v1::Finding;
using cds::v1::Relative;

constexpr double kMaxAgeDays = kMaxAgeYears * 365.25;

bool AllDigits(absl::string_view s) {
  if (s.empty()) return false;
  for (char c : s) {
    if (!absl::ascii_isdigit(static_cast<unsigned char>(c))) return false;
  }
  return true;
}

std::string TooLong(size_t limit) { return absl::StrCat("is longer than ", limit, " characters"); }

// Problems of an age converted by compiler::ToDays ("" when none): finite, 0 to 150
// years, well-formed ISO 8601. Unset is no problem.
std::string AgeProblem(const compiler::AgeDays& days) {
  if (!days.error.empty()) return std::string(days.error);
  if (days.set && days.days > kMaxAgeDays) return "is beyond a plausible human age (150 years)";
  return "";
}

// `path(rest)` returns the path of the item being checked followed by `rest`.
using PathFn = absl::FunctionRef<std::string(absl::string_view rest)>;

// A coded term at `path("")` (".code" / ".system" / ".display" for sub-field problems).
void CheckCode(const cds::v1::Code& code, PathFn path, Violations& out) {
  if (code.code().empty()) {
    out.Add(path(".code"), "is required");
    return;
  }
  if (code.code().size() > kMaxNameChars) {
    out.Add(path(".code"), TooLong(kMaxNameChars));
    return;
  }
  if (code.system().size() > kMaxNameChars) {
    out.Add(path(".system"), TooLong(kMaxNameChars));
    return;
  }
  if (code.display().size() > kMaxDisplayChars) {
    out.Add(path(".display"), TooLong(kMaxDisplayChars));
  }
  // Canonical systems (nearly every code) are checked in place, without a copy.
  std::string normalized;
  absl::string_view system = code.system();
  if (!compiler::IsCanonicalSystem(system)) {
    normalized = compiler::NormalizeSystem(code.system(), code.code());
    system = normalized;
  }
  if (system.empty()) {
    out.Add(path(".system"),
            "is required unless the code is a CURIE with a known prefix (HP:, OMIM:, ORPHA:)");
    return;
  }
  std::string problem;
  if (!CodeSyntaxOk(system, code.code(), &problem)) out.Add(path(".code"), problem);
}

void CheckFinding(const Finding& f, int i, const compiler::AgeDays& age, Violations& out) {
  auto field = [i](absl::string_view rest) {
    return absl::StrCat("patient.findings[", i, "]", rest);
  };
  if (!f.has_term()) {
    out.Add(field(".term"), "is required");
  } else {
    CheckCode(f.term(), [&](absl::string_view rest) { return field(absl::StrCat(".term", rest)); },
              out);
  }
  if (f.status() == Finding::STATUS_UNSPECIFIED || !Finding::Status_IsValid(f.status())) {
    out.Add(field(".status"), "is required (PRESENT, EXCLUDED or UNKNOWN)");
  }
  if (f.has_onset()) {
    const compiler::AgeDays onset = compiler::ToDays(f.onset());
    const std::string problem = AgeProblem(onset);
    if (!problem.empty()) {
      out.Add(field(".onset"), problem);
    } else if (onset.set && age.set && age.error.empty() && onset.days > age.days + 1) {
      out.Add(field(".onset"), "is later than patient.age");
    }
  }
}

void CheckMeasurement(const cds::v1::Measurement& m, int i, Violations& out) {
  auto field = [i](absl::string_view rest) {
    return absl::StrCat("patient.measurements[", i, "]", rest);
  };
  if (!m.has_assay()) {
    out.Add(field(".assay"), "is required");
  } else {
    CheckCode(m.assay(),
              [&](absl::string_view rest) { return field(absl::StrCat(".assay", rest)); }, out);
  }
  if (!std::isfinite(m.value()) || m.value() < 0) {
    out.Add(field(".value"), "must be a finite, non-negative number");
  }
  if (m.unit().empty()) {
    out.Add(field(".unit"), "is required");
  } else if (m.unit().size() > kMaxNameChars) {
    out.Add(field(".unit"), TooLong(kMaxNameChars));
  }
  if (const std::string problem = AgeProblem(compiler::ToDays(m.age())); !problem.empty()) {
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

void CheckRelative(const Relative& r, int i, Violations& out) {
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

}  // namespace

void Violations::Add(std::string field, std::string description) {
  ++total_;
  if (static_cast<int>(kept_.size()) < max_kept_) {
    kept_.push_back({std::move(field), std::move(description)});
  }
}

bool Violations::Has(absl::string_view field) const {
  for (const FieldViolation& v : kept_) {
    if (v.field == field) return true;
  }
  return false;
}

void CheckPatient(const cds::v1::Patient& patient, Violations& out) {
  if (patient.reference().size() > kMaxReferenceChars) {
    out.Add("patient.reference", TooLong(kMaxReferenceChars));
  }
  if (patient.sex() == cds::v1::SEX_UNSPECIFIED) {
    out.Add("patient.sex", "is required (UNKNOWN_SEX when not known)");
  } else if (!cds::v1::Sex_IsValid(patient.sex())) {
    out.Add("patient.sex", "is not a known value");
  }
  compiler::AgeDays age = compiler::ToDays(patient.age());
  const std::string age_problem = AgeProblem(age);
  if (!age_problem.empty()) {
    out.Add("patient.age", age_problem);
    age.set = false;
  }

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

bool CodeSyntaxOk(absl::string_view system, absl::string_view code, std::string* problem) {
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

}  // namespace cds::engine
