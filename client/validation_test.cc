#include "client/validation.h"

#include "gmock/gmock.h"
#include "google/protobuf/text_format.h"
#include "gtest/gtest.h"

namespace cds::cli {
namespace {

using ::testing::HasSubstr;

constexpr char kCorpus[] =
    R"({"id": "a1", "diagnosis": "Alpha", "disease_id": "OMIM:1", "sex": "MALE", "age_at_onset_days": 10, "observed": [{"hpo": "HP:0000001", "label": "x", "onset_days": 10}], "excluded": [{"hpo": "HP:0000002", "label": "y"}], "measurements": [{"name": "IgE", "value": 500, "unit": "kU/L", "age_days": 40}], "family_history": null, "age_last_encounter_days": 100, "extra": [1, 2]})"
    "\n\n"
    R"({"id": "a2", "diagnosis": "Alpha", "disease_id": "OMIM:1", "sex": "UNKNOWN", "observed": [], "excluded": [], "measurements": []})"
    "\n"
    R"({"id": "b1", "diagnosis": "Beta", "disease_id": "OMIM:2", "sex": "FEMALE", "observed": [], "excluded": [], "measurements": []})"
    "\n"
    R"({"id": "c1", "diagnosis": "Gamma", "disease_id": "OMIM:3", "sex": "FEMALE", "observed": [], "excluded": [], "measurements": []})"
    "\n";

TEST(CorpusTest, ParsesLinesIntoPatients) {
  auto corpus = ParseCorpus(kCorpus);
  ASSERT_TRUE(corpus.ok()) << corpus.status();
  ASSERT_EQ(corpus->size(), 4u);
  const auto& p = (*corpus)[0].patient;
  EXPECT_EQ(p.sex(), cds::v1::MALE);
  EXPECT_EQ(p.age().days(), 100);
  ASSERT_EQ(p.findings_size(), 2);
  EXPECT_EQ(p.findings(0).term().code(), "HP:0000001");
  EXPECT_EQ(p.findings(0).onset().days(), 10);
  EXPECT_EQ(p.findings(1).status(), cds::v1::Finding::EXCLUDED);
  ASSERT_EQ(p.measurements_size(), 1);
  EXPECT_EQ(p.measurements(0).assay().code(), "19113-0");
  EXPECT_EQ((*corpus)[1].patient.sex(), cds::v1::UNKNOWN_SEX);
  EXPECT_FALSE((*corpus)[1].patient.has_age());
}

TEST(CorpusTest, BadLineIsNamed) {
  auto corpus = ParseCorpus("{\"id\": \"x\"}\n{not json\n");
  EXPECT_EQ(corpus.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(corpus.status().message()), HasSubstr("line 2"));
}

// A fake evaluator standing in for the engine: a fixed ranking per case id, so the
// arithmetic of the report can be checked by hand.
TEST(ValidateTest, ComputesAccuracyScreeningAndBrier) {
  cds::v1::RuleSet definition;
  ASSERT_TRUE(google::protobuf::TextFormat::ParseFromString(R"pb(
    metadata { screening { hypothesis: "alpha" alert_threshold: 0.5 } }
    hypotheses { id: "alpha" code { system: "OMIM" code: "OMIM:1" } }
    hypotheses { id: "beta" code { system: "LOCAL" code: "B" } other_codes { system: "OMIM" code: "OMIM:2" } }
  )pb", &definition));
  auto corpus = ParseCorpus(kCorpus);
  ASSERT_TRUE(corpus.ok());
  auto evaluate = [](const cds::v1::Patient& patient) -> absl::StatusOr<cds::v1::EvaluateResponse> {
    cds::v1::EvaluateResponse r;
    r.mutable_rule_set()->set_name("t");
    r.mutable_rule_set()->set_version("1.0.0");
    auto add = [&](const char* id, double p) {
      auto* s = r.add_suggestions();
      s->set_kind(cds::v1::DIAGNOSIS);
      s->set_rule_id(id);
      s->set_probability(p);
    };
    if (patient.reference() == "a1") { add("alpha", 0.8); add("beta", 0.1); }
    if (patient.reference() == "a2") { add("beta", 0.6); add("alpha", 0.3); }
    if (patient.reference() == "b1") { add("alpha", 0.6); add("beta", 0.3); }
    if (patient.reference() == "c1") return absl::InvalidArgumentError("patient.sex is required");
    return r;
  };
  const auto report = Validate(*corpus, definition, evaluate);
  EXPECT_EQ(report.rule_set(), "t@1.0.0");
  EXPECT_EQ(report.cases(), 3);
  ASSERT_EQ(report.skipped_size(), 1);
  ASSERT_EQ(report.diagnoses_size(), 2);
  const auto& alpha = report.diagnoses(0);
  EXPECT_EQ(alpha.hypothesis(), "alpha");
  EXPECT_EQ(alpha.cases(), 2);
  EXPECT_EQ(alpha.top1(), 1);
  EXPECT_EQ(alpha.top3(), 2);
  EXPECT_EQ(report.diagnoses(1).hypothesis(), "beta");  // through other_codes
  EXPECT_EQ(report.true_positives(), 1);   // a1 at 0.8
  EXPECT_EQ(report.false_negatives(), 1);  // a2 at 0.3
  EXPECT_EQ(report.false_positives(), 1);  // b1 at 0.6
  EXPECT_EQ(report.true_negatives(), 0);
  EXPECT_DOUBLE_EQ(report.sensitivity(), 0.5);
  EXPECT_EQ(report.ranked_first_when_absent(), 1);
  // Brier of alpha over the three cases: (0.8-1)^2 + (0.3-1)^2 + (0.6-0)^2.
  EXPECT_NEAR(alpha.brier(), (0.04 + 0.49 + 0.36) / 3, 1e-12);
  EXPECT_NEAR(report.brier(), ((0.04 + 0.01) + (0.49 + 0.36) + (0.36 + 0.49)) / 3, 1e-12);
  EXPECT_THAT(FormatReport(report), HasSubstr("sensitivity 50% (1/2)"));
}

}  // namespace
}  // namespace cds::cli
