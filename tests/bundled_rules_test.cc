// Every rule set shipped under rules/ must compile without errors and pass its own
// embedded test cases: the same checks the server runs before serving a version.

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "google/protobuf/text_format.h"
#include "gtest/gtest.h"
#include "server/compiler/compiler.h"
#include "server/compiler/source_loader.h"
#include "server/engine/case_runner.h"
#include "server/engine/engine.h"
#include "server/ontology/hpo_number.h"

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

// The engine looks a patient's HPO codes up by term number: those indexes hold exactly the
// HPO keys of the string-keyed ones, with the same concepts, and nothing else.
TEST_P(BundledRuleSetTest, HpoIndexesMirrorTheCodeIndexes) {
  absl::StatusOr<compiler::RuleSetSource> source = compiler::LoadRuleSetDir(GetParam());
  ASSERT_TRUE(source.ok()) << source.status();
  const compiler::CompileResult result = compiler::Compile(*source);
  ASSERT_TRUE(result.ok()) << result.IssuesToString();
  const compiler::CompiledRuleSet& rs = *result.rule_set;
  for (const bool excluded : {false, true}) {
    const auto& by_code = excluded ? rs.concepts_by_excluded_code : rs.concepts_by_code;
    const compiler::HpoConceptIndex& by_number =
        excluded ? rs.excluded_concepts_by_hpo : rs.concepts_by_hpo;
    size_t hpo_keys = 0;
    for (const auto& [key, concepts] : by_code) {
      const int32_t number =
          absl::StartsWith(key, "HPO|") ? ontology::HpoNumber(key.substr(4)) : -1;
      if (number < 0) continue;
      ++hpo_keys;
      const auto found = by_number.Find(number);
      ASSERT_TRUE(found.has_value()) << key;
      EXPECT_EQ(std::vector<int32_t>(found->begin(), found->end()), concepts) << key;
    }
    EXPECT_GT(hpo_keys, 100u);
    // Every number it answers for is one of those keys.
    for (int32_t number = 0; number < 7000000; number += 7) {
      if (!by_number.Find(number).has_value()) continue;
      EXPECT_TRUE(by_code.contains(absl::StrFormat("HPO|HP:%07d", number))) << number;
    }
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

// Every evidence item's and action's `source` line is where the parser's location tree puts
// it (Compile takes those lines from a scan of the file when it has nothing to report, as for
// a clean rule set like ipex 1.1.1, and from the tree otherwise).
TEST_P(BundledRuleSetTest, SourceLinesAreTheParsersLocations) {
  absl::StatusOr<compiler::RuleSetSource> source = compiler::LoadRuleSetDir(GetParam());
  ASSERT_TRUE(source.ok()) << source.status();
  const compiler::CompileResult result = compiler::Compile(*source);
  ASSERT_TRUE(result.ok()) << result.IssuesToString();
  std::string text;
  for (const compiler::SourceFile& file : source->files) {
    if (file.path == compiler::kRuleSetFile) text = file.content;
  }
  cds::v1::RuleSet rs;
  google::protobuf::TextFormat::ParseInfoTree tree;
  google::protobuf::TextFormat::Parser parser;
  parser.WriteLocationsTo(&tree);
  ASSERT_TRUE(parser.ParseFromString(text, &rs));
  const auto* descriptor = cds::v1::RuleSet::descriptor();
  const auto* hypotheses = descriptor->FindFieldByName("hypotheses");
  const auto* evidence = cds::v1::Hypothesis::descriptor()->FindFieldByName("evidence");
  const auto* actions = descriptor->FindFieldByName("actions");
  std::vector<std::string> want_evidence, want_actions;
  for (int h = 0; h < rs.hypotheses_size(); ++h) {
    const auto* nested = tree.GetTreeForNested(hypotheses, h);
    ASSERT_NE(nested, nullptr);
    for (int e = 0; e < rs.hypotheses(h).evidence_size(); ++e) {
      want_evidence.push_back(
          absl::StrCat(compiler::kRuleSetFile, ":", nested->GetLocation(evidence, e).line + 1));
    }
  }
  for (int a = 0; a < rs.actions_size(); ++a) {
    want_actions.push_back(
        absl::StrCat(compiler::kRuleSetFile, ":", tree.GetLocation(actions, a).line + 1));
  }
  std::vector<std::string> got_evidence, got_actions;
  for (const auto& ev : result.rule_set->evidence) got_evidence.push_back(ev.source);
  for (const auto& action : result.rule_set->actions) got_actions.push_back(action.source);
  EXPECT_EQ(got_evidence, want_evidence);
  EXPECT_EQ(got_actions, want_actions);
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
