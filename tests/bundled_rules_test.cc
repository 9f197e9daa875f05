// Every rule set shipped under rules/ must compile without errors and pass its own
// embedded test cases: the same checks the server runs before serving a version.

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "gtest/gtest.h"
#include "server/compiler/compiler.h"
#include "server/compiler/source_loader.h"
#include "server/engine/case_runner.h"
#include "server/engine/engine.h"

namespace cds {
namespace {

std::vector<std::string> BundledRuleSetDirs() {
  absl::StatusOr<std::vector<std::string>> dirs =
      compiler::FindRuleSetDirs(std::string(CDS_SOURCE_DIR) + "/rules");
  return dirs.ok() ? *dirs : std::vector<std::string>();
}

TEST(BundledRulesTest, TheIpexRuleSetIsBundled) {
  bool found = false;
  for (const std::string& dir : BundledRuleSetDirs()) {
    found |= dir.find("/ipex/") != std::string::npos;
  }
  EXPECT_TRUE(found);
}

class BundledRuleSetTest : public ::testing::TestWithParam<std::string> {};

TEST_P(BundledRuleSetTest, CompilesAndPassesItsCases) {
  absl::StatusOr<compiler::RuleSetSource> source = compiler::LoadRuleSetDir(GetParam());
  ASSERT_TRUE(source.ok()) << source.status();
  const compiler::CompileResult result = compiler::Compile(*source);
  ASSERT_TRUE(result.ok()) << result.IssuesToString();
  for (const compiler::Issue& issue : result.issues) {
    EXPECT_NE(issue.severity, compiler::Issue::Severity::kError) << issue.ToString();
  }
  ASSERT_GT(result.rule_set->tests.cases_size(), 0) << "a bundled rule set needs test cases";
  for (const engine::CaseResult& c : engine::RunCases(*result.rule_set, result.rule_set->tests)) {
    SCOPED_TRACE("case " + c.name);
    std::string failures;
    for (const std::string& f : c.failures) failures += "\n  " + f;
    EXPECT_TRUE(c.passed) << failures;
  }
}

// RunCases evaluates without explanations (they are most of a case's time, and no
// expectation reads them): the suggestions must be those of a fully explained call.
TEST_P(BundledRuleSetTest, CasesRankTheSameWithoutExplanations) {
  absl::StatusOr<compiler::RuleSetSource> source = compiler::LoadRuleSetDir(GetParam());
  ASSERT_TRUE(source.ok()) << source.status();
  const compiler::CompileResult result = compiler::Compile(*source);
  ASSERT_TRUE(result.ok()) << result.IssuesToString();
  for (const cds::v1::RuleSetTestCase& tc : result.rule_set->tests.cases()) {
    SCOPED_TRACE("case " + tc.name());
    cds::v1::EvaluateResponse explained, unexplained;
    ASSERT_TRUE(engine::Evaluate(*result.rule_set, tc.patient(), {}, &explained).ok());
    engine::EvaluateOptions options;
    options.explain = false;
    ASSERT_TRUE(engine::Evaluate(*result.rule_set, tc.patient(), options, &unexplained).ok());
    for (cds::v1::Suggestion& s : *explained.mutable_suggestions()) {
      s.clear_evidence();
      s.clear_references();
    }
    EXPECT_EQ(unexplained.SerializeAsString(), explained.SerializeAsString());
  }
}

std::string DirName(const ::testing::TestParamInfo<std::string>& info) {
  // ".../rules/ipex/1.0.0" -> "ipex_1_0_0" (test names allow only alphanumerics and _).
  const std::string& dir = info.param;
  const size_t version_at = dir.rfind('/');
  const size_t name_at = dir.rfind('/', version_at - 1);
  std::string name = dir.substr(name_at + 1);
  for (char& c : name) {
    if (!std::isalnum(static_cast<unsigned char>(c))) c = '_';
  }
  return name;
}

INSTANTIATE_TEST_SUITE_P(Rules, BundledRuleSetTest, ::testing::ValuesIn(BundledRuleSetDirs()),
                         DirName);
GTEST_ALLOW_UNINSTANTIATED_PARAMETERIZED_TEST(BundledRuleSetTest);

}  // namespace
}  // namespace cds
