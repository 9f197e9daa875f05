#pragma once

// The one definition of a well-formed patient (issue 6, part 4): size limits, required
// fields and enums, code syntax per code system (HPO "HP:" + 7 digits, LOINC digits "-"
// check digit, OMIM 6 digits, ORPHA up to 7 digits), plausible ages (0 to 150 years),
// finite non-negative lab values and reference ranges. The service reports every problem
// of a request as google.rpc.BadRequest field violations (server/service/
// request_validation.h); the engine refuses a patient with the first one (engine.h,
// ValidatePatient). Descriptions name the rule broken, never the offending value, so no
// patient data reaches an error message. Pure functions, thread-safe.

#include <cstddef>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "cds/v1/patient.pb.h"

namespace cds::engine {

// Input limits: far above any real patient, low enough to bound the work per call.
inline constexpr int kMaxFindings = 2000;
inline constexpr int kMaxMeasurements = 1000;
inline constexpr int kMaxRelatives = 200;
inline constexpr int kMaxConditionsPerRelative = 100;
inline constexpr size_t kMaxReferenceChars = 256;
inline constexpr size_t kMaxNameChars = 128;  // code, system, unit (and, in the service,
                                              // rule-set names, versions and labels)
inline constexpr size_t kMaxDisplayChars = 512;
inline constexpr double kMaxAgeYears = 150;

struct FieldViolation {
  std::string field;        // e.g. "patient.findings[3].term.code"
  std::string description;  // e.g. "is not an HPO id (HP: and 7 digits)"
};

// Violations in the order found: keeps the first `max_kept`, counts all. Not thread-safe.
class Violations {
 public:
  explicit Violations(int max_kept) : max_kept_(max_kept) {}
  void Add(std::string field, std::string description);
  // True when a kept violation names `field`.
  bool Has(absl::string_view field) const;
  bool empty() const { return total_ == 0; }
  int total() const { return total_; }
  const std::vector<FieldViolation>& kept() const { return kept_; }
  std::vector<FieldViolation> Take() { return std::move(kept_); }

 private:
  const int max_kept_;
  std::vector<FieldViolation> kept_;
  int total_ = 0;
};

// Adds every problem of `patient` to `out`, with field paths starting "patient.". Field
// paths are built only for problems: a valid patient allocates nothing.
void CheckPatient(const cds::v1::Patient& patient, Violations& out);

// True when `code` is well-formed for the (normalised, see compiler::NormalizeSystem)
// `system`; systems without a fixed syntax accept any non-empty code. `problem` gets the
// description when false.
bool CodeSyntaxOk(absl::string_view system, absl::string_view code, std::string* problem);

}  // namespace cds::engine
