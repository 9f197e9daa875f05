#pragma once

// Synthetic large rule sets for benchmarks and tests: a rule set plus renamed copies of its
// concepts, labs, hypotheses and actions whose codes no patient carries.

#include "server/compiler/compiler.h"

namespace cds::engine::testing {

// `base`'s rule set plus `copies - 1` renamed copies (system LOCAL codes, ids suffixed
// "_x<k>", pretest probabilities divided by `copies`): `copies` times the rules, of which
// a patient of the original rule set touches only the original ones. Aborts when `base`
// does not parse.
compiler::RuleSetSource Scaled(const compiler::RuleSetSource& base, int copies);

}  // namespace cds::engine::testing
