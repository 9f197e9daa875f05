#include "server/engine/engine.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "google/protobuf/text_format.h"
#include "gtest/gtest.h"
#include "server/compiler/compiler.h"
#include "server/engine/case_runner.h"
#include "server/engine/patient_check.h"

namespace cds::engine {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::IsEmpty;
using ::testing::Not;

constexpr char kHeader[] = R"pb(
  metadata { name: "t" version: "1.0.0" status: ACTIVE title: "T" disclaimer: "Support only." }
  references { id: "SRC" citation: "A source." }
  concepts { id: "diarrhoea" label: "Chronic diarrhoea" codes { system: "HPO" code: "HP:0002028" } codes { system: "HPO" code: "HP:0002041" } }
  concepts { id: "diabetes" label: "Diabetes" codes { system: "HPO" code: "HP:0000819" } }
  concepts { id: "eczema" label: "Eczema" codes { system: "HPO" code: "HP:0000964" } }
  concepts { id: "ipex_like" label: "IPEX-like illness" codes { system: "OMIM" code: "OMIM:304790" } }
  labs {
    id: "ige"
    label: "Total IgE"
    codes { system: "LOINC" code: "19113-0" }
    canonical_unit: "[IU]/mL"
    conversions { unit: "kU/L" factor: 1 provenance { reference_ids: "SRC" } }
    conversions { unit: "ng/mL" factor: 0.4 provenance { reference_ids: "SRC" } }
    limits { age { to { days: 183 } } upper: 13 provenance { reference_ids: "SRC" } }
    limits { age { from { days: 183 } } upper: 100 provenance { reference_ids: "SRC" } }
  }
)pb";

std::shared_ptr<const compiler::CompiledRuleSet> Build(const std::string& body) {
  compiler::RuleSetSource source;
  source.files.push_back({compiler::kRuleSetFile, std::string(kHeader) + body});
  compiler::CompileResult result = compiler::Compile(source);
  EXPECT_TRUE(result.ok()) << result.IssuesToString();
  return result.rule_set;
}

// One hypothesis "h" (pretest 0.1) with one evidence item whose condition is `when`,
// LR+ 4 and LR- 0.5; plus "other" (pretest 0.1, no evidence).
std::shared_ptr<const compiler::CompiledRuleSet> OneRule(const std::string& when) {
  return Build(R"pb(
    hypotheses {
      id: "h" title: "H" pretest_probability: 0.1 pretest_provenance { assumption: true note: "t" }
      evidence { id: "e" when { )pb" + when + R"pb( } likelihood_ratios { positive: 4 negative: 0.5 } provenance { reference_ids: "SRC" } }
    }
    hypotheses { id: "other" title: "Other" pretest_probability: 0.1 pretest_provenance { assumption: true note: "t" } }
  )pb");
}

cds::v1::Patient ParsePatient(const std::string& text) {
  cds::v1::Patient patient;
  EXPECT_TRUE(google::protobuf::TextFormat::ParseFromString(text, &patient)) << text;
  return patient;
}

cds::v1::EvaluateResponse EvaluateText(const compiler::CompiledRuleSet& rs, const std::string& patient_text,
                              EvaluateOptions options = {}) {
  cds::v1::EvaluateResponse response;
  const absl::Status status = Evaluate(rs, ParsePatient(patient_text), options, &response);
  EXPECT_TRUE(status.ok()) << status;
  return response;
}

double Probability(const cds::v1::EvaluateResponse& r, const std::string& id) {
  for (const auto& s : r.suggestions()) {
    if (s.kind() == cds::v1::DIAGNOSIS && s.rule_id() == id) return s.probability();
  }
  return -1;
}

// Posterior of "h" in OneRule for a likelihood ratio `lr`: differential of h (0.1),
// other (0.1) and none (0.8).
double Expected(double lr) { return 0.1 * lr / (0.1 * lr + 0.1 + 0.8); }

// Which LR the condition produced: 4 (TRUE), 0.5 (FALSE) or 1 (UNKNOWN).
double AppliedLr(const compiler::CompiledRuleSet& rs, const std::string& patient) {
  const double p = Probability(EvaluateText(rs, patient), "h");
  for (double lr : {4.0, 0.5, 1.0}) {
    if (std::fabs(p - Expected(lr)) < 1e-12) return lr;
  }
  ADD_FAILURE() << "unexpected posterior " << p;
  return -1;
}

TEST(EngineTest, OddsArithmeticOverTheDifferential) {
  auto rs = Build(R"pb(
    hypotheses {
      id: "a" title: "A" pretest_probability: 0.2 pretest_provenance { assumption: true note: "t" }
      evidence { id: "d" when { finding { concept: "diarrhoea" } } frequencies { in_hypothesis: 0.9 in_comparison: 0.3 } provenance { reference_ids: "SRC" } }
      evidence { id: "e" when { finding { concept: "eczema" } } likelihood_ratios { positive: 2 negative: 0.25 } provenance { reference_ids: "SRC" } }
    }
    hypotheses {
      id: "b" title: "B" pretest_probability: 0.3 pretest_provenance { assumption: true note: "t" }
      evidence { id: "d" when { finding { concept: "diarrhoea" } } likelihood_ratios { positive: 0.5 } provenance { reference_ids: "SRC" } }
    }
  )pb");
  // Diarrhoea present (LR 3 for a, 0.5 for b), eczema excluded (LR 0.25 for a).
  const auto r = EvaluateText(*rs, R"pb(
    sex: MALE
    findings { term { system: "HPO" code: "HP:0002041" } status: PRESENT }
    findings { term { system: "HPO" code: "HP:0000964" } status: EXCLUDED }
  )pb");
  const double wa = 0.2 * 3 * 0.25;
  const double wb = 0.3 * 0.5;
  const double z = wa + wb + 0.5;
  EXPECT_NEAR(Probability(r, "a"), wa / z, 1e-12);
  EXPECT_NEAR(Probability(r, "b"), wb / z, 1e-12);
  // Explanations: each item with its LR, the matched codes and the rule's source line.
  const auto& a = r.suggestions(0);
  ASSERT_EQ(a.rule_id(), "a");
  ASSERT_EQ(a.evidence_size(), 2);
  EXPECT_EQ(a.evidence(0).rule_id(), "a/e");  // |log 0.25| > |log 3|
  EXPECT_EQ(a.evidence(0).effect(), cds::v1::Evidence::NOT_MATCHED);
  EXPECT_NEAR(a.evidence(0).likelihood_ratio(), 0.25, 1e-12);
  EXPECT_EQ(a.evidence(1).effect(), cds::v1::Evidence::MATCHED);
  EXPECT_NEAR(a.evidence(1).likelihood_ratio(), 3, 1e-12);
  ASSERT_EQ(a.evidence(1).matched_codes_size(), 1);
  EXPECT_EQ(a.evidence(1).matched_codes(0).code(), "HP:0002041");
  EXPECT_THAT(a.evidence(1).source(), HasSubstr("ruleset.textproto:"));
  EXPECT_NEAR(a.pretest_probability(), 0.2, 1e-12);
}

TEST(EngineTest, NoFindingsLeavesPretestProbabilities) {
  auto rs = OneRule("finding { concept: \"diarrhoea\" }");
  const auto r = EvaluateText(*rs, "sex: UNKNOWN_SEX");
  EXPECT_NEAR(Probability(r, "h"), 0.1, 1e-12);
  EXPECT_NEAR(Probability(r, "other"), 0.1, 1e-12);
}

