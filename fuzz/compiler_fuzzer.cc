// Fuzz target: the rule-set compiler. The input is the text of a ruleset.textproto,
// compiled as rules/ipex/1.0.0/ would be (the ontology a rule set names is read from
// rules/ontology/, once per process). A rule set the compiler accepts is then evaluated for
// bench/typical_patient.textproto: whatever compiles must evaluate without crashing.

#include <cstddef>
#include <cstdint>
#include <string>

#include "cds/v1/service.pb.h"
#include "fuzz/fuzz_util.h"
#include "server/compiler/compiler.h"
#include "server/compiler/source_loader.h"
#include "server/engine/engine.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  cds::compiler::RuleSetSource source;
  source.expected_name = "ipex";
  source.files.push_back({cds::compiler::kRuleSetFile,
                          std::string(reinterpret_cast<const char*>(data), size)});
  source.ontology_provider = [](const std::string& release) {
    return cds::compiler::LoadOntologyCached(cds::fuzz::RulesDir() + "/ontology", release);
  };
  const cds::compiler::CompileResult result = cds::compiler::Compile(source);
  for (const cds::compiler::Issue& issue : result.issues) issue.ToString();
  if (!result.ok()) return 0;
  cds::v1::EvaluateResponse response;
  cds::engine::Evaluate(*result.rule_set, cds::fuzz::TypicalPatient(),
                        cds::engine::EvaluateOptions{}, &response)
      .IgnoreError();
  return 0;
}
