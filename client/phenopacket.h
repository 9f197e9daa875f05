#pragma once

// Maps a GA4GH Phenopacket v2 (JSON) onto a cds.v1.Patient for `cdsctl evaluate
// --phenopacket`. What is mapped and what is ignored is listed in client/README.md.

#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "cds/interop/phenopacket.pb.h"
#include "cds/v1/patient.pb.h"

namespace cds::cli {

// Parses Phenopacket v2 JSON (unknown fields ignored) and maps it. INVALID_ARGUMENT with
// the parser's reason when the JSON is malformed. `notes` (optional) receives one line per
// element that could not be mapped.
absl::StatusOr<cds::v1::Patient> PatientFromPhenopacketJson(const std::string& json,
                                                            std::vector<std::string>* notes);

cds::v1::Patient PatientFromPhenopacket(const cds::interop::Phenopacket& packet,
                                        std::vector<std::string>* notes);

// Days since birth for a TimeElement: an ISO 8601 age, the start of an age range, a
// gestational age (as 0: before birth), or an HPO onset class (the middle of its span,
// e.g. neonatal onset = 14 days). nullopt when it cannot be mapped.
std::optional<double> TimeElementDays(const cds::interop::TimeElement& time);

// Days for an HPO onset class id (HP:0003577 congenital, HP:0003623 neonatal, ...).
std::optional<double> OnsetClassDays(const std::string& hpo_id);

// Splits a CURIE "LOINC:19113-0" into a cds.v1.Code (system "LOINC", code "19113-0");
// HPO, OMIM and ORPHA CURIEs keep their prefix in the code, as the rules write them.
cds::v1::Code CodeFromCurie(const std::string& curie, const std::string& label);

}  // namespace cds::cli
