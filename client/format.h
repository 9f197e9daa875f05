#pragma once

// Human-readable renderings of API responses for cdsctl. Plain text, no colour, stable
// column order (scripts should use --json instead of parsing these).

#include <string>

#include "cds/v1/service.pb.h"

namespace cds::cli {

// The ranked table (rank, kind, title, probability or urgency), each suggestion's
// reasons beneath it, then warnings, the rule set used and the disclaimer.
std::string FormatEvaluateResponse(const cds::v1::EvaluateResponse& response);

// One row per rule-set version, with the rejection reason under a rejected one.
std::string FormatRuleSets(const cds::v1::ListRuleSetsResponse& response);

// "LR 20.0", "LR 0.25", "LR 0.004": enough digits to tell small ratios apart.
std::string FormatLikelihoodRatio(double lr);

// 0.873 -> "87.3%", 0.0004 -> "0.04%".
std::string FormatPercent(double probability);

}  // namespace cds::cli
