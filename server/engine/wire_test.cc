// The wire renderer (Evaluation::WireSize / WriteWire) must write exactly the bytes
// protobuf's own serializer writes for the response the protobuf renderer builds, with the
// service's fields (evaluation_id, rule_set.label, evaluated_at) set the same way: checked
// over every bundled rule set's cases, the shared validation corpus, the synthetic large
// rule sets of the benchmark and edge cases, at every explanation level.

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "client/input.h"
#include "client/validation.h"
#include "google/protobuf/io/coded_stream.h"
#include "google/protobuf/io/zero_copy_stream_impl_lite.h"
#include "google/protobuf/text_format.h"
#include "google/protobuf/util/message_differencer.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/compiler/compiler.h"
#include "server/compiler/source_loader.h"
#include "server/engine/engine.h"
#include "server/engine/testing/scaled_rule_set.h"

namespace cds::engine {
namespace {

using ::testing::HasSubstr;

const std::string kSourceDir = CDS_SOURCE_DIR;
const std::string kCorpus = kSourceDir + "/../shared/validation/cases.jsonl";

struct Level {
  const char* name;
  EvaluateOptions options;
};

std::vector<Level> Levels() {
  EvaluateOptions none;
  none.explain = false;
  EvaluateOptions compact;
  compact.full_trace = false;
  return {{"none", none}, {"compact", compact}, {"full", EvaluateOptions{}}};
}

// What the service adds, and none of it.
std::vector<WireExtras> Extras() {
  WireExtras service;
  service.evaluation_id = "1b4e28ba-2fa1-4d3b-a3f5-ef19b5a7633b";
  service.label = "stable";
  service.has_evaluated_at = true;
  service.evaluated_at_seconds = 1795000000;
  service.evaluated_at_nanos = 123456789;
  WireExtras zero_time;
  zero_time.has_evaluated_at = true;  // set, but both fields zero: an empty message
  WireExtras old_time;
  old_time.evaluation_id = "x";
  old_time.has_evaluated_at = true;
  old_time.evaluated_at_seconds = -62135596800;  // 0001-01-01: a negative varint
  return {WireExtras{}, service, zero_time, old_time};
}

std::string Deterministic(const cds::v1::EvaluateResponse& response) {
  std::string out;
  google::protobuf::io::StringOutputStream stream(&out);
  google::protobuf::io::CodedOutputStream coded(&stream);
  coded.SetSerializationDeterministic(true);
  response.SerializeToCodedStream(&coded);
  coded.Trim();
  return out;
}

// Where two byte strings first differ, for a readable failure.
std::string FirstDifference(const std::string& a, const std::string& b) {
  size_t i = 0;
  while (i < a.size() && i < b.size() && a[i] == b[i]) ++i;
  return absl::StrCat("sizes ", a.size(), " and ", b.size(), ", first difference at byte ", i);
}

// Checks one patient at every explanation level and with every set of extras; returns the
// number of responses compared.
int ExpectWireMatchesProto(const compiler::CompiledRuleSet& rs, const cds::v1::Patient& patient,
                           const std::string& what) {
  int compared = 0;
  Evaluation evaluation;  // reused across calls, as the service reuses its own
  for (const Level& level : Levels()) {
    cds::v1::EvaluateResponse response;
    const absl::Status proto_status = Evaluate(rs, patient, level.options, &response);
    const absl::Status wire_status = Evaluate(rs, patient, level.options, &evaluation);
    EXPECT_EQ(proto_status, wire_status) << what;
    if (!proto_status.ok()) continue;
    EXPECT_EQ(evaluation.suggestion_count(), static_cast<size_t>(response.suggestions_size()));
    for (size_t i = 0; i < evaluation.suggestion_count() &&
                       i < static_cast<size_t>(response.suggestions_size());
         ++i) {
      EXPECT_EQ(evaluation.suggestion_rule_id(i), response.suggestions(static_cast<int>(i)).rule_id());
    }
    for (const WireExtras& extras : Extras()) {
      cds::v1::EvaluateResponse expected = response;
      if (!extras.evaluation_id.empty()) {
        expected.set_evaluation_id(std::string(extras.evaluation_id));
      }
      if (!extras.label.empty()) expected.mutable_rule_set()->set_label(std::string(extras.label));
      if (extras.has_evaluated_at) {
        expected.mutable_evaluated_at()->set_seconds(extras.evaluated_at_seconds);
        expected.mutable_evaluated_at()->set_nanos(extras.evaluated_at_nanos);
      }
      const std::string bytes = expected.SerializeAsString();
      EXPECT_EQ(bytes, Deterministic(expected));
      std::string wire = "prefix";  // appended to, not overwritten
      evaluation.AppendWire(extras, &wire);
      EXPECT_EQ(wire.substr(0, 6), "prefix");
      wire.erase(0, 6);
      EXPECT_TRUE(wire == bytes) << what << " " << level.name << ": " << FirstDifference(wire, bytes);
      cds::v1::EvaluateResponse parsed;
      EXPECT_TRUE(parsed.ParseFromString(wire)) << what;
      EXPECT_TRUE(google::protobuf::util::MessageDifferencer::Equals(parsed, expected)) << what;
      ++compared;
    }
  }
  return compared;
}

std::shared_ptr<const compiler::CompiledRuleSet> CompileDir(const std::string& dir) {
  auto source = compiler::LoadRuleSetDir(dir);
  EXPECT_TRUE(source.ok()) << source.status();
  if (!source.ok()) return nullptr;
  compiler::CompileResult result = compiler::Compile(*source);
  EXPECT_TRUE(result.ok()) << result.IssuesToString();
  return result.rule_set;
}

std::vector<std::string> BundledDirs() {
  std::vector<std::string> dirs;
  for (const auto& name : std::filesystem::directory_iterator(kSourceDir + "/rules")) {
    if (!name.is_directory()) continue;
    for (const auto& version : std::filesystem::directory_iterator(name.path())) {
      if (std::filesystem::exists(version.path() / compiler::kRuleSetFile)) {
        dirs.push_back(version.path().string());
      }
    }
  }
  std::sort(dirs.begin(), dirs.end());
  return dirs;
}

cds::v1::Patient TypicalPatient() {
  auto text = cli::ReadFile(kSourceDir + "/bench/typical_patient.textproto");
  EXPECT_TRUE(text.ok());
  cds::v1::Patient patient;
  EXPECT_TRUE(google::protobuf::TextFormat::ParseFromString(*text, &patient));
  return patient;
}

TEST(WireTest, BundledRuleSetCases) {
  const std::vector<std::string> dirs = BundledDirs();
  ASSERT_FALSE(dirs.empty());
  int compared = 0;
  for (const std::string& dir : dirs) {
    const auto rs = CompileDir(dir);
    ASSERT_NE(rs, nullptr);
    ASSERT_GT(rs->tests.cases_size(), 0) << dir;
    for (const auto& c : rs->tests.cases()) {
      compared += ExpectWireMatchesProto(*rs, c.patient(), absl::StrCat(dir, " case ", c.name()));
    }
    compared += ExpectWireMatchesProto(*rs, TypicalPatient(), dir + " typical patient");
  }
  EXPECT_GT(compared, 0);
}

TEST(WireTest, ValidationCorpus) {
  if (!std::filesystem::exists(kCorpus)) {
    // CI always has shared/ beside the checkout: there a missing corpus is a failure.
    if (std::getenv("CI") != nullptr) FAIL() << "no corpus at " << kCorpus;
    GTEST_SKIP() << "no corpus at " << kCorpus;
  }
  auto text = cli::ReadFile(kCorpus);
  ASSERT_TRUE(text.ok());
  auto corpus = cli::ParseCorpus(*text);
  ASSERT_TRUE(corpus.ok()) << corpus.status();
  ASSERT_FALSE(corpus->empty());
  for (const std::string& dir : BundledDirs()) {
    const auto rs = CompileDir(dir);
    ASSERT_NE(rs, nullptr);
    for (const cli::CorpusEntry& entry : *corpus) {
      ExpectWireMatchesProto(*rs, entry.patient, absl::StrCat(dir, " corpus ", entry.source.id()));
    }
  }
}

TEST(WireTest, ScaledRuleSets) {
  const std::string ipex = BundledDirs().back();
  auto base = compiler::LoadRuleSetDir(ipex);
  ASSERT_TRUE(base.ok()) << base.status();
  const auto bundled = CompileDir(ipex);
  ASSERT_NE(bundled, nullptr);
  for (int copies : {1, 10, 100}) {
    compiler::CompileResult result = compiler::Compile(testing::Scaled(*base, copies));
    ASSERT_TRUE(result.ok()) << result.IssuesToString();
    const compiler::CompiledRuleSet& rs = *result.rule_set;
    ExpectWireMatchesProto(rs, TypicalPatient(), absl::StrCat(copies, "x typical patient"));
    for (const auto& c : bundled->tests.cases()) {
      ExpectWireMatchesProto(rs, c.patient(), absl::StrCat(copies, "x case ", c.name()));
    }
  }
}

// A small rule set with an ontology-free code, a lab with limits, a derived lab, an action
// on a finding, an informative test and a family-history rule.
constexpr char kRules[] = R"pb(
  metadata { name: "t" version: "1.0.0" status: ACTIVE title: "T" disclaimer: "Support only." }
  references { id: "SRC" citation: "A source." pmid: "123" }
  concepts { id: "diarrhoea" label: "Chronic diarrhoea" codes { system: "HPO" code: "HP:0002028" display: "Chronic diarrhea" } }
  concepts { id: "eczema" label: "Eczema" codes { system: "HPO" code: "HP:0000964" } }
  labs {
    id: "ige" label: "Total IgE" codes { system: "LOINC" code: "19113-0" } canonical_unit: "[IU]/mL"
    conversions { unit: "kU/L" factor: 1 provenance { reference_ids: "SRC" } }
    limits { age { to { days: 183 } } upper: 13 provenance { reference_ids: "SRC" } }
    limits { age { from { days: 183 } } upper: 100 provenance { reference_ids: "SRC" } }
  }
  labs { id: "eos_pct" label: "Eosinophils %" codes { system: "LOINC" code: "713-8" } canonical_unit: "%" }
  labs { id: "wbc" label: "Leukocytes" codes { system: "LOINC" code: "6690-2" } canonical_unit: "10*9/L"
         conversions { unit: "/uL" factor: 0.001 provenance { reference_ids: "SRC" } } }
  labs { id: "eos" label: "Eosinophils" codes { system: "LOCAL" code: "eos" } canonical_unit: "10*9/L"
         derived_from { percent_lab: "eos_pct" total_lab: "wbc" max_days_apart: 1 } }
  hypotheses {
    id: "h" title: "H" code { system: "OMIM" code: "OMIM:304790" display: "IPEX" } detail: "Detail of h."
    pretest_probability: 0.1 pretest_provenance { assumption: true note: "t" } reference_ids: "SRC"
    evidence { id: "d" when { finding { concept: "diarrhoea" } } likelihood_ratios { positive: 4 negative: 0.5 } provenance { reference_ids: "SRC" } }
    evidence { id: "e1" group: "g" when { finding { concept: "eczema" } } likelihood_ratios { positive: 3 negative: 0.6 } provenance { reference_ids: "SRC" } }
    evidence { id: "ige_high" group: "g" when { lab { lab: "ige" above_upper_limit_times: 5 } } likelihood_ratios { positive: 6 negative: 0.4 } provenance { reference_ids: "SRC" } }
    evidence { id: "eos_high" when { lab { lab: "eos" above: 0.5 } } likelihood_ratios { positive: 2 negative: 0.8 } provenance { reference_ids: "SRC" } }
    evidence { id: "male" when { sex: MALE } likelihood_ratios { positive: 2 negative: 0.1 } provenance { reference_ids: "SRC" } }
    evidence { id: "family" when { family { line: ANY_LINE affected_concept: "diarrhoea" } } likelihood_ratios { positive: 3 negative: 0.9 } provenance { reference_ids: "SRC" } }
  }
  hypotheses { id: "other" title: "O" pretest_probability: 0.2 pretest_provenance { assumption: true note: "t" } }
  actions {
    id: "alert_d" kind: ALERT urgency: CRITICAL title: "Alert" detail: "" reference_ids: "SRC"
    when { all { conditions { finding { concept: "diarrhoea" } } conditions { lab { lab: "ige" above_upper_limit_times: 5 } } } }
  }
  actions {
    id: "test_ige" kind: TEST urgency: WARNING title: "Measure IgE" code { system: "LOINC" code: "19113-0" }
    information { labs: "ige" concepts: "eczema" min_gain_bits: 0.0001 }
  }
)pb";

std::shared_ptr<const compiler::CompiledRuleSet> SmallRuleSet() {
  compiler::RuleSetSource source;
  source.files.push_back({compiler::kRuleSetFile, kRules});
  compiler::CompileResult result = compiler::Compile(source);
  EXPECT_TRUE(result.ok()) << result.IssuesToString();
  return result.rule_set;
}

cds::v1::Patient ParsePatient(const std::string& text) {
  cds::v1::Patient patient;
  EXPECT_TRUE(google::protobuf::TextFormat::ParseFromString(text, &patient)) << text;
  return patient;
}

TEST(WireTest, EdgeCases) {
  const auto rs = SmallRuleSet();
  ASSERT_NE(rs, nullptr);
  const std::vector<std::pair<std::string, std::string>> patients = {
      {"unknown sex and age, nothing recorded", R"pb(sex: UNKNOWN_SEX)pb"},
      {"other sex", R"pb(sex: OTHER_SEX age { days: 20 })pb"},
      {"findings, labs, family",
       R"pb(sex: MALE age { iso8601_duration: "P2M" }
            findings { term { system: "HPO" code: "HP:0002028" display: "as sent" } status: PRESENT }
            findings { term { code: "HP:0000964" } status: EXCLUDED }
            measurements { assay { system: "LOINC" code: "19113-0" } value: 900 unit: "kU/L" }
            family_history { relatives { relationship: MOTHER conditions { system: "HPO" code: "HP:0002028" } } })pb"},
      {"warnings of every kind",
       R"pb(sex: FEMALE age { days: 400 }
            findings { term { system: "HPO" code: "HP:9999999" } status: PRESENT }
            measurements { assay { system: "LOINC" code: "1-1" } value: 1 unit: "g" }
            measurements { assay { system: "LOINC" code: "19113-0" } value: 1 unit: "furlongs" }
            measurements { assay { system: "LOINC" code: "713-8" } value: 8 unit: "%" age { days: 10 } }
            measurements { assay { system: "LOINC" code: "6690-2" } value: 12000 unit: "/uL" age { days: 60 } })pb"},
      {"derived lab and lab details",
       R"pb(sex: MALE age { days: 40 }
            measurements { assay { system: "LOINC" code: "713-8" } value: 8 unit: "%" age { days: 40 } }
            measurements { assay { system: "LOINC" code: "6690-2" } value: 12000 unit: "/uL" age { days: 40 } }
            measurements { assay { system: "LOINC" code: "19113-0" } value: 50 unit: "kU/L" reference_range { high: 20 } })pb"},
      {"a finding twice, unknown status",
       R"pb(sex: MALE
            findings { term { system: "HPO" code: "HP:0002028" } status: PRESENT onset { days: 3 } }
            findings { term { system: "HPO" code: "HP:0002028" } status: PRESENT }
            findings { term { system: "HPO" code: "HP:0000964" } status: UNKNOWN })pb"},
  };
  for (const auto& [name, text] : patients) {
    EXPECT_GT(ExpectWireMatchesProto(*rs, ParsePatient(text), name), 0) << name;
  }
  // The cases above reach what they are named for.
  cds::v1::EvaluateResponse warned;
  ASSERT_TRUE(Evaluate(*rs, ParsePatient(patients[3].second), EvaluateOptions{}, &warned).ok());
  std::set<int> kinds;
  for (const auto& w : warned.warnings()) kinds.insert(w.kind());
  EXPECT_EQ(kinds.size(), 4u) << warned.DebugString();
  cds::v1::EvaluateResponse full;
  ASSERT_TRUE(Evaluate(*rs, ParsePatient(patients[2].second), EvaluateOptions{}, &full).ok());
  EXPECT_EQ(full.suggestions(0).rule_id(), "alert_d");
  EXPECT_EQ(full.suggestions(0).evidence(0).matched_codes_size(), 1);
  EXPECT_THAT(full.DebugString(), HasSubstr("Total IgE 900 [IU]/mL > 65 (upper limit for age 13)"));
  EXPECT_THAT(full.DebugString(), HasSubstr("superseded: true"));

  // A malformed patient: the same error from both, nothing rendered.
  ExpectWireMatchesProto(*rs, ParsePatient("sex: SEX_UNSPECIFIED"), "malformed");
}

TEST(WireTest, TestValuesAndNoSuggestionsBeyondTheDiagnoses) {
  const auto rs = SmallRuleSet();
  ASSERT_NE(rs, nullptr);
  // Nothing known: the test is worth its information, and explained by what it reveals.
  Evaluation evaluation;
  ASSERT_TRUE(Evaluate(*rs, ParsePatient("sex: MALE age { days: 10 }"), EvaluateOptions{},
                       &evaluation)
                  .ok());
  bool has_test = false;
  for (size_t i = 0; i < evaluation.suggestion_count(); ++i) {
    has_test |= evaluation.suggestion_rule_id(i) == "test_ige";
  }
  EXPECT_TRUE(has_test);
  cds::v1::EvaluateResponse response;
  evaluation.ToProto(&response);
  EXPECT_THAT(response.DebugString(), HasSubstr("expected_information_gain"));
  EXPECT_THAT(response.DebugString(), HasSubstr("No result yet: Total IgE"));
  EXPECT_GT(ExpectWireMatchesProto(*rs, ParsePatient("sex: MALE age { days: 10 }"), "test value"), 0);
}

// The patient's codes are copied into matched_codes as sent, unknown fields included.
TEST(WireTest, MatchedCodesKeepWhatTheCallerSent) {
  const auto rs = SmallRuleSet();
  ASSERT_NE(rs, nullptr);
  cds::v1::Patient patient = ParsePatient(R"pb(sex: MALE
      findings { term { system: "HPO" code: "HP:0002028" display: "long display text" } status: PRESENT })pb");
  // Field 15 (varint 7) is unknown to cds.v1.Code.
  std::string term = patient.findings(0).term().SerializeAsString() + std::string("\x78\x07", 2);
  ASSERT_TRUE(patient.mutable_findings(0)->mutable_term()->ParseFromString(term));
  EXPECT_GT(ExpectWireMatchesProto(*rs, patient, "unknown fields in a code"), 0);
}

}  // namespace
}  // namespace cds::engine
