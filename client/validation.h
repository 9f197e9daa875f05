#pragma once

// `cdsctl validate`: runs a corpus of published patients (JSON lines, the format of
// ../shared/validation/cases.jsonl) through a rule set and reports, per diagnosis, top-1
// and top-3 accuracy, the screening hypothesis' sensitivity and specificity at the rule
// set's alert threshold, and calibration (Brier score).

#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "cds/interop/corpus.pb.h"
#include "cds/v1/rules.pb.h"
#include "cds/v1/service.pb.h"

namespace cds::cli {

struct CorpusEntry {
  cds::interop::CorpusCase source;
  cds::v1::Patient patient;
};

// One JSON object per line; blank lines skipped. INVALID_ARGUMENT naming the line when one
// does not parse.
absl::StatusOr<std::vector<CorpusEntry>> ParseCorpus(const std::string& jsonl);

// The patient a corpus case describes: sex, age (last encounter, else latest onset),
// observed and excluded HPO terms with onsets, and IgE measurements named by label.
// Free-text family history is not parsed.
cds::v1::Patient PatientFromCorpusCase(const cds::interop::CorpusCase& c);

// Evaluates one patient (in-process or through a server).
using EvaluateFn =
    std::function<absl::StatusOr<cds::v1::EvaluateResponse>(const cds::v1::Patient&)>;

// Runs every entry through `evaluate`. `definition` maps corpus disease ids to the
// hypotheses that model them (Hypothesis.code and other_codes).
cds::interop::ValidationReport Validate(const std::vector<CorpusEntry>& corpus,
                                        const cds::v1::RuleSet& definition,
                                        const EvaluateFn& evaluate);

// A readable table of the report.
std::string FormatReport(const cds::interop::ValidationReport& report);

}  // namespace cds::cli