TEST(EngineTest, FindingCondition) {
  auto rs = OneRule("finding { concept: \"diarrhoea\" }");
  EXPECT_EQ(AppliedLr(*rs, R"pb(sex: MALE findings { term { system: "HPO" code: "HP:0002028" } status: PRESENT })pb"), 4);
  EXPECT_EQ(AppliedLr(*rs, R"pb(sex: MALE findings { term { code: "HP:0002028" } status: PRESENT })pb"), 4);
  EXPECT_EQ(AppliedLr(*rs, R"pb(sex: MALE findings { term { system: "HPO" code: "HP:0002028" } status: EXCLUDED })pb"), 0.5);
  EXPECT_EQ(AppliedLr(*rs, R"pb(sex: MALE findings { term { system: "HPO" code: "HP:0002028" } status: UNKNOWN })pb"), 1);
  EXPECT_EQ(AppliedLr(*rs, "sex: MALE"), 1);
  // Present under one code beats excluded under another, in either order (the engine
  // keeps a concept's value as its facts come in: EvidenceScore::finding_concept).
  EXPECT_EQ(AppliedLr(*rs, R"pb(sex: MALE
    findings { term { system: "HPO" code: "HP:0002028" } status: EXCLUDED }
    findings { term { system: "HPO" code: "HP:0002041" } status: PRESENT })pb"), 4);
  EXPECT_EQ(AppliedLr(*rs, R"pb(sex: MALE
    findings { term { system: "HPO" code: "HP:0002041" } status: PRESENT }
    findings { term { system: "HPO" code: "HP:0002028" } status: EXCLUDED }
    findings { term { system: "HPO" code: "HP:0002028" } status: UNKNOWN })pb"), 4);
  EXPECT_EQ(AppliedLr(*rs, R"pb(sex: MALE
    findings { term { system: "HPO" code: "HP:0002028" } status: UNKNOWN }
    findings { term { system: "HPO" code: "HP:0002041" } status: EXCLUDED })pb"), 0.5);
}

TEST(EngineTest, FindingOnsetCondition) {
  auto rs = OneRule("finding { concept: \"diabetes\" onset { to { days: 183 } } }");
  const std::string f = R"pb(sex: MALE findings { term { system: "HPO" code: "HP:0000819" } status: PRESENT )pb";
  EXPECT_EQ(AppliedLr(*rs, f + "onset { days: 20 } }"), 4);
  EXPECT_EQ(AppliedLr(*rs, f + "onset { iso8601_duration: \"P2M\" } }"), 4);
  EXPECT_EQ(AppliedLr(*rs, f + "onset { days: 400 } } age { days: 500 }"), 0.5);
  EXPECT_EQ(AppliedLr(*rs, f + "}"), 1);  // onset unknown
}

TEST(EngineTest, LabConditionUsesAgeLimitsAndUnits) {
  auto rs = OneRule("lab { lab: \"ige\" above_upper_limit_times: 1 measured_at { from { days: 30 } } }");
  auto lab = [](const std::string& value, const std::string& unit, int age_days) {
    return "sex: MALE measurements { assay { system: \"LOINC\" code: \"19113-0\" } value: " + value +
           " unit: \"" + unit + "\" age { days: " + std::to_string(age_days) + " } }";
  };
  EXPECT_EQ(AppliedLr(*rs, lab("50", "kU/L", 60)), 4);       // > 13 at 2 months
  EXPECT_EQ(AppliedLr(*rs, lab("50", "kU/L", 400)), 0.5);    // <= 100 after 6 months
  EXPECT_EQ(AppliedLr(*rs, lab("50", "ng/mL", 60)), 4);      // 20 IU/mL
  EXPECT_EQ(AppliedLr(*rs, lab("25", "ng/mL", 60)), 0.5);    // 10 IU/mL
  EXPECT_EQ(AppliedLr(*rs, lab("500", "kU/L", 10)), 1);      // too early to count
  EXPECT_EQ(AppliedLr(*rs, lab("50", "[iu]/ml", 60)), 4);    // units match case-insensitively
  // The reporting lab's own range overrides the default limit.
  EXPECT_EQ(AppliedLr(*rs, "sex: MALE measurements { assay { system: \"LOINC\" code: \"19113-0\" } "
                           "value: 50 unit: \"kU/L\" age { days: 60 } reference_range { high: 60 } }"),
            0.5);
  // The latest measurement decides.
  EXPECT_EQ(AppliedLr(*rs, lab("50", "kU/L", 60) + " measurements { assay { system: \"LOINC\" code: "
                                                   "\"19113-0\" } value: 5 unit: \"kU/L\" age { days: 90 } }"),
            0.5);
}

TEST(EngineTest, LabWithUnconvertibleUnitIsIgnoredWithWarning) {
  auto rs = OneRule("lab { lab: \"ige\" above: 10 }");
  const auto r = EvaluateText(*rs, R"pb(sex: MALE measurements { assay { system: "LOINC" code: "19113-0" } value: 50 unit: "mg/dL" age { days: 60 } })pb");
  EXPECT_NEAR(Probability(r, "h"), Expected(1), 1e-12);
  bool warned = false;
  for (const auto& w : r.warnings()) {
    if (w.kind() == cds::v1::Warning::UNCONVERTIBLE_UNIT) {
      warned = true;
      EXPECT_EQ(w.field(), "patient.measurements[0].unit");
    }
  }
  EXPECT_TRUE(warned);
}

TEST(EngineTest, SexCondition) {
  auto rs = OneRule("sex: MALE");
  EXPECT_EQ(AppliedLr(*rs, "sex: MALE"), 4);
  EXPECT_EQ(AppliedLr(*rs, "sex: FEMALE"), 0.5);
  EXPECT_EQ(AppliedLr(*rs, "sex: UNKNOWN_SEX"), 1);
}

TEST(EngineTest, AgeCondition) {
  auto rs = OneRule("age { to { days: 365 } }");
  EXPECT_EQ(AppliedLr(*rs, "sex: MALE age { days: 30 }"), 4);
  EXPECT_EQ(AppliedLr(*rs, "sex: MALE age { iso8601_duration: \"P3Y\" }"), 0.5);
  EXPECT_EQ(AppliedLr(*rs, "sex: MALE"), 1);
}

TEST(EngineTest, FamilyConditionFollowsTheMaternalXLine) {
  auto rs = OneRule(
      "family { line: MATERNAL_X_LINE sex: MALE affected_concept: \"ipex_like\" or_died_in_infancy: true }");
  EXPECT_EQ(AppliedLr(*rs, "sex: MALE"), 1);  // no history taken
  EXPECT_EQ(AppliedLr(*rs, "sex: MALE family_history { }"), 0.5);
  EXPECT_EQ(AppliedLr(*rs, "sex: MALE family_history { relatives { relationship: MATERNAL_UNCLE died_in_infancy: true } }"), 4);
  EXPECT_EQ(AppliedLr(*rs, "sex: MALE family_history { relatives { relationship: BROTHER conditions { code: \"OMIM:304790\" } } }"), 4);
  EXPECT_EQ(AppliedLr(*rs, "sex: MALE family_history { relatives { relationship: MATERNAL_COUSIN_VIA_AUNT sex: MALE died_in_infancy: true } }"), 4);
  // Not on the maternal X line, or not male.
  EXPECT_EQ(AppliedLr(*rs, "sex: MALE family_history { relatives { relationship: PATERNAL_UNCLE died_in_infancy: true } }"), 0.5);
  EXPECT_EQ(AppliedLr(*rs, "sex: MALE family_history { relatives { relationship: FATHER conditions { code: \"OMIM:304790\" } } }"), 0.5);
  EXPECT_EQ(AppliedLr(*rs, "sex: MALE family_history { relatives { relationship: MATERNAL_COUSIN_VIA_UNCLE sex: MALE died_in_infancy: true } }"), 0.5);
  EXPECT_EQ(AppliedLr(*rs, "sex: MALE family_history { relatives { relationship: SISTER died_in_infancy: true } }"), 0.5);
}

TEST(EngineTest, FamilyConditionMinCount) {
  auto rs = OneRule("family { line: ANY_LINE or_died_in_infancy: true min_count: 2 }");
  EXPECT_EQ(AppliedLr(*rs, "sex: MALE family_history { relatives { relationship: BROTHER died_in_infancy: true } }"), 0.5);
  EXPECT_EQ(AppliedLr(*rs, "sex: MALE family_history { relatives { relationship: BROTHER died_in_infancy: true } relatives { relationship: FATHER died_in_infancy: true } }"), 4);
}

TEST(EngineTest, ConsanguinityCondition) {
  auto rs = OneRule("consanguinity: true");
  EXPECT_EQ(AppliedLr(*rs, "sex: MALE"), 1);
  EXPECT_EQ(AppliedLr(*rs, "sex: MALE family_history { }"), 1);
  EXPECT_EQ(AppliedLr(*rs, "sex: MALE family_history { consanguinity: CONSANGUINEOUS }"), 4);
  EXPECT_EQ(AppliedLr(*rs, "sex: MALE family_history { consanguinity: NOT_CONSANGUINEOUS }"), 0.5);
}

// Kleene logic over two findings: d (diarrhoea) and e (eczema), each present (P),
// excluded (X) or not recorded (-).
std::string Two(char d, char e) {
  std::string text = "sex: MALE ";
  auto add = [&](char state, const char* code) {
    if (state == '-') return;
    text += std::string("findings { term { system: \"HPO\" code: \"") + code + "\" } status: " +
            (state == 'P' ? "PRESENT" : "EXCLUDED") + " } ";
  };
  add(d, "HP:0002028");
  add(e, "HP:0000964");
  return text;
}

TEST(EngineTest, AllAnyNotAtLeast) {
  const std::string d = "{ finding { concept: \"diarrhoea\" } }";
  const std::string e = "{ finding { concept: \"eczema\" } }";
  auto all = OneRule("all { conditions " + d + " conditions " + e + " }");
  EXPECT_EQ(AppliedLr(*all, Two('P', 'P')), 4);
  EXPECT_EQ(AppliedLr(*all, Two('P', '-')), 1);
  EXPECT_EQ(AppliedLr(*all, Two('X', '-')), 0.5);
  auto any = OneRule("any { conditions " + d + " conditions " + e + " }");
  EXPECT_EQ(AppliedLr(*any, Two('P', '-')), 4);
  EXPECT_EQ(AppliedLr(*any, Two('X', '-')), 1);
  EXPECT_EQ(AppliedLr(*any, Two('X', 'X')), 0.5);
  auto negation = OneRule("not " + d);
  EXPECT_EQ(AppliedLr(*negation, Two('X', '-')), 4);
  EXPECT_EQ(AppliedLr(*negation, Two('P', '-')), 0.5);
  EXPECT_EQ(AppliedLr(*negation, Two('-', '-')), 1);
  auto at_least = OneRule("at_least { count: 2 conditions " + d + " conditions " + e +
                          " conditions { sex: MALE } }");
  EXPECT_EQ(AppliedLr(*at_least, Two('P', '-')), 4);   // diarrhoea + male
  EXPECT_EQ(AppliedLr(*at_least, Two('X', '-')), 1);   // male, eczema unknown
  EXPECT_EQ(AppliedLr(*at_least, Two('X', 'X')), 0.5);
}

TEST(EngineTest, CorrelatedGroupCountsOnlyTheStrongest) {
  auto rs = Build(R"pb(
    hypotheses {
      id: "h" title: "H" pretest_probability: 0.1 pretest_provenance { assumption: true note: "t" }
      evidence { id: "weak" group: "atopy" when { finding { concept: "eczema" } } likelihood_ratios { positive: 2 } provenance { reference_ids: "SRC" } }
      evidence { id: "strong" group: "atopy" when { lab { lab: "ige" above: 10 } } likelihood_ratios { positive: 8 } provenance { reference_ids: "SRC" } }
    }
  )pb");
  const auto r = EvaluateText(*rs, R"pb(sex: MALE
    findings { term { system: "HPO" code: "HP:0000964" } status: PRESENT }
    measurements { assay { system: "LOINC" code: "19113-0" } value: 50 unit: "kU/L" age { days: 60 } })pb");
  EXPECT_NEAR(Probability(r, "h"), 0.8 / (0.8 + 0.9), 1e-12);
  const auto& s = r.suggestions(0);
  ASSERT_EQ(s.evidence_size(), 2);
  EXPECT_EQ(s.evidence(0).rule_id(), "h/strong");
  EXPECT_THAT(s.evidence(0).description(), HasSubstr("Total IgE 50 [IU]/mL > 10"));
  EXPECT_FALSE(s.evidence(0).superseded());
  EXPECT_EQ(s.evidence(1).rule_id(), "h/weak");
  EXPECT_TRUE(s.evidence(1).superseded());
  EXPECT_EQ(s.evidence(1).likelihood_ratio(), 1.0);
}

TEST(EngineTest, MaxProbabilityCapsThePosterior) {
  auto rs = Build(R"pb(
    hypotheses {
      id: "h" title: "H" pretest_probability: 0.5 pretest_provenance { assumption: true note: "t" }
      max_probability: 0.9 max_probability_provenance { assumption: true note: "t" }
      evidence { id: "e" when { sex: MALE } likelihood_ratios { positive: 100 } provenance { reference_ids: "SRC" } }
    }
  )pb");
  EXPECT_NEAR(Probability(EvaluateText(*rs, "sex: MALE"), "h"), 0.9, 1e-12);
}

TEST(EngineTest, RankingIsDeterministic) {
  auto rs = Build(R"pb(
    hypotheses { id: "zeta" title: "Z" pretest_probability: 0.1 pretest_provenance { assumption: true note: "t" } }
    hypotheses { id: "alpha" title: "A" pretest_probability: 0.1 pretest_provenance { assumption: true note: "t" } }
    hypotheses { id: "mid" title: "M" pretest_probability: 0.2 pretest_provenance { assumption: true note: "t" } }
    actions { id: "t_b" kind: TEST title: "T" urgency: WARNING priority: 1 when { sex: MALE } }
    actions { id: "t_a" kind: TEST title: "T" urgency: WARNING priority: 1 when { sex: MALE } }
    actions { id: "t_first" kind: REFERRAL title: "T" urgency: WARNING priority: 0 when { sex: MALE } }
    actions { id: "t_info" kind: TREATMENT title: "T" urgency: INFO priority: -5 when { sex: MALE } }
    actions { id: "t_crit" kind: TEST title: "T" urgency: CRITICAL priority: 9 when { sex: MALE } }
    actions { id: "alert_w" kind: ALERT title: "A" urgency: WARNING when { sex: MALE } }
    actions { id: "alert_c" kind: ALERT title: "A" urgency: CRITICAL when { sex: MALE } }
  )pb");
  const auto r = EvaluateText(*rs, "sex: MALE");
  std::vector<std::string> order;
  for (const auto& s : r.suggestions()) order.push_back(s.rule_id());
  EXPECT_THAT(order, ElementsAre("alert_c", "alert_w", "mid", "alpha", "zeta", "t_crit", "t_first",
                                 "t_a", "t_b", "t_info"));
  for (int i = 0; i < r.suggestions_size(); ++i) {
    EXPECT_EQ(r.suggestions(i).rank(), i + 1);
    EXPECT_FALSE(r.suggestions(i).has_code()) << "rules without a code leave it unset";
  }
}

TEST(EngineTest, ProbabilityConditionsDriveActions) {
  auto rs = Build(R"pb(
    hypotheses {
      id: "h" title: "H" pretest_probability: 0.05 pretest_provenance { assumption: true note: "t" }
      evidence { id: "d" when { finding { concept: "diarrhoea" } } likelihood_ratios { positive: 20 negative: 0.1 } provenance { reference_ids: "SRC" } }
    }
    hypotheses { id: "g" title: "G" pretest_probability: 0.1 pretest_provenance { assumption: true note: "t" } }
    actions { id: "test_h" kind: TEST title: "Test for H" urgency: WARNING reference_ids: "SRC"
              when { all { conditions { probability { hypothesis: "h" at_least: 0.3 in_top: 1 } } conditions { sex: MALE } } } }
  )pb");
  const auto fired = EvaluateText(*rs, R"pb(sex: MALE findings { term { system: "HPO" code: "HP:0002028" } status: PRESENT })pb");
  const auto& last = fired.suggestions(fired.suggestions_size() - 1);
  EXPECT_EQ(last.rule_id(), "test_h");
  EXPECT_EQ(last.kind(), cds::v1::TEST);
  ASSERT_GE(last.evidence_size(), 2);  // both leaves explain it
  EXPECT_EQ(last.references_size(), 1);
  const auto quiet = EvaluateText(*rs, R"pb(sex: MALE findings { term { system: "HPO" code: "HP:0002028" } status: EXCLUDED })pb");
  for (const auto& s : quiet.suggestions()) EXPECT_NE(s.rule_id(), "test_h");
  const auto female = EvaluateText(*rs, R"pb(sex: FEMALE findings { term { system: "HPO" code: "HP:0002028" } status: PRESENT })pb");
  for (const auto& s : female.suggestions()) EXPECT_NE(s.rule_id(), "test_h");
}

// Actions keyed on a probability are found by walking the ranking: the hypothesis need not
// have been moved by any evidence (its pretest may be enough), and in_top is a rank.
TEST(EngineTest, ProbabilityTriggersFollowTheRanking) {
  auto rs = Build(R"pb(
    hypotheses {
      id: "a" title: "A" pretest_probability: 0.3 pretest_provenance { assumption: true note: "t" }
      evidence { id: "d" when { finding { concept: "diarrhoea" } } likelihood_ratios { positive: 20 negative: 0.1 } provenance { reference_ids: "SRC" } }
    }
    hypotheses { id: "b" title: "B" pretest_probability: 0.25 pretest_provenance { assumption: true note: "t" } }
    actions { id: "b_likely" kind: TEST title: "B" urgency: INFO when { probability { hypothesis: "b" at_least: 0.2 } } }
    actions { id: "b_very_likely" kind: TEST title: "B!" urgency: INFO when { probability { hypothesis: "b" at_least: 0.5 } } }
    actions { id: "b_first" kind: TEST title: "B first" urgency: INFO when { probability { hypothesis: "b" at_least: 0 in_top: 1 } } }
  )pb");
  ASSERT_NE(rs, nullptr);
  auto fired = [&](const std::string& patient) {
    std::vector<std::string> ids;
    const cds::v1::EvaluateResponse response = EvaluateText(*rs, patient);
    for (const auto& s : response.suggestions()) {
      if (s.kind() != cds::v1::DIAGNOSIS) ids.push_back(s.rule_id());
    }
    return ids;
  };
  // No evidence at all: b at its pretest (0.25) ranks second.
  EXPECT_THAT(fired("sex: MALE"), ::testing::ElementsAre("b_likely"));
  // Diarrhoea excluded: a falls (LR- 0.1) and b, still untouched, ranks first.
  EXPECT_THAT(fired(R"pb(sex: MALE findings { term { code: "HP:0002028" } status: EXCLUDED })pb"),
              ::testing::UnorderedElementsAre("b_likely", "b_first"));
  // Diarrhoea present: a rises and b falls below 0.2.
  EXPECT_THAT(fired(R"pb(sex: MALE findings { term { code: "HP:0002028" } status: PRESENT })pb"),
              IsEmpty());
}

// Shannon entropy in bits, computed here independently of the engine.
double EntropyBits(const std::vector<double>& p) {
  double h = 0;
  for (double x : p) h -= x > 0 ? x * std::log2(x) : 0;
  return h;
}

TEST(EngineTest, TestsAreRankedByExpectedInformationGain) {
  auto rs = Build(R"pb(
    hypotheses {
      id: "a" title: "A" pretest_probability: 0.2 pretest_provenance { assumption: true note: "t" }
      evidence { id: "d" when { finding { concept: "diarrhoea" } } frequencies { in_hypothesis: 0.9 in_comparison: 0.1 } provenance { reference_ids: "SRC" } }
      evidence { id: "e" when { finding { concept: "eczema" } } frequencies { in_hypothesis: 0.6 in_comparison: 0.2 } provenance { reference_ids: "SRC" } }
    }
    hypotheses {
      id: "b" title: "B" pretest_probability: 0.2 pretest_provenance { assumption: true note: "t" }
      evidence { id: "d" when { finding { concept: "diarrhoea" } } likelihood_ratios { positive: 1 negative: 1 } provenance { reference_ids: "SRC" } }
    }
    actions { id: "ask_eczema" kind: TEST title: "Examine skin" urgency: WARNING information { concepts: "eczema" } }
    actions { id: "ask_diarrhoea" kind: TEST title: "Stool history" urgency: WARNING information { concepts: "diarrhoea" } }
    actions { id: "picky" kind: TEST title: "Never worth it" urgency: WARNING information { concepts: "eczema" min_gain_bits: 0.5 } }
  )pb");
  const auto r = EvaluateText(*rs, "sex: MALE");
  std::vector<const cds::v1::Suggestion*> tests;
  for (const auto& s : r.suggestions()) {
    if (s.kind() == cds::v1::TEST) tests.push_back(&s);
  }
  ASSERT_EQ(tests.size(), 2u);
  EXPECT_EQ(tests[0]->rule_id(), "ask_diarrhoea");
  EXPECT_EQ(tests[1]->rule_id(), "ask_eczema");
  // By hand: belief (a, b, none) = (0.2, 0.2, 0.6); P(d | a) = 0.9, otherwise 0.1 (b has
  // no usable frequency, so it takes the comparison's).
  const auto entropy = EntropyBits;
  const double p_pos = 0.2 * 0.9 + 0.8 * 0.1;
  const double expected =
      entropy({0.2, 0.2, 0.6}) -
      p_pos * entropy({0.18 / p_pos, 0.02 / p_pos, 0.06 / p_pos}) -
      (1 - p_pos) * entropy({0.02 / (1 - p_pos), 0.18 / (1 - p_pos), 0.54 / (1 - p_pos)});
  EXPECT_NEAR(tests[0]->expected_information_gain(), expected, 1e-9);
  EXPECT_THAT(tests[0]->detail(), HasSubstr("bits over the differential"));
  EXPECT_THAT(tests[0]->evidence(0).description(), HasSubstr("Not yet recorded: Chronic diarrhoea"));
  // A test whose result is known is not suggested again.
  const auto known = EvaluateText(*rs, R"pb(sex: MALE findings { term { code: "HP:0002028" } status: EXCLUDED })pb");
  for (const auto& s : known.suggestions()) EXPECT_NE(s.rule_id(), "ask_diarrhoea");
}

// A test revealing two facts: the gain is the mutual information of the differential and
// the four joint outcomes, here computed the other way round (entropy of the differential
// minus its expected entropy once the outcome is known) by enumerating them.
TEST(EngineTest, InformationGainOfSeveralFactsIsTheirJointOutcomes) {
  auto rs = Build(R"pb(
    hypotheses {
      id: "a" title: "A" pretest_probability: 0.2 pretest_provenance { assumption: true note: "t" }
      evidence { id: "d" when { finding { concept: "diarrhoea" } } frequencies { in_hypothesis: 0.9 in_comparison: 0.1 } provenance { reference_ids: "SRC" } }
      evidence { id: "e" when { finding { concept: "eczema" } } frequencies { in_hypothesis: 0.6 in_comparison: 0.2 } provenance { reference_ids: "SRC" } }
    }
    hypotheses {
      id: "b" title: "B" pretest_probability: 0.3 pretest_provenance { assumption: true note: "t" }
      evidence { id: "e" when { finding { concept: "eczema" } } frequencies { in_hypothesis: 0.7 in_comparison: 0.3 } provenance { reference_ids: "SRC" } }
    }
    actions { id: "both" kind: TEST title: "Both" urgency: WARNING information { concepts: "diarrhoea" concepts: "eczema" } }
  )pb");
  const auto r = EvaluateText(*rs, "sex: MALE");
  const cds::v1::Suggestion* test = nullptr;
  for (const auto& s : r.suggestions()) {
    if (s.rule_id() == "both") test = &s;
  }
  ASSERT_NE(test, nullptr);
  // Classes (a, b, none) with beliefs (0.2, 0.3, 0.5). P(diarrhoea): a 0.9, else 0.1 (the
  // comparison's). P(eczema): a 0.6, b 0.7, else the mean comparison frequency 0.25.
  const std::vector<double> belief = {0.2, 0.3, 0.5};
  const std::vector<double> p_d = {0.9, 0.1, 0.1};
  const std::vector<double> p_e = {0.6, 0.7, 0.25};
  double expected = EntropyBits(belief);
  for (int d = 0; d < 2; ++d) {
    for (int e = 0; e < 2; ++e) {
      std::vector<double> joint(3);
      double p_outcome = 0;
      for (int c = 0; c < 3; ++c) {
        joint[c] = belief[c] * (d ? p_d[c] : 1 - p_d[c]) * (e ? p_e[c] : 1 - p_e[c]);
        p_outcome += joint[c];
      }
      for (double& x : joint) x /= p_outcome;
      expected -= p_outcome * EntropyBits(joint);
    }
  }
  EXPECT_NEAR(test->expected_information_gain(), expected, 1e-12);
}

TEST(EngineTest, ExplanationsCanBeTurnedOff) {
  auto rs = OneRule("finding { concept: \"diarrhoea\" }");
  EvaluateOptions options;
  options.explain = false;
  const auto r = EvaluateText(*rs, R"pb(sex: MALE findings { term { system: "HPO" code: "HP:0002028" } status: PRESENT })pb", options);
  for (const auto& s : r.suggestions()) EXPECT_EQ(s.evidence_size(), 0);
  EXPECT_NEAR(Probability(r, "h"), Expected(4), 1e-12);
}

TEST(EngineTest, ResponseNamesRuleSetAndWarnsAboutUnknownCodesAndMissingData) {
  auto rs = Build(R"pb(
    hypotheses {
      id: "h" title: "H" pretest_probability: 0.1 pretest_provenance { assumption: true note: "t" }
      evidence { id: "ige" when { lab { lab: "ige" above: 100 } } likelihood_ratios { positive: 3 } provenance { reference_ids: "SRC" } }
      evidence { id: "fam" when { family { line: ANY_LINE or_died_in_infancy: true } } likelihood_ratios { positive: 3 } provenance { reference_ids: "SRC" } }
      evidence { id: "sex" when { sex: MALE } likelihood_ratios { positive: 2 } provenance { reference_ids: "SRC" } }
    }
  )pb");
  const auto r = EvaluateText(*rs, R"pb(sex: UNKNOWN_SEX
    findings { term { system: "HPO" code: "HP:9999999" } status: PRESENT }
    measurements { assay { system: "LOINC" code: "0000-0" } value: 1 unit: "g/L" })pb");
  EXPECT_EQ(r.rule_set().name(), "t");
  EXPECT_EQ(r.rule_set().version(), "1.0.0");
  EXPECT_EQ(r.rule_set().digest(), rs->digest);
  EXPECT_EQ(r.disclaimer(), "Support only.");
  std::vector<std::string> fields;
  for (const auto& w : r.warnings()) fields.push_back(w.field());
  EXPECT_THAT(fields, testing::UnorderedElementsAre(
                          "patient.findings[0].term", "patient.measurements[0].assay", "patient.sex",
                          "patient.family_history", "patient.measurements"));
}

TEST(EngineTest, AlwaysListsAlternatives) {
  auto rs = OneRule("sex: MALE");
  const auto r = EvaluateText(*rs, "sex: FEMALE");
  int diagnoses = 0;
  for (const auto& s : r.suggestions()) diagnoses += s.kind() == cds::v1::DIAGNOSIS;
  EXPECT_EQ(diagnoses, 2);
}

struct InvalidCase {
  const char* patient;
  const char* field;
};

class InvalidPatientTest : public testing::TestWithParam<InvalidCase> {};

TEST_P(InvalidPatientTest, IsRejectedNamingTheField) {
  auto rs = OneRule("sex: MALE");
  cds::v1::EvaluateResponse response;
  const absl::Status status =
      Evaluate(*rs, ParsePatient(GetParam().patient), EvaluateOptions{}, &response);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(status.message()), HasSubstr(GetParam().field));
  // No patient data: the distinctive reference and values never appear.
  EXPECT_THAT(std::string(status.message()), Not(HasSubstr("SECRET")));
  EXPECT_THAT(std::string(status.message()), Not(HasSubstr("12345.6")));
}

INSTANTIATE_TEST_SUITE_P(
    Malformed, InvalidPatientTest,
    testing::Values(
        InvalidCase{"reference: \"SECRET\"", "patient.sex"},
        InvalidCase{"reference: \"SECRET\" sex: 99", "patient.sex"},
        InvalidCase{"sex: MALE age { days: -12345.6 }", "patient.age"},
        InvalidCase{"sex: MALE age { days: nan }", "patient.age"},
        InvalidCase{"sex: MALE age { iso8601_duration: \"SECRET\" }", "patient.age"},
        InvalidCase{"sex: MALE findings { status: PRESENT }", "patient.findings[0].term"},
        InvalidCase{"sex: MALE findings { term { system: \"HPO\" } status: PRESENT }",
                    "patient.findings[0].term.code"},
        InvalidCase{"sex: MALE findings { term { code: \"SECRET\" } status: PRESENT }",
                    "patient.findings[0].term.system"},
        InvalidCase{"sex: MALE findings { term { code: \"HP:0000001\" } }",
                    "patient.findings[0].status"},
        InvalidCase{"sex: MALE findings { term { code: \"HP:0000001\" } status: PRESENT onset { days: -1 } }",
                    "patient.findings[0].onset"},
        InvalidCase{"sex: MALE age { days: 10 } findings { term { code: \"HP:0000001\" } status: PRESENT onset { days: 100 } }",
                    "patient.findings[0].onset"},
        InvalidCase{"sex: MALE measurements { value: 1 unit: \"g/L\" }", "patient.measurements[0].assay"},
        InvalidCase{"sex: MALE measurements { assay { system: \"LOINC\" code: \"1-8\" } value: inf unit: \"g/L\" }",
                    "patient.measurements[0].value"},
        InvalidCase{"sex: MALE measurements { assay { system: \"LOINC\" code: \"1-8\" } value: -12345.6 unit: \"g/L\" }",
                    "patient.measurements[0].value"},
        InvalidCase{"sex: MALE measurements { assay { system: \"LOINC\" code: \"1-8\" } value: 1 }",
                    "patient.measurements[0].unit"},
        InvalidCase{"sex: MALE measurements { assay { system: \"LOINC\" code: \"1-8\" } value: 1 unit: \"g\" reference_range { low: 5 high: 1 } }",
                    "patient.measurements[0].reference_range"},
        InvalidCase{"sex: MALE family_history { relatives { sex: MALE } }",
                    "patient.family_history.relatives[0].relationship"},
        InvalidCase{"sex: MALE family_history { relatives { relationship: BROTHER conditions { system: \"OMIM\" } } }",
                    "patient.family_history.relatives[0].conditions[0].code"}));

// The engine and the service apply one set of rules: the engine refuses with the first
// violation CheckPatient finds, the service reports them all.
TEST(PatientCheckTest, EngineRefusesWithTheFirstViolationOfCheckPatient) {
  const cds::v1::Patient patient = ParsePatient(R"pb(
    findings { term { system: "HPO" code: "HP:12" } status: PRESENT }
    measurements { assay { system: "LOINC" code: "19113-0" } value: -1 unit: "g/L" }
  )pb");
  Violations all(20);
  CheckPatient(patient, all);
  ASSERT_EQ(all.total(), 3);
  EXPECT_EQ(all.kept()[0].field, "patient.sex");
  EXPECT_EQ(all.kept()[1].field, "patient.findings[0].term.code");
  EXPECT_EQ(all.kept()[2].field, "patient.measurements[0].value");
  const absl::Status status = ValidatePatient(patient);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(status.message(), "patient.sex " + all.kept()[0].description);
  Violations none(20);
  CheckPatient(ParsePatient("sex: MALE"), none);
  EXPECT_TRUE(none.empty());
}

TEST(CaseRunnerTest, ReportsEachUnmetExpectation) {
  auto rs = OneRule("finding { concept: \"diarrhoea\" }");
  cds::v1::RuleSetTests tests;
  ASSERT_TRUE(google::protobuf::TextFormat::ParseFromString(R"pb(
    cases {
      name: "passes"
      patient { sex: MALE findings { term { code: "HP:0002028" } status: PRESENT } }
      expect { top_diagnosis: "h" diagnoses_in_top: "other" probabilities { hypothesis: "h" at_least: 0.3 at_most: 0.4 } }
    }
    cases {
      name: "fails"
      patient { sex: MALE findings { term { code: "HP:0002028" } status: EXCLUDED } }
      expect { top_diagnosis: "h" not_top_diagnosis: "other" actions: "nope" probabilities { hypothesis: "h" at_least: 0.5 } }
    }
    cases { name: "invalid" patient { } expect { top_diagnosis: "h" } }
  )pb", &tests));
  const auto results = RunCases(*rs, tests);
  ASSERT_EQ(results.size(), 3u);
  EXPECT_TRUE(results[0].passed) << testing::PrintToString(results[0].failures);
  EXPECT_FALSE(results[1].passed);
  EXPECT_EQ(results[1].failures.size(), 4u) << testing::PrintToString(results[1].failures);
  EXPECT_FALSE(results[2].passed);
  EXPECT_THAT(results[2].failures[0], HasSubstr("patient.sex"));
  EXPECT_FALSE(AllPassed(results));
}

}  // namespace
}  // namespace cds::engine

namespace cds::engine {
namespace {

constexpr char kMiniHpo[] =
    "id\tlabel\tparents\talt_ids\tstatus\n"
    "HP:0000001\tAll\t\t\tlive\n"
    "HP:0002014\tDiarrhea\tHP:0000001\t\tlive\n"
    "HP:0002028\tChronic diarrhea\tHP:0002014\tHP:0000777\tlive\n"
    "HP:0002041\tIntractable diarrhea\tHP:0002028\t\tlive\n"
    "HP:0004385\tProtracted diarrhea\tHP:0002014\t\tlive\n"
    "HP:0000555\tobsolete Old intractable diarrhea\t\t\tobsolete>HP:0002041\n";

compiler::CompileResult CompileWithOntology(const std::string& concept_code) {
  compiler::RuleSetSource source;
  source.files.push_back({compiler::kRuleSetFile, R"pb(
    metadata { name: "t" version: "1.0.0" status: ACTIVE title: "T" disclaimer: "Support only." ontology: "hp-mini" }
    references { id: "SRC" citation: "A source." }
    concepts { id: "chronic" label: "Chronic diarrhoea" codes { system: "HPO" code: ")pb" + concept_code + R"pb(" } }
    hypotheses {
      id: "h" title: "H" pretest_probability: 0.1 pretest_provenance { assumption: true note: "t" }
      evidence { id: "e" when { finding { concept: "chronic" } } likelihood_ratios { positive: 4 negative: 0.5 } provenance { reference_ids: "SRC" } }
    }
  )pb"});
  source.ontology_provider = [](const std::string& release)
      -> absl::StatusOr<std::shared_ptr<const ontology::Ontology>> {
    if (release != "hp-mini") return absl::NotFoundError("no such release");
    return ontology::Ontology::Parse(kMiniHpo, release);
  };
  return compiler::Compile(source);
}

double HypothesisProbability(const compiler::CompiledRuleSet& rs, const std::string& finding) {
  cds::v1::EvaluateResponse response;
  EXPECT_TRUE(Evaluate(rs, ParsePatient("sex: MALE " + finding), EvaluateOptions{}, &response).ok());
  return response.suggestions(0).probability();
}

TEST(OntologyMatchingTest, ConceptsMatchDescendantsAndExclusionsOfAncestors) {
  const auto result = CompileWithOntology("HP:0002028");
  ASSERT_TRUE(result.ok()) << result.IssuesToString();
  const auto& rs = *result.rule_set;
  const double yes = 0.4 / 1.3;
  const double no = 0.05 / 0.95;
  const double none = 0.1;
  auto finding = [](const char* code, const char* status) {
    return std::string("findings { term { system: \"HPO\" code: \"") + code + "\" } status: " +
           status + " }";
  };
  EXPECT_NEAR(HypothesisProbability(rs, finding("HP:0002028", "PRESENT")), yes, 1e-12);
  EXPECT_NEAR(HypothesisProbability(rs, finding("HP:0002041", "PRESENT")), yes, 1e-12);  // child
  EXPECT_NEAR(HypothesisProbability(rs, finding("HP:0000555", "PRESENT")), yes, 1e-12);  // obsolete id of a child
  EXPECT_NEAR(HypothesisProbability(rs, finding("HP:0000777", "PRESENT")), yes, 1e-12);  // alternative id
  EXPECT_NEAR(HypothesisProbability(rs, finding("HP:0002014", "PRESENT")), none, 1e-12);  // parent: too vague
  EXPECT_NEAR(HypothesisProbability(rs, finding("HP:0004385", "PRESENT")), none, 1e-12);  // sibling
  EXPECT_NEAR(HypothesisProbability(rs, finding("HP:0002014", "EXCLUDED")), no, 1e-12);  // no diarrhoea at all
  EXPECT_NEAR(HypothesisProbability(rs, finding("HP:0002041", "EXCLUDED")), none, 1e-12);  // a narrower term
}

TEST(OntologyMatchingTest, ResponseNamesReleaseAndWarnsOnlyForIdsTheOntologyLacks) {
  const auto result = CompileWithOntology("HP:0002028");
  ASSERT_TRUE(result.ok());
  cds::v1::EvaluateResponse response;
  ASSERT_TRUE(Evaluate(*result.rule_set, ParsePatient(R"pb(sex: MALE
    findings { term { system: "HPO" code: "HP:0004385" } status: PRESENT }
    findings { term { system: "HPO" code: "HP:5210041" } status: PRESENT })pb"),
                       EvaluateOptions{}, &response).ok());
  EXPECT_EQ(response.rule_set().ontology(), "hp-mini");
  ASSERT_EQ(response.warnings_size(), 1);
  EXPECT_EQ(response.warnings(0).kind(), cds::v1::Warning::UNKNOWN_CODE);
  EXPECT_EQ(response.warnings(0).field(), "patient.findings[1].term");
}

TEST(OntologyMatchingTest, CompilerChecksCodesAgainstTheRelease) {
  EXPECT_THAT(CompileWithOntology("HP:0099999").IssuesToString(),
              HasSubstr("HP:0099999 is not in ontology release hp-mini"));
  const auto obsolete = CompileWithOntology("HP:0000555");
  EXPECT_TRUE(obsolete.ok());
  EXPECT_THAT(obsolete.IssuesToString(), HasSubstr("use HP:0002041"));
  compiler::RuleSetSource source;
  source.files.push_back({compiler::kRuleSetFile,
                          R"pb(metadata { name: "t" version: "1.0.0" status: ACTIVE title: "T"
                                          disclaimer: "x" ontology: "hp-mini" })pb"});
  EXPECT_THAT(compiler::Compile(source).IssuesToString(), HasSubstr("no ontology directory"));
}

}  // namespace
}  // namespace cds::engine

namespace cds::engine {
namespace {

TEST(DerivedLabTest, AbsoluteCountFromPercentageAndTotal) {
  compiler::RuleSetSource source;
  source.files.push_back({compiler::kRuleSetFile, R"pb(
    metadata { name: "t" version: "1.0.0" status: ACTIVE title: "T" disclaimer: "Support only." }
    references { id: "SRC" citation: "A source." }
    labs { id: "eos_pct" label: "Eosinophils %" canonical_unit: "%" codes { system: "LOINC" code: "713-8" } }
    labs {
      id: "wbc" label: "Leukocytes" canonical_unit: "10*9/L" codes { system: "LOINC" code: "6690-2" }
      conversions { unit: "/uL" factor: 0.001 provenance { reference_ids: "SRC" } }
    }
    labs {
      id: "eos" label: "Eosinophils" canonical_unit: "10*9/L" codes { system: "LOINC" code: "711-2" }
      derived_from { percent_lab: "eos_pct" total_lab: "wbc" max_days_apart: 1 }
    }
    hypotheses {
      id: "h" title: "H" pretest_probability: 0.1 pretest_provenance { assumption: true note: "t" }
      evidence { id: "e" when { lab { lab: "eos" above: 0.5 } } likelihood_ratios { positive: 4 negative: 0.5 } provenance { reference_ids: "SRC" } }
    }
  )pb"});
  const auto result = compiler::Compile(source);
  ASSERT_TRUE(result.ok()) << result.IssuesToString();
  auto probability = [&](const std::string& measurements) {
    cds::v1::EvaluateResponse response;
    EXPECT_TRUE(Evaluate(*result.rule_set, ParsePatient("sex: MALE " + measurements), EvaluateOptions{},
                         &response).ok());
    return response;
  };
  const std::string pct = R"pb(measurements { assay { system: "LOINC" code: "713-8" } value: 8 unit: "%" age { days: 40 } })pb";
  const std::string wbc = R"pb(measurements { assay { system: "LOINC" code: "6690-2" } value: 12000 unit: "/uL" age { days: 40 } })pb";
  const std::string late_wbc = R"pb(measurements { assay { system: "LOINC" code: "6690-2" } value: 12000 unit: "/uL" age { days: 60 } })pb";
  // 8% of 12 x 10^9/L = 0.96 x 10^9/L > 0.5.
  EXPECT_NEAR(probability(pct + wbc).suggestions(0).probability(), 0.4 / 1.3, 1e-12);
  const auto alone = probability(pct + late_wbc);
  EXPECT_NEAR(alone.suggestions(0).probability(), 0.1, 1e-12);
  bool warned = false;
  for (const auto& w : alone.warnings()) warned |= w.message().find("cannot give Eosinophils") != std::string::npos;
  EXPECT_TRUE(warned);
}


// Demographic folding: the compiler decides evidence on sex and age alone per (sex, age
// band) ahead of time, and evaluates an action on sex, age or family only when its
// condition can be TRUE. A rule set evaluated so must answer exactly as when every rule on
// those facts is evaluated per call (the same rule set with both undone).
std::shared_ptr<const compiler::CompiledRuleSet> Unfolded(const compiler::CompiledRuleSet& rs) {
  auto copy = std::make_shared<compiler::CompiledRuleSet>(rs);
  copy->candidates_on_sex = copy->rules_on_sex;
  copy->candidates_on_age = copy->rules_on_age;
  copy->candidates_on_family = copy->rules_on_family;
  copy->candidates_on_consanguinity = copy->rules_on_consanguinity;
  copy->demographic_sexes.clear();
  copy->demographic_age_bounds.clear();
  copy->demographic_context_of.clear();
  copy->demographic_contexts.clear();
  return copy;
}

constexpr char kDemographicRules[] = R"pb(
  hypotheses {
    id: "male_group" title: "M" pretest_probability: 0.05 pretest_provenance { assumption: true note: "t" }
    evidence { id: "male" when { sex: MALE } likelihood_ratios { positive: 4 negative: 0.2 } provenance { reference_ids: "SRC" } }
    evidence { id: "infant" group: "age" when { age { to { days: 365.25 } } } likelihood_ratios { positive: 3 negative: 0.5 } provenance { reference_ids: "SRC" } }
    evidence { id: "toddler" group: "age" when { age { from { days: 365.25 } to { days: 1095.75 } } } likelihood_ratios { positive: 2 negative: 0.25 } provenance { reference_ids: "SRC" } }
    evidence { id: "d" when { finding { concept: "diarrhoea" } } likelihood_ratios { positive: 5 negative: 0.5 } provenance { reference_ids: "SRC" } }
  }
  hypotheses {
    id: "mixed_group" title: "X" pretest_probability: 0.05 pretest_provenance { assumption: true note: "t" }
    evidence { id: "old" group: "g" when { age { from { days: 365.25 } } } likelihood_ratios { positive: 6 negative: 0.5 } provenance { reference_ids: "SRC" } }
    evidence { id: "e" group: "g" when { finding { concept: "eczema" } } likelihood_ratios { positive: 3 negative: 0.2 } provenance { reference_ids: "SRC" } }
    evidence { id: "female_or_young" when { any { conditions { sex: FEMALE } conditions { age { to { days: 365.25 } } } } } likelihood_ratios { positive: 2 negative: 0.5 } provenance { reference_ids: "SRC" } }
    evidence { id: "not_male" when { not { sex: MALE } } likelihood_ratios { positive: 1.5 negative: 0.8 } provenance { reference_ids: "SRC" } }
  }
  hypotheses {
    id: "capped" title: "C" pretest_probability: 0.05 pretest_provenance { assumption: true note: "t" }
    max_probability: 0.06 max_probability_provenance { assumption: true note: "t" }
    evidence { id: "male" when { sex: MALE } likelihood_ratios { positive: 8 negative: 0.5 } provenance { reference_ids: "SRC" } }
    evidence { id: "both" when { all { conditions { sex: FEMALE } conditions { age { from { days: 365.25 } } } } } likelihood_ratios { positive: 3 negative: 0.9 } provenance { reference_ids: "SRC" } }
  }
  hypotheses {
    id: "tie_b" title: "B" pretest_probability: 0.03 pretest_provenance { assumption: true note: "t" }
    evidence { id: "male" when { sex: MALE } likelihood_ratios { positive: 2 negative: 0.5 } provenance { reference_ids: "SRC" } }
  }
  hypotheses {
    id: "tie_a" title: "A" pretest_probability: 0.03 pretest_provenance { assumption: true note: "t" }
    evidence { id: "male" when { sex: MALE } likelihood_ratios { positive: 2 negative: 0.5 } provenance { reference_ids: "SRC" } }
  }
  hypotheses {
    id: "at_least" title: "N" pretest_probability: 0.02 pretest_provenance { assumption: true note: "t" }
    evidence { id: "both_of" when { at_least { count: 2 conditions { sex: MALE } conditions { age { to { days: 30 } } } } } likelihood_ratios { positive: 3 negative: 0.5 } provenance { reference_ids: "SRC" } }
  }
  hypotheses { id: "other" title: "O" pretest_probability: 0.04 pretest_provenance { assumption: true note: "t" } }
  actions { id: "infant_gut" kind: TREATMENT title: "T" urgency: WARNING priority: 1
            when { all { conditions { age { to { days: 365.25 } } }
                         conditions { any { conditions { finding { concept: "diarrhoea" } }
                                            conditions { not { finding { concept: "eczema" } } } } } } } }
  actions { id: "boy" kind: REFERRAL title: "R" urgency: INFO when { sex: MALE } }
  actions { id: "not_boy_or_skin" kind: REFERRAL title: "R" urgency: INFO
            when { not { all { conditions { sex: MALE } conditions { finding { concept: "eczema" } } } } } }
  actions { id: "likely_toddler" kind: TEST title: "T" urgency: WARNING
            when { all { conditions { probability { hypothesis: "male_group" at_least: 0.05 } }
                         conditions { age { from { days: 30 } } } } } }
)pb";

TEST(DemographicFoldingTest, FoldedAnswersAsUnfoldedInEdgeCases) {
  auto folded = Build(kDemographicRules);
  ASSERT_NE(folded, nullptr);
  ASSERT_FALSE(folded->demographic_contexts.empty());
  auto unfolded = Unfolded(*folded);
  const std::vector<std::string> sexes = {"UNKNOWN_SEX", "MALE", "FEMALE", "OTHER_SEX"};
  // Unknown age; exactly at each band boundary and just below it; inside bands.
  const std::vector<std::string> ages = {"",
                                         "age { days: 0 }",
                                         "age { days: 29.999 }",
                                         "age { days: 30 }",
                                         "age { days: 365.24 }",
                                         "age { days: 365.25 }",
                                         "age { days: 1095.75 }",
                                         "age { days: 4000 }"};
  const std::vector<std::string> findings = {
      "",
      R"pb(findings { term { system: "HPO" code: "HP:0002041" } status: PRESENT })pb",
      R"pb(findings { term { system: "HPO" code: "HP:0000964" } status: PRESENT }
           findings { term { system: "HPO" code: "HP:0002041" } status: EXCLUDED })pb",
      R"pb(findings { term { system: "HPO" code: "HP:0000964" } status: EXCLUDED })pb"};
  int compared = 0;
  for (const auto& sex : sexes) {
    for (const auto& age : ages) {
      for (const auto& finding : findings) {
        const std::string patient = absl::StrCat("sex: ", sex, " ", age, " ", finding);
        for (int level = 0; level < 3; ++level) {
          EvaluateOptions options;
          options.explain = level > 0;
          options.full_trace = level == 2;
          const auto want = EvaluateText(*unfolded, patient, options);
          const auto got = EvaluateText(*folded, patient, options);
          EXPECT_EQ(got.SerializeAsString(), want.SerializeAsString())
              << patient << " level " << level << "\nfolded:\n"
              << got.DebugString() << "\nunfolded:\n"
              << want.DebugString();
          ++compared;
        }
      }
    }
  }
  EXPECT_EQ(compared, 4 * 8 * 4 * 3);
}

TEST(DemographicFoldingTest, FoldsOnlyItemsWhoseGroupIsDemographic) {
  auto rs = Build(kDemographicRules);
  ASSERT_NE(rs, nullptr);
  auto on_age = [&](const std::vector<compiler::RuleRef>& refs, const std::string& id) {
    return std::any_of(refs.begin(), refs.end(), [&](const compiler::RuleRef& r) {
      return r.kind == compiler::RuleRef::Kind::kEvidence && rs->evidence[r.index].id == id;
    });
  };
  // Still indexed (warnings about missing sex/age read these lists)...
  EXPECT_TRUE(on_age(rs->rules_on_age, "male_group/infant"));
  EXPECT_TRUE(on_age(rs->rules_on_age, "mixed_group/old"));
  // ... but evaluated per call only when a non-demographic item shares its group.
  EXPECT_FALSE(on_age(rs->candidates_on_age, "male_group/infant"));
  EXPECT_FALSE(on_age(rs->candidates_on_age, "mixed_group/female_or_young"));
  EXPECT_TRUE(on_age(rs->candidates_on_age, "mixed_group/old"));
  EXPECT_FALSE(on_age(rs->candidates_on_sex, "capped/male"));
  // A male infant's context: within the "age" group the toddler item's LR- (0.25) outweighs
  // the infant item's LR+ (3); weights summed as the engine sums them.
  const compiler::DemographicContext* context = rs->DemographicContextFor(cds::v1::MALE, 100);
  ASSERT_NE(context, nullptr);
  ASSERT_FALSE(context->hypotheses.empty());
  const compiler::DemographicHypothesis& male_group = context->hypotheses[0];
  EXPECT_EQ(rs->hypotheses[male_group.hypothesis].id, "male_group");
  double sum = 0;
  for (uint32_t i = male_group.begin; i < male_group.end; ++i) {
    const auto& item = context->items[i];
    const std::string& id = rs->evidence[item.evidence].id;
    if (id == "male_group/infant") {
      EXPECT_TRUE(item.superseded);
    }
    if (id == "male_group/toddler") {
      EXPECT_FALSE(item.matched);
    }
    if (!item.superseded) sum += item.log_lr;
  }
  EXPECT_EQ(male_group.end - male_group.begin, 3u);
  EXPECT_EQ(sum, std::log(4.0) + std::log(0.25));
  EXPECT_EQ(male_group.weight, 0.05 * std::exp(sum));
  // The same context for every age inside a band; another one across a boundary.
  EXPECT_EQ(context, rs->DemographicContextFor(cds::v1::MALE, 364));
  EXPECT_NE(context, rs->DemographicContextFor(cds::v1::MALE, 365.25));
}

}  // namespace
}  // namespace cds::engine
