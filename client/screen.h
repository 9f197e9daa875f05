#pragma once

// `cdsctl screen FILE.jsonl`: streams a file of patients through
// DecisionSupport.EvaluateStream and writes one JSON result per input line, in order.

#include <cstdint>
#include <istream>
#include <optional>
#include <ostream>
#include <string>
#include <vector>

#include "absl/strings/string_view.h"
#include "cds/v1/service.grpc.pb.h"
#include "cds/v1/service.pb.h"
#include "grpcpp/grpcpp.h"

namespace cds::cli {

// One non-blank line of the input: a request to send, or why the line could not be read.
struct ScreenItem {
  int line = 0;  // 1-based
  std::optional<cds::v1::EvaluateRequest> request;
  std::string error;  // set when `request` is empty; names the line, never its content
};

// What the request of every line gets unless the line names its own.
struct ScreenDefaults {
  std::string rule_set = "ipex";
  std::optional<std::string> rule_set_override;
  std::optional<std::string> version;
  std::optional<std::string> label;
};

// Line `line_number` of the input (a cds.v1.Patient or cds.v1.EvaluateRequest in JSON) as
// an item: its request with `defaults` applied, or the error naming the line.
ScreenItem ParseScreenLine(absl::string_view line, int line_number,
                           const ScreenDefaults& defaults);

// How many lines of `in` are not blank (the lines `Screen` reports on).
int64_t CountScreenLines(std::istream& in);

struct ScreenSummary {
  int64_t lines = 0;           // non-blank lines read
  int64_t ok = 0;
  int64_t patient_errors = 0;  // refused by the server, one by one
  int64_t bad_lines = 0;       // not sent: the line does not parse
};

// At most this many lines are read ahead of the results written: a screen's memory does
// not grow with its file.
inline constexpr size_t kScreenLinesAhead = 256;

// Reads `in` (JSON Lines: a cds.v1.Patient or cds.v1.EvaluateRequest per line; blank lines
// skipped; a malformed line gets its error, not a failure) as it goes, sends each request
// on one EvaluateStream call (made with `context`) and writes one line of JSON per
// non-blank line to `out`, in input order: the StreamEvaluateResponse (correlationId = the
// line number) with `response` or `error`. Returns the stream's final status.
grpc::Status Screen(cds::v1::DecisionSupport::Stub& stub, grpc::ClientContext* context,
                    std::istream& in, const ScreenDefaults& defaults, std::ostream& out,
                    ScreenSummary* summary);

}  // namespace cds::cli
