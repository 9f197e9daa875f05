#pragma once

// Helpers shared by the fuzz targets of fuzz/: where the repository's rule sets are, and
// compiling the bundled ipex rule set once per process. Not thread-safe to initialise;
// libFuzzer and the replay driver call the targets from one thread.

#include <memory>
#include <string>

#include "server/compiler/compiled_rule_set.h"

namespace cds::fuzz {

// The repository's rules/ directory (CDS_SOURCE_DIR at build time; CDS_FUZZ_RULES_DIR in
// the environment overrides it).
std::string RulesDir();

// The highest version under rules/ipex/, compiled (aborts with a message when it does not
// compile: every input would be meaningless). Compiled on the first call, then shared.
const compiler::CompiledRuleSet& BundledIpexRuleSet();

// bench/typical_patient.textproto (30 findings, 5 measurements, 3 relatives), parsed once.
const cds::v1::Patient& TypicalPatient();

}  // namespace cds::fuzz
