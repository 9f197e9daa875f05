#include "server/engine/case_runner.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "server/engine/engine.h"

namespace cds::engine {
namespace {

// Diagnoses and non-alert actions of a response, in rank order.
struct Ranked {
  std::vector<const cds::v1::Suggestion*> diagnoses;
  std::vector<const cds::v1::Suggestion*> actions;  // TEST, REFERRAL, TREATMENT
  std::vector<const cds::v1::Suggestion*> all_actions;  // including ALERT
};

Ranked Split(const cds::v1::EvaluateResponse& response) {
  Ranked ranked;
  for (const auto& s : response.suggestions()) {
    if (s.kind() == cds::v1::DIAGNOSIS) {
      ranked.diagnoses.push_back(&s);
    } else {
      ranked.all_actions.push_back(&s);
      if (s.kind() != cds::v1::ALERT) ranked.actions.push_back(&s);
    }
  }
  return ranked;
}

int PositionOf(const std::vector<const cds::v1::Suggestion*>& list, const std::string& id) {
  for (size_t i = 0; i < list.size(); ++i) {
    if (list[i]->rule_id() == id) return static_cast<int>(i);
  }
  return -1;
}

std::string TopIds(const std::vector<const cds::v1::Suggestion*>& list, size_t n) {
  std::string out;
  for (size_t i = 0; i < list.size() && i < n; ++i) {
    absl::StrAppend(&out, i ? ", " : "", list[i]->rule_id());
    if (list[i]->has_probability()) absl::StrAppendFormat(&out, " (%.3f)", list[i]->probability());
  }
  return out.empty() ? "none" : out;
}

}  // namespace

std::vector<CaseResult> RunCases(const compiler::CompiledRuleSet& rule_set,
                                 const cds::v1::RuleSetTests& tests) {
  std::vector<CaseResult> results;
  for (const auto& tc : tests.cases()) {
    CaseResult result;
    result.name = tc.name();
    cds::v1::EvaluateResponse response;
    // The expectations read rule ids, kinds, ranks and probabilities, never the
    // explanations, which do not change them: the cases run without (a quarter of a
    // publish's case time went into the full trace).
    EvaluateOptions options;
    options.explain = false;
    const absl::Status status = Evaluate(rule_set, tc.patient(), options, &response);
    if (!status.ok()) {
      result.failures.push_back(absl::StrCat("evaluation failed: ", status.message()));
      results.push_back(std::move(result));
      continue;
    }
    const Ranked ranked = Split(response);
    const auto& ex = tc.expect();
    if (!ex.top_diagnosis().empty() &&
        (ranked.diagnoses.empty() || ranked.diagnoses[0]->rule_id() != ex.top_diagnosis())) {
      result.failures.push_back(absl::StrCat("expected top diagnosis ", ex.top_diagnosis(),
                                             "; got ", TopIds(ranked.diagnoses, 3)));
    }
    for (const auto& id : ex.not_top_diagnosis()) {
      if (!ranked.diagnoses.empty() && ranked.diagnoses[0]->rule_id() == id) {
        result.failures.push_back(absl::StrCat("expected ", id, " not to rank first; got ",
                                               TopIds(ranked.diagnoses, 3)));
      }
    }
    const int within = ex.within_top() > 0 ? ex.within_top() : 3;
    for (const auto& id : ex.diagnoses_in_top()) {
      const int pos = PositionOf(ranked.diagnoses, id);
      if (pos < 0 || pos >= within) {
        result.failures.push_back(absl::StrCat("expected ", id, " within the top ", within,
                                               " diagnoses; got ",
                                               TopIds(ranked.diagnoses, within)));
      }
    }
    for (const auto& id : ex.actions()) {
      if (PositionOf(ranked.all_actions, id) < 0) {
        result.failures.push_back(absl::StrCat("expected action ", id, " to be suggested"));
      }
    }
    for (const auto& id : ex.absent_actions()) {
      if (PositionOf(ranked.all_actions, id) >= 0) {
        result.failures.push_back(absl::StrCat("expected action ", id, " not to be suggested"));
      }
    }
    const int actions_within = ex.actions_within_top() > 0 ? ex.actions_within_top() : 3;
    for (const auto& id : ex.actions_in_top()) {
      const int pos = PositionOf(ranked.actions, id);
      if (pos < 0 || pos >= actions_within) {
        result.failures.push_back(absl::StrCat("expected action ", id, " within the first ",
                                               actions_within, " actions; got ",
                                               TopIds(ranked.actions, actions_within)));
      }
    }
    for (const auto& bound : ex.probabilities()) {
      double p = -1;
      for (const auto* d : ranked.diagnoses) {
        if (d->rule_id() == bound.hypothesis()) p = d->probability();
      }
      if (p < 0) {
        // Not listed: below the display threshold.
        p = 0;
      }
      if (bound.has_at_least() && p < bound.at_least()) {
        result.failures.push_back(absl::StrFormat("expected P(%s) >= %g; got %.4f",
                                                  bound.hypothesis(), bound.at_least(), p));
      }
      if (bound.has_at_most() && p > bound.at_most()) {
        result.failures.push_back(absl::StrFormat("expected P(%s) <= %g; got %.4f",
                                                  bound.hypothesis(), bound.at_most(), p));
      }
    }
    result.passed = result.failures.empty();
    results.push_back(std::move(result));
  }
  return results;
}

bool AllPassed(const std::vector<CaseResult>& results) {
  return std::all_of(results.begin(), results.end(),
                     [](const CaseResult& r) { return r.passed; });
}

}  // namespace cds::engine
