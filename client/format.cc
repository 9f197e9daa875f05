#include "client/format.h"

#include <algorithm>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/time/time.h"

namespace cds::cli {
namespace {

using Row = std::vector<std::string>;

// Longer cells overflow rather than being cut: a clinician must see the whole title.
constexpr size_t kMaxColumnWidth = 60;

void AppendRow(const Row& row, const std::vector<size_t>& widths, std::string* out) {
  std::string line;
  for (size_t i = 0; i < row.size(); ++i) {
    absl::StrAppend(&line, row[i]);
    if (i + 1 < row.size()) {
      line.append(widths[i] > row[i].size() ? widths[i] - row[i].size() : 0, ' ');
      line.append(2, ' ');
    }
  }
  absl::StrAppend(out, line, "\n");
}

std::vector<size_t> ColumnWidths(const std::vector<Row>& rows) {
  std::vector<size_t> widths;
  for (const Row& row : rows) {
    widths.resize(std::max(widths.size(), row.size()), 0);
    for (size_t i = 0; i < row.size(); ++i) {
      widths[i] = std::max(widths[i], std::min(row[i].size(), kMaxColumnWidth));
    }
  }
  return widths;
}

std::string CodeText(const cds::v1::Code& code) {
  if (code.code().empty()) return "";
  if (code.system().empty() || code.code().find(':') != std::string::npos) return code.code();
  return absl::StrCat(code.system(), ":", code.code());
}

std::string Reason(const cds::v1::Evidence& evidence) {
  std::string text =
      evidence.effect() == cds::v1::Evidence::NOT_MATCHED
          ? absl::StrCat("- absent/false: ", evidence.description())
          : absl::StrCat("+ ", evidence.description());
  if (evidence.has_likelihood_ratio()) {
    absl::StrAppend(&text, " (", FormatLikelihoodRatio(evidence.likelihood_ratio()), ")");
  }
  if (evidence.superseded()) absl::StrAppend(&text, " [outweighed within its group]");
  return text;
}

std::string FormatTimestamp(const google::protobuf::Timestamp& ts) {
  const absl::Time t = absl::FromUnixSeconds(ts.seconds()) + absl::Nanoseconds(ts.nanos());
  return absl::FormatTime("%Y-%m-%dT%H:%M:%SZ", t, absl::UTCTimeZone());
}

}  // namespace

std::string FormatLikelihoodRatio(double lr) {
  if (lr >= 1) return absl::StrFormat("LR %.1f", lr);
  if (lr >= 0.1) return absl::StrFormat("LR %.2f", lr);
  return absl::StrFormat("LR %.2g", lr);
}

std::string FormatPercent(double probability) {
  const double percent = probability * 100;
  if (percent >= 1 || percent == 0) return absl::StrFormat("%.1f%%", percent);
  return absl::StrFormat("%.2g%%", percent);
}

std::string FormatEvaluateResponse(const cds::v1::EvaluateResponse& response) {
  std::string out;
  if (response.suggestions().empty()) {
    absl::StrAppend(&out, "No suggestions.\n");
  } else {
    std::vector<Row> rows = {{"RANK", "KIND", "TITLE", "PROBABILITY/URGENCY"}};
    for (const cds::v1::Suggestion& s : response.suggestions()) {
      std::string title = s.title();
      if (const std::string code = CodeText(s.code()); !code.empty()) {
        absl::StrAppend(&title, " [", code, "]");
      }
      std::string weight;
      if (s.kind() == cds::v1::DIAGNOSIS && s.has_probability()) {
        weight = FormatPercent(s.probability());
        if (s.has_pretest_probability()) {
          absl::StrAppend(&weight, " (pretest ", FormatPercent(s.pretest_probability()), ")");
        }
      } else {
        weight = cds::v1::Urgency_Name(s.urgency());
      }
      rows.push_back({absl::StrCat(s.rank()), cds::v1::SuggestionKind_Name(s.kind()),
                      std::move(title), std::move(weight)});
    }
    const std::vector<size_t> widths = ColumnWidths(rows);
    AppendRow(rows[0], widths, &out);
    const std::string indent(widths[0] + 2, ' ');
    for (int i = 0; i < response.suggestions_size(); ++i) {
      AppendRow(rows[i + 1], widths, &out);
      for (const cds::v1::Evidence& evidence : response.suggestions(i).evidence()) {
        absl::StrAppend(&out, indent, "    ", Reason(evidence), "\n");
      }
    }
  }
  if (!response.warnings().empty()) {
    absl::StrAppend(&out, "\nWarnings:\n");
    for (const cds::v1::Warning& w : response.warnings()) {
      absl::StrAppend(&out, "  - [", cds::v1::Warning::Kind_Name(w.kind()), "] ",
                      w.field().empty() ? "" : absl::StrCat(w.field(), ": "), w.message(), "\n");
    }
  }
  absl::StrAppend(&out, "\nRule set: ", response.rule_set().name(), "@",
                  response.rule_set().version(), " (", response.rule_set().digest(), ")",
                  response.rule_set().label().empty()
                      ? ""
                      : absl::StrCat(" via label ", response.rule_set().label()),
                  "\n");
  if (!response.evaluation_id().empty()) {
    absl::StrAppend(&out, "Evaluation: ", response.evaluation_id());
    if (response.has_evaluated_at()) {
      absl::StrAppend(&out, " at ", FormatTimestamp(response.evaluated_at()));
    }
    absl::StrAppend(&out, "\n");
  }
  if (!response.disclaimer().empty()) absl::StrAppend(&out, "\n", response.disclaimer(), "\n");
  return out;
}

std::string FormatRuleSets(const cds::v1::ListRuleSetsResponse& response) {
  if (response.rule_sets().empty()) return "No rule sets loaded.\n";
  std::vector<Row> rows = {
      {"NAME", "VERSION", "STATE", "DEFAULT", "LABELS", "SIGNER", "EVALUATIONS", "DIGEST"}};
  for (const cds::v1::RuleSetInfo& info : response.rule_sets()) {
    rows.push_back({info.ref().name(), info.ref().version(),
                    cds::v1::RuleSetInfo::State_Name(info.state()), info.is_default() ? "*" : "",
                    info.labels().empty() ? "-" : absl::StrJoin(info.labels(), ","),
                    info.signer().empty() ? "-" : info.signer(),
                    absl::StrCat(info.evaluation_count()), info.ref().digest()});
  }
  const std::vector<size_t> widths = ColumnWidths(rows);
  std::string out;
  AppendRow(rows[0], widths, &out);
  for (int i = 0; i < response.rule_sets_size(); ++i) {
    AppendRow(rows[i + 1], widths, &out);
    const std::string& reason = response.rule_sets(i).reason();
    if (reason.empty()) continue;
    for (absl::string_view line : absl::StrSplit(reason, '\n')) {
      absl::StrAppend(&out, "    ", line, "\n");
    }
  }
  return out;
}

}  // namespace cds::cli
