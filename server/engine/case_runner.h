#pragma once

// Runs a rule set's embedded test cases (RuleSetTests) through the engine and reports
// which expectations failed. Used by the store before a version is served, by `cdsctl
// rules test`, and by the test suite.

#include <string>
#include <vector>

#include "server/compiler/compiled_rule_set.h"

namespace cds::engine {

struct CaseResult {
  std::string name;
  bool passed = false;
  // One line per unmet expectation.
  std::vector<std::string> failures;
};

std::vector<CaseResult> RunCases(const compiler::CompiledRuleSet& rule_set,
                                 const cds::v1::RuleSetTests& tests);

// True when every case passed.
bool AllPassed(const std::vector<CaseResult>& results);

}  // namespace cds::engine
