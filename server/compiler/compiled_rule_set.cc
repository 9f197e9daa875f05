#include "server/compiler/compiled_rule_set.h"

#include <cctype>
#include <cmath>
#include <cstdlib>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace cds::compiler {
namespace {

// Day lengths of ISO 8601 duration designators (a month is 30.44 days, a year 365.25,
// as in the validation corpus and the clinical brief).
double DaysPerUnit(char designator, bool in_time_part) {
  if (in_time_part) {
    switch (designator) {
      case 'H': return 1.0 / 24;
      case 'M': return 1.0 / (24 * 60);
      case 'S': return 1.0 / (24 * 3600);
    }
    return -1;
  }
  switch (designator) {
    case 'Y': return 365.25;
    case 'M': return 30.44;
    case 'W': return 7;
    case 'D': return 1;
  }
  return -1;
}

// Parses "P1Y2M3W4DT5H" into days; false when malformed.
bool ParseIsoDuration(const std::string& text, double* days) {
  if (text.size() < 2 || text[0] != 'P') return false;
  double total = 0;
  bool in_time = false;
  bool any = false;
  size_t i = 1;
  while (i < text.size()) {
    if (text[i] == 'T') {
      if (in_time) return false;
      in_time = true;
      ++i;
      continue;
    }
    size_t start = i;
    while (i < text.size() && (std::isdigit(static_cast<unsigned char>(text[i])) || text[i] == '.')) {
      ++i;
    }
    if (start == i || i >= text.size()) return false;
    char* end = nullptr;
    const std::string number = text.substr(start, i - start);
    const double value = std::strtod(number.c_str(), &end);
    if (end == nullptr || *end != '\0' || !std::isfinite(value)) return false;
    const double unit = DaysPerUnit(text[i], in_time);
    if (unit < 0) return false;
    total += value * unit;
    any = true;
    ++i;
  }
  if (!any) return false;
  *days = total;
  return true;
}

}  // namespace

std::string CodeKey(const std::string& system, const std::string& code) {
  return absl::StrCat(system, "|", code);
}

std::string NormalizeSystem(const std::string& system, const std::string& code) {
  // Fast path: already canonical (what the rules and most callers send).
  if (system == "HPO" || system == "LOINC" || system == "OMIM" || system == "ORPHA" ||
      system == "SNOMEDCT" || system == "ICD10" || system == "HGNC" || system == "LOCAL") {
    return system;
  }
  std::string upper = absl::AsciiStrToUpper(absl::StripAsciiWhitespace(system));
  if (upper == "HP" || upper == "HUMAN PHENOTYPE ONTOLOGY") upper = "HPO";
  if (upper == "SNOMED" || upper == "SNOMED CT" || upper == "SNOMED-CT" || upper == "SCT") {
    upper = "SNOMEDCT";
  }
  if (upper == "ICD-10" || upper == "ICD10CM" || upper == "ICD-10-CM") upper = "ICD10";
  if (upper == "ORPHANET") upper = "ORPHA";
  if (upper == "HGNC:SYMBOL" || upper == "GENE") upper = "HGNC";
  if (!upper.empty()) return upper;
  if (absl::StartsWith(code, "HP:")) return "HPO";
  if (absl::StartsWith(code, "OMIM:")) return "OMIM";
  if (absl::StartsWith(code, "ORPHA:")) return "ORPHA";
  if (absl::StartsWith(code, "LOINC:")) return "LOINC";
  return "";
}

AgeDays ToDays(const cds::v1::Age& age) {
  AgeDays result;
  switch (age.value_case()) {
    case cds::v1::Age::VALUE_NOT_SET:
      return result;
    case cds::v1::Age::kDays:
      result.set = true;
      result.days = age.days();
      if (!std::isfinite(age.days())) {
        result.error = "must be a finite number of days";
      } else if (age.days() < 0) {
        result.error = "must not be negative";
      } else if (age.days() > 150 * 365.25) {
        result.error = "is beyond a plausible human age";
      }
      return result;
    case cds::v1::Age::kIso8601Duration:
      result.set = true;
      if (!ParseIsoDuration(age.iso8601_duration(), &result.days)) {
        result.error = "is not an ISO 8601 duration such as \"P3M\" or \"P1Y2M\"";
      } else if (result.days > 150 * 365.25) {
        result.error = "is beyond a plausible human age";
      }
      return result;
  }
  return result;
}

}  // namespace cds::compiler
