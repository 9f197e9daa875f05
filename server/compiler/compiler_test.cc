#include "server/compiler/compiler.h"

#include <cmath>
#include <set>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "google/protobuf/text_format.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace cds::compiler {
namespace {

using ::testing::AllOf;
using ::testing::Contains;
using ::testing::Field;
using ::testing::HasSubstr;
using ::testing::IsEmpty;
using ::testing::Not;

constexpr char kMetadata[] = R"pb(
  metadata {
    name: "demo"
    version: "1.0.0"
    status: ACTIVE
    title: "Demo"
    disclaimer: "Decision support only."
  }
  references { id: "SRC" citation: "A source." }
)pb";

constexpr char kValidBody[] = R"pb(
  concepts {
    id: "diarrhoea"
    label: "Chronic diarrhoea"
    codes { system: "HPO" code: "HP:0002028" }
  }
  labs {
    id: "ige"
    label: "Total IgE"
    codes { system: "LOINC" code: "19113-0" }
    canonical_unit: "[IU]/mL"
    conversions { unit: "kU/L" factor: 1 provenance { reference_ids: "SRC" } }
    limits { age { to { days: 183 } } upper: 13 provenance { reference_ids: "SRC" } }
  }
  hypotheses {
    id: "ipex"
    title: "IPEX"
    code { system: "OMIM" code: "OMIM:304790" }
    pretest_probability: 0.05
    pretest_provenance { assumption: true note: "demo" }
    evidence {
      id: "diarrhoea"
      when { finding { concept: "diarrhoea" } }
      frequencies { in_hypothesis: 0.9 in_comparison: 0.3 }
      provenance { reference_ids: "SRC" }
    }
    evidence {
      id: "ige"
      when { lab { lab: "ige" above_upper_limit_times: 1 } }
      likelihood_ratios { positive: 3 negative: 0.5 }
      provenance { reference_ids: "SRC" }
    }
  }
  actions {
    id: "refer"
    kind: REFERRAL
    title: "Refer"
    urgency: WARNING
    when { probability { hypothesis: "ipex" at_least: 0.2 } }
    provenance { assumption: true note: "demo threshold" }
  }
)pb";

CompileResult CompileText(const std::string& rules, const std::string& tests = "") {
  RuleSetSource source;
  source.expected_name = "demo";
  source.expected_version = "1.0.0";
  source.files.push_back({kRuleSetFile, rules});
  if (!tests.empty()) source.files.push_back({kTestsFile, tests});
  return Compile(source);
}

// The messages of all error issues.
std::vector<std::string> Errors(const CompileResult& result) {
  std::vector<std::string> out;
  for (const Issue& i : result.issues) {
    if (i.severity == Issue::Severity::kError) out.push_back(i.message);
  }
  return out;
}

TEST(CompilerTest, CompilesValidRuleSet) {
  const CompileResult result = CompileText(std::string(kMetadata) + kValidBody);
  ASSERT_TRUE(result.ok()) << result.IssuesToString();
  const CompiledRuleSet& rs = *result.rule_set;
  EXPECT_EQ(rs.name, "demo");
  EXPECT_EQ(rs.version, "1.0.0");
  EXPECT_THAT(rs.digest, HasSubstr("sha256:"));
  EXPECT_EQ(rs.digest.size(), 7u + 64u);
  ASSERT_EQ(rs.hypotheses.size(), 1u);
  ASSERT_EQ(rs.evidence.size(), 2u);
  EXPECT_DOUBLE_EQ(rs.evidence[0].lr_positive, 3.0);
  EXPECT_DOUBLE_EQ(rs.evidence[0].lr_negative, 0.1 / 0.7);
  EXPECT_DOUBLE_EQ(rs.evidence[1].lr_positive, 3.0);
  EXPECT_DOUBLE_EQ(rs.evidence[1].lr_negative, 0.5);
  EXPECT_EQ(rs.evidence[0].id, "ipex/diarrhoea");
  EXPECT_THAT(rs.evidence[0].source, HasSubstr("ruleset.textproto:"));
  EXPECT_TRUE(rs.concepts_by_code.contains("HPO|HP:0002028"));
  EXPECT_TRUE(rs.labs_by_code.contains("LOINC|19113-0"));
  // Trigger index: the finding rule under its concept, the lab rule under its lab, the
  // action under its hypothesis.
  EXPECT_EQ(rs.rules_by_concept[0].size(), 1u);
  EXPECT_EQ(rs.rules_by_lab[0].size(), 1u);
  EXPECT_EQ(rs.actions_by_hypothesis[0].size(), 1u);
}

// Actions fire only when TRUE, so the index lists them under the facts they cannot be TRUE
// without; the lists on sex, age and family still name every rule that weighs them.
TEST(CompilerTest, ActionsAreCandidatesOnlyUnderWhatTheyNeed) {
  const CompileResult result = CompileText(std::string(kMetadata) + kValidBody + R"pb(
    actions {
      id: "infant_gut" kind: TREATMENT title: "T" urgency: WARNING
      when { all { conditions { age { to { days: 365.25 } } } conditions { finding { concept: "diarrhoea" } } } }
    }
    actions {
      id: "boy_or_gut" kind: REFERRAL title: "R" urgency: INFO
      when { any { conditions { sex: MALE } conditions { finding { concept: "diarrhoea" } } } }
    }
    actions {
      id: "likely_infant" kind: TEST title: "T" urgency: INFO
      when { all { conditions { probability { hypothesis: "ipex" at_least: 0.2 } } conditions { age { to { days: 365.25 } } } } }
    }
  )pb");
  ASSERT_TRUE(result.ok()) << result.IssuesToString();
  const CompiledRuleSet& rs = *result.rule_set;
  auto names = [&](const std::vector<RuleRef>& refs) {
    std::set<std::string> ids;
    for (const RuleRef& r : refs) {
      ids.insert(r.kind == RuleRef::Kind::kAction ? rs.actions[r.index].id : rs.evidence[r.index].id);
    }
    return ids;
  };
  // "infant and diarrhoea" needs diarrhoea; "likely and infant" needs the ranking to reach
  // ipex with P >= 0.2 (rather than the age every patient has).
  EXPECT_EQ(names(rs.rules_on_age), (std::set<std::string>{"infant_gut", "likely_infant"}));
  EXPECT_TRUE(rs.candidates_on_age.empty());
  ASSERT_EQ(rs.actions_by_hypothesis[0].size(), 2u);  // kValidBody's action, and this one
  const ProbabilityTrigger& likely = rs.actions_by_hypothesis[0][1];
  EXPECT_EQ(rs.actions[likely.action].id, "likely_infant");
  EXPECT_DOUBLE_EQ(likely.at_least, 0.2);
  EXPECT_EQ(likely.in_top, 0);
  EXPECT_EQ(names(rs.candidates_on_sex), (std::set<std::string>{"boy_or_gut"}));
  EXPECT_EQ(names(rs.rules_by_concept[0]),
            (std::set<std::string>{"ipex/diarrhoea", "infant_gut", "boy_or_gut"}));
  // Nothing on sex or age alone among the evidence: nothing folded.
  EXPECT_TRUE(rs.demographic_contexts.empty());
  EXPECT_EQ(rs.DemographicContextFor(cds::v1::MALE, 10), nullptr);
}

TEST(CompilerTest, IdenticalConditionsShareOneIdAndIdsHaveRanks) {
  const CompileResult result = CompileText(std::string(kMetadata) + R"pb(
    concepts { id: "c" codes { system: "HPO" code: "HP:0000001" } }
    hypotheses { id: "b" title: "B" pretest_probability: 0.1 pretest_provenance { assumption: true note: "x" }
      evidence { id: "male" when { sex: MALE } likelihood_ratios { positive: 2 } provenance { reference_ids: "SRC" } }
      evidence { id: "c" when { all { conditions { sex: MALE } conditions { finding { concept: "c" } } } } likelihood_ratios { positive: 3 } provenance { reference_ids: "SRC" } } }
    hypotheses { id: "a" title: "A" pretest_probability: 0.1 pretest_provenance { assumption: true note: "x" }
      evidence { id: "male" when { sex: MALE } likelihood_ratios { positive: 4 } provenance { reference_ids: "SRC" } }
      evidence { id: "female" when { sex: FEMALE } likelihood_ratios { positive: 4 } provenance { reference_ids: "SRC" } } }
  )pb");
  ASSERT_TRUE(result.ok()) << result.IssuesToString();
  const CompiledRuleSet& rs = *result.rule_set;
  ASSERT_EQ(rs.evidence.size(), 4u);
  // "sex: MALE" is compiled once, for both hypotheses and inside the `all`.
  EXPECT_EQ(rs.evidence[0].condition, rs.evidence[2].condition);
  EXPECT_NE(rs.evidence[2].condition, rs.evidence[3].condition);
  const auto& all = rs.conditions[rs.evidence[1].condition];
  ASSERT_EQ(all.children.size(), 2u);
  EXPECT_EQ(all.children[0], rs.evidence[0].condition);
  // Sex MALE, sex FEMALE, the finding and the `all`.
  EXPECT_EQ(rs.conditions.size(), 4u);
  // Ranks follow the ids: "a" before "b".
  EXPECT_EQ(rs.hypotheses[0].id, "b");
  EXPECT_EQ(rs.hypotheses[0].id_rank, 1);
  EXPECT_EQ(rs.hypotheses[1].id_rank, 0);
  // Evidence ids too: a/female, a/male, b/c, b/male.
  EXPECT_EQ(rs.evidence[0].id_rank, 3);
  EXPECT_EQ(rs.evidence[1].id_rank, 2);
  EXPECT_EQ(rs.evidence[2].id_rank, 1);
  EXPECT_EQ(rs.evidence[3].id_rank, 0);
  // The evidence on sex alone is folded: one context per sex slot and (no age leaf) the
  // two age slots; the all{male, finding} item stays a candidate.
  EXPECT_EQ(rs.demographic_sexes, (std::vector<int32_t>{cds::v1::FEMALE, cds::v1::MALE}));
  EXPECT_TRUE(rs.demographic_age_bounds.empty());
  EXPECT_EQ(rs.demographic_context_of.size(), 4u * 2u);
  ASSERT_EQ(rs.candidates_on_sex.size(), 1u);
  EXPECT_EQ(rs.candidates_on_sex[0].index, 1);
  const DemographicContext* male = rs.DemographicContextFor(cds::v1::MALE, std::nan(""));
  ASSERT_NE(male, nullptr);
  ASSERT_EQ(male->hypotheses.size(), 2u);  // b (male), a (male; female is FALSE, LR- 1)
  EXPECT_EQ(male->items.size(), 2u);
  // Higher weight first: a (0.1 x 4) before b (0.1 x 2).
  ASSERT_EQ(male->order.size(), 2u);
  EXPECT_EQ(male->hypotheses[male->order[0]].hypothesis, 1);
  EXPECT_EQ(rs.DemographicContextFor(cds::v1::UNKNOWN_SEX, 30)->items.size(), 0u);
}

TEST(CompilerTest, EvidenceIsNumberedHypothesisByHypothesis) {
  const CompileResult result = CompileText(std::string(kMetadata) + R"pb(
    concepts { id: "c" codes { system: "HPO" code: "HP:0000001" } }
    hypotheses { id: "b" title: "B" pretest_probability: 0.1 pretest_provenance { assumption: true note: "x" }
      evidence { id: "e1" when { finding { concept: "c" } } likelihood_ratios { positive: 2 } provenance { reference_ids: "SRC" } }
      evidence { id: "e2" when { sex: MALE } likelihood_ratios { positive: 2 } provenance { reference_ids: "SRC" } } }
    hypotheses { id: "a" title: "A" pretest_probability: 0.1 pretest_provenance { assumption: true note: "x" }
      evidence { id: "e1" when { finding { concept: "c" } } likelihood_ratios { positive: 2 } provenance { reference_ids: "SRC" } } }
  )pb");
  ASSERT_TRUE(result.ok()) << result.IssuesToString();
  int32_t last = -1;
  for (const auto& ev : result.rule_set->evidence) {
    EXPECT_GE(ev.hypothesis, last);
    last = ev.hypothesis;
  }
}

// The scoring loop's packed copy (evidence_scores) says what the evidence says.
TEST(CompilerTest, EvidenceScoresMirrorTheEvidence) {
  const CompileResult result = CompileText(std::string(kMetadata) + R"pb(
    concepts { id: "c" codes { system: "HPO" code: "HP:0000001" } }
    concepts { id: "d" codes { system: "HPO" code: "HP:0000002" } }
    hypotheses { id: "a" title: "A" pretest_probability: 0.1 pretest_provenance { assumption: true note: "x" }
      evidence { id: "e1" when { finding { concept: "c" } } likelihood_ratios { positive: 4 negative: 0.5 } provenance { reference_ids: "SRC" } group: "g" }
      evidence { id: "e2" when { finding { concept: "d" } } likelihood_ratios { positive: 2 } provenance { reference_ids: "SRC" } group: "g" }
      evidence { id: "e3" when { sex: MALE } likelihood_ratios { positive: 3 } provenance { reference_ids: "SRC" } }
      evidence { id: "e4" when { finding { concept: "d" onset { to { days: 183 } } } } likelihood_ratios { positive: 5 } provenance { reference_ids: "SRC" } } }
  )pb");
  ASSERT_TRUE(result.ok()) << result.IssuesToString();
  const CompiledRuleSet& rs = *result.rule_set;
  ASSERT_EQ(rs.evidence_scores.size(), rs.evidence.size());
  // finding_concept: the concept of a finding leaf with any onset; -1 with an onset range or
  // another kind of condition.
  auto score_of = [&](const std::string& id) -> const EvidenceScore& {
    for (size_t i = 0; i < rs.evidence.size(); ++i) {
      if (rs.evidence[i].id == id) return rs.evidence_scores[i];
    }
    ADD_FAILURE() << "no evidence " << id;
    return rs.evidence_scores[0];
  };
  auto concept_index = [&](const std::string& id) {
    for (size_t c = 0; c < rs.concepts.size(); ++c) {
      if (rs.concepts[c].id == id) return static_cast<int32_t>(c);
    }
    return int32_t{-2};
  };
  EXPECT_EQ(score_of("a/e1").finding_concept, concept_index("c"));
  EXPECT_EQ(score_of("a/e2").finding_concept, concept_index("d"));
  EXPECT_EQ(score_of("a/e3").finding_concept, -1);
  EXPECT_EQ(score_of("a/e4").finding_concept, -1);
  for (size_t i = 0; i < rs.evidence.size(); ++i) {
    const CompiledEvidence& ev = rs.evidence[i];
    const EvidenceScore& score = rs.evidence_scores[i];
    EXPECT_EQ(score.condition, ev.condition) << ev.id;
    EXPECT_EQ(score.hypothesis, ev.hypothesis) << ev.id;
    EXPECT_EQ(score.group, ev.group) << ev.id;
    const CompiledCondition& c = rs.conditions[ev.condition];
    EXPECT_EQ(score.finding_concept,
              c.kind == CompiledCondition::Kind::kFinding && c.ages.unbounded() ? c.ref : -1)
        << ev.id;
    EXPECT_EQ(score.log_lr_positive, std::log(ev.lr_positive)) << ev.id;
    EXPECT_EQ(score.log_lr_negative, std::log(ev.lr_negative)) << ev.id;
  }
  EXPECT_EQ(rs.evidence_scores[0].log_lr_negative, std::log(0.5));
  EXPECT_GE(rs.evidence_scores[0].group, 0);
}

TEST(CompilerTest, DigestDependsOnContentNotOrder) {
  std::vector<SourceFile> a = {{"a", "1"}, {"b", "2"}};
  std::vector<SourceFile> b = {{"b", "2"}, {"a", "1"}};
  std::vector<SourceFile> c = {{"a", "1"}, {"b", "3"}};
  std::vector<SourceFile> d = {{"a", "12"}, {"b", ""}};
  EXPECT_EQ(DigestFiles(a), DigestFiles(b));
  EXPECT_NE(DigestFiles(a), DigestFiles(c));
  EXPECT_NE(DigestFiles(a), DigestFiles(d));  // lengths are framed
}

TEST(CompilerTest, MissingRuleSetFile) {
  RuleSetSource source;
  source.files.push_back({"notes.txt", "x"});
  const CompileResult result = Compile(source);
  EXPECT_FALSE(result.ok());
  EXPECT_THAT(Errors(result), Contains(HasSubstr("needs a ruleset.textproto")));
}

TEST(CompilerTest, SyntaxErrorHasLineAndColumn) {
  const CompileResult result = CompileText("metadata {\n  name: \"demo\"\n  version 1.0.0\n}\n");
  ASSERT_FALSE(result.ok());
  ASSERT_FALSE(result.issues.empty());
  EXPECT_EQ(result.issues[0].file, "ruleset.textproto");
  EXPECT_EQ(result.issues[0].line, 3);
  EXPECT_GT(result.issues[0].column, 0);
  EXPECT_THAT(result.issues[0].message, HasSubstr("syntax"));
}

TEST(CompilerTest, UnknownFieldIsRejected) {
  const CompileResult result = CompileText(std::string(kMetadata) + "concepts { idd: \"x\" }");
  EXPECT_FALSE(result.ok());
  EXPECT_THAT(result.IssuesToString(), HasSubstr("idd"));
}

TEST(CompilerTest, MetadataErrorsAreAllReported) {
  const CompileResult result = CompileText(R"pb(
    metadata { name: "Other" version: "1.0" }
  )pb");
  ASSERT_FALSE(result.ok());
  const auto errors = Errors(result);
  EXPECT_THAT(errors, Contains(HasSubstr("lower-case identifier")));
  EXPECT_THAT(errors, Contains(HasSubstr("semantic version")));
  EXPECT_THAT(errors, Contains(HasSubstr("status is required")));
  EXPECT_THAT(errors, Contains(HasSubstr("title is required")));
  EXPECT_THAT(errors, Contains(HasSubstr("disclaimer is required")));
}

TEST(CompilerTest, MissingMetadata) {
  EXPECT_THAT(Errors(CompileText("")), Contains(HasSubstr("metadata is missing")));
}

TEST(CompilerTest, NameAndVersionMustMatchDirectory) {
  std::string text = std::string(kMetadata) + kValidBody;
  RuleSetSource source;
  source.expected_name = "ipex";
  source.expected_version = "2.0.0";
  source.files.push_back({kRuleSetFile, text});
  const auto errors = Errors(Compile(source));
  EXPECT_THAT(errors, Contains(HasSubstr("does not match its directory 'ipex'")));
  EXPECT_THAT(errors, Contains(HasSubstr("does not match its directory '2.0.0'")));
}

TEST(CompilerTest, DuplicateIdsAndUnknownReferences) {
  const CompileResult result = CompileText(std::string(kMetadata) + R"pb(
    references { id: "SRC" citation: "again" }
    references { id: "NOCITE" }
    concepts { id: "c" codes { system: "HPO" code: "HP:0000001" } }
    concepts { id: "c" codes { system: "HPO" code: "HP:0000002" } }
    hypotheses {
      id: "h" title: "H" pretest_probability: 0.1
      pretest_provenance { reference_ids: "MISSING" }
      reference_ids: "ALSO_MISSING"
    }
    actions { id: "h" kind: TEST title: "T" urgency: INFO when { finding { concept: "c" } } }
  )pb");
  const auto errors = Errors(result);
  EXPECT_THAT(errors, Contains(HasSubstr("duplicate reference id 'SRC'")));
  EXPECT_THAT(errors, Contains(HasSubstr("no citation")));
  EXPECT_THAT(errors, Contains(HasSubstr("duplicate concept id 'c'")));
  EXPECT_THAT(errors, Contains(HasSubstr("unknown reference id 'MISSING'")));
  EXPECT_THAT(errors, Contains(HasSubstr("unknown reference id 'ALSO_MISSING'")));
  EXPECT_THAT(errors, Contains(HasSubstr("duplicate rule id 'h'")));
}

TEST(CompilerTest, ErrorsCarryLineAndRuleId) {
  const CompileResult result = CompileText(std::string(kMetadata) + R"pb(
    concepts { id: "c" codes { system: "HPO" code: "HP:0000001" } }
    hypotheses {
      id: "h"
      title: "H"
      pretest_probability: 0.1
      pretest_provenance { assumption: true note: "x" }
      evidence {
        id: "e"
        when { finding { concept: "nope" } }
        likelihood_ratios { positive: 2 }
        provenance { assumption: true note: "x" }
      }
    }
  )pb");
  ASSERT_FALSE(result.ok());
  bool found = false;
  for (const Issue& issue : result.issues) {
    if (issue.message == "unknown concept 'nope'") {
      found = true;
      EXPECT_EQ(issue.rule_id, "h/e");
      EXPECT_EQ(issue.line, 19);  // the `finding` line within the file
    }
  }
  EXPECT_TRUE(found) << result.IssuesToString();
}

// The `source` lines of evidence and actions as the parser's location tree gives them (a
// field's own location, else its parent's, as the compiler's Child does).
void SourcesFromTree(const std::string& text, std::vector<std::string>* evidence,
                     std::vector<std::string>* actions) {
  cds::v1::RuleSet rs;
  google::protobuf::TextFormat::ParseInfoTree tree;
  google::protobuf::TextFormat::Parser parser;
  parser.WriteLocationsTo(&tree);
  ASSERT_TRUE(parser.ParseFromString(text, &rs));
  const auto* hypotheses = cds::v1::RuleSet::descriptor()->FindFieldByName("hypotheses");
  const auto* evidence_field = cds::v1::Hypothesis::descriptor()->FindFieldByName("evidence");
  const auto* actions_field = cds::v1::RuleSet::descriptor()->FindFieldByName("actions");
  auto line = [](int location, int parent) { return location >= 0 ? location + 1 : parent; };
  for (int h = 0; h < rs.hypotheses_size(); ++h) {
    const int h_line = line(tree.GetLocation(hypotheses, h).line, 1);
    const auto* nested = tree.GetTreeForNested(hypotheses, h);
    for (int e = 0; e < rs.hypotheses(h).evidence_size(); ++e) {
      evidence->push_back(absl::StrCat(
          kRuleSetFile, ":", line(nested->GetLocation(evidence_field, e).line, h_line)));
    }
  }
  for (int a = 0; a < rs.actions_size(); ++a) {
    actions->push_back(
        absl::StrCat(kRuleSetFile, ":", line(tree.GetLocation(actions_field, a).line, 1)));
  }
}

// A rule set with nothing to report compiles without the parser's location tree and scans
// the file for the lines it keeps: they must be the tree's, whatever the layout. Syntax the
// scan does not follow (list syntax here) falls back to the tree.
TEST(CompilerTest, SourceLinesMatchTheParserWhateverTheLayout) {
  const std::string plain = std::string(kMetadata) + kValidBody;
  const std::string odd = absl::StrReplaceAll(
      plain,
      {{"metadata {", "# a comment with { braces }, \"quotes' and evidence {\nmetadata: {"},
       {"title: \"Demo\"", "title: \"Demo # not a comment }\""},
       {"citation: \"A source.\"", "citation: 'A \\'source\\' {'\n \" and more\";"},
       {"hypotheses {", "hypotheses\n\n{"},
       {"    evidence {\n      id: \"ige\"", "    evidence # here\n    {  id: \"ige\","},
       {"in_comparison: 0.3", "in_comparison: 3e-1"},
       {"  actions {", "  actions: {"}});
  const std::string list = absl::StrReplaceAll(
      plain, {{"    evidence {\n      id: \"diarrhoea\"",
               "    evidence: [{\n      id: \"diarrhoea\""},
              {"      provenance { reference_ids: \"SRC\" }\n    }\n    evidence {",
               "      provenance { reference_ids: \"SRC\" }\n    },\n    {"},
              {"likelihood_ratios { positive: 3 negative: 0.5 }\n      provenance { reference_ids: "
               "\"SRC\" }\n    }",
               "likelihood_ratios { positive: 3 negative: 0.5 }\n      provenance { reference_ids: "
               "\"SRC\" }\n    }]"}});
  ASSERT_NE(odd, plain);
  ASSERT_NE(list, plain);
  for (const std::string& text : {plain, odd, list}) {
    SCOPED_TRACE(text);
    const CompileResult result = CompileText(text);
    ASSERT_TRUE(result.ok()) << result.IssuesToString();
    EXPECT_THAT(result.issues, IsEmpty()) << result.IssuesToString();
    std::vector<std::string> want_evidence, want_actions, got_evidence, got_actions;
    SourcesFromTree(text, &want_evidence, &want_actions);
    for (const auto& ev : result.rule_set->evidence) got_evidence.push_back(ev.source);
    for (const auto& action : result.rule_set->actions) got_actions.push_back(action.source);
    EXPECT_EQ(got_evidence, want_evidence);
    EXPECT_EQ(got_actions, want_actions);
    EXPECT_EQ(got_evidence.size(), 2u);
  }
}

// The exact forms of names, versions and HPO codes, at their edges.
TEST(CompilerTest, NameVersionAndHpoCodeForms) {
  auto errors_for = [](const std::string& name, const std::string& version,
                       const std::string& hpo) {
    RuleSetSource source;  // no expected name or version: only the forms are checked
    source.files.push_back(
        {kRuleSetFile,
         absl::StrCat("metadata { name: \"", name, "\" version: \"", version,
                      "\" status: ACTIVE title: \"T\" disclaimer: \"D\" }\n",
                      "concepts { id: \"c\" codes { system: \"HPO\" code: \"", hpo, "\" } }\n")});
    return absl::StrJoin(Errors(Compile(source)), "\n");
  };
  for (const char* name : {"a", "a_1", "abc_def9", "z"}) {
    EXPECT_THAT(errors_for(name, "1.0.0", "HP:0000001"), Not(HasSubstr("identifier"))) << name;
  }
  for (const char* name : {"", "A", "1a", "_a", "a-b", "aB", "a b", "a.b", "\xc3\xa9"}) {
    EXPECT_THAT(errors_for(name, "1.0.0", "HP:0000001"), HasSubstr("identifier")) << name;
  }
  for (const char* version : {"0.0.0", "1.2.3", "10.20.30", "0.10.0"}) {
    EXPECT_THAT(errors_for("a", version, "HP:0000001"), Not(HasSubstr("semantic version")))
        << version;
  }
  for (const char* version : {"", "1", "1.0", "1.0.0.0", "01.0.0", "1.00.0", "1.0.01", "1..0",
                              "1.0.0-rc1", "1.0.x", "v1.0.0", " 1.0.0", "1.0.0 ", ".1.0"}) {
    EXPECT_THAT(errors_for("a", version, "HP:0000001"), HasSubstr("semantic version"))
        << version;
  }
  EXPECT_THAT(errors_for("a", "1.0.0", "HP:1234567"), Not(HasSubstr("not of the form")));
  for (const char* code : {"HP:123456", "HP:12345678", "hp:1234567", "HP:123456a", "HP1234567",
                           "HP:\xd9\xa1" "23456"}) {
    EXPECT_THAT(errors_for("a", "1.0.0", code), HasSubstr("not of the form")) << code;
  }
}

TEST(CompilerTest, CodeErrors) {
  const auto errors = Errors(CompileText(std::string(kMetadata) + R"pb(
    concepts { id: "empty" }
    concepts { id: "bad_hpo" codes { system: "HPO" code: "HP:12" } }
    concepts { id: "no_system" codes { code: "12345" } }
    concepts { id: "no_code" codes { system: "HPO" } }
    concepts { id: "Bad-Id" codes { system: "HPO" code: "HP:0000001" } }
  )pb"));
  EXPECT_THAT(errors, Contains(HasSubstr("concept has no codes")));
  EXPECT_THAT(errors, Contains(HasSubstr("not of the form HP:0000000")));
  EXPECT_THAT(errors, Contains(HasSubstr("has no system")));
  EXPECT_THAT(errors, Contains(HasSubstr("code without a code value")));
  EXPECT_THAT(errors, Contains(HasSubstr("concept id must be a lower-case identifier")));
}

TEST(CompilerTest, LabErrors) {
  const auto errors = Errors(CompileText(std::string(kMetadata) + R"pb(
    labs { id: "a" }
    labs {
      id: "b"
      canonical_unit: "g/L"
      codes { system: "LOINC" code: "1" }
      conversions { unit: "g/dL" factor: -10 }
      conversions { unit: "" factor: 1 }
      conversions { unit: "mg/L" factor: 0.001 }
      limits { upper: 5 }
      limits { age { from { days: 10 } to { days: 5 } } upper: 5 provenance { reference_ids: "SRC" } }
      limits { lower: 9 upper: 5 provenance { reference_ids: "SRC" } }
      limits { provenance { reference_ids: "SRC" } }
      limits { age { to { days: 100 } } upper: 1 provenance { reference_ids: "SRC" } }
      limits { age { to { days: 50 } } upper: 1 provenance { reference_ids: "SRC" } }
    }
    labs { id: "c" canonical_unit: "x" codes { system: "LOINC" code: "1" } }
    labs { id: "b" canonical_unit: "x" codes { system: "LOINC" code: "2" } }
  )pb"));
  EXPECT_THAT(errors, Contains(HasSubstr("lab has no canonical_unit")));
  EXPECT_THAT(errors, Contains(HasSubstr("lab has no codes")));
  EXPECT_THAT(errors, Contains(HasSubstr("must be positive")));
  EXPECT_THAT(errors, Contains(HasSubstr("conversion without a unit")));
  EXPECT_THAT(errors, Contains(HasSubstr("conversion from 'mg/L' needs a provenance")));
  EXPECT_THAT(errors, Contains(HasSubstr("reference limit needs a provenance")));
  EXPECT_THAT(errors, Contains(HasSubstr("limit age is empty")));
  EXPECT_THAT(errors, Contains(HasSubstr("lower must not exceed upper")));
  EXPECT_THAT(errors, Contains(HasSubstr("neither lower nor upper")));
  EXPECT_THAT(errors, Contains(HasSubstr("overlap in age")));
  EXPECT_THAT(errors, Contains(HasSubstr("already belongs to another lab")));
  EXPECT_THAT(errors, Contains(HasSubstr("duplicate lab id 'b'")));
}

TEST(CompilerTest, HypothesisAndEvidenceErrors) {
  const auto errors = Errors(CompileText(std::string(kMetadata) + R"pb(
    concepts { id: "c" codes { system: "HPO" code: "HP:0000001" } }
    hypotheses {
      id: "h1"
      pretest_probability: 1.5
      max_probability: 2
      evidence { id: "no_when" likelihood_ratios { positive: 2 } provenance { reference_ids: "SRC" } }
      evidence { id: "no_weight" when { finding { concept: "c" } } provenance { reference_ids: "SRC" } }
      evidence {
        id: "bad_freq"
        when { finding { concept: "c" } }
        frequencies { in_hypothesis: 1 in_comparison: 0.2 }
        provenance { reference_ids: "SRC" }
      }
      evidence { id: "bad_lr" when { finding { concept: "c" } } likelihood_ratios { positive: -1 } provenance { reference_ids: "SRC" } }
      evidence { id: "empty_lr" when { finding { concept: "c" } } likelihood_ratios { } provenance { reference_ids: "SRC" } }
      evidence { id: "no_source" when { finding { concept: "c" } } likelihood_ratios { positive: 2 } }
      evidence { id: "no_source" when { finding { concept: "c" } } likelihood_ratios { positive: 2 } provenance { reference_ids: "SRC" } }
      evidence { id: "Bad" when { finding { concept: "c" } } likelihood_ratios { positive: 2 } provenance { reference_ids: "SRC" } }
    }
    hypotheses { id: "h2" title: "H2" pretest_probability: 0.6 pretest_provenance { assumption: true note: "x" } }
    hypotheses { id: "h3" title: "H3" pretest_probability: 0.5 pretest_provenance { assumption: true note: "x" } }
  )pb"));
  EXPECT_THAT(errors, Contains(HasSubstr("hypothesis has no title")));
  EXPECT_THAT(errors, Contains(HasSubstr("pretest_probability must be in (0, 1)")));
  EXPECT_THAT(errors, Contains(HasSubstr("pretest_probability needs a provenance")));
  EXPECT_THAT(errors, Contains(HasSubstr("max_probability must be in (0, 1]")));
  EXPECT_THAT(errors, Contains(HasSubstr("max_probability needs a provenance")));
  EXPECT_THAT(errors, Contains(HasSubstr("evidence has no 'when' condition")));
  EXPECT_THAT(errors, Contains(HasSubstr("needs frequencies or likelihood_ratios")));
  EXPECT_THAT(errors, Contains(HasSubstr("frequencies must be in (0, 1)")));
  EXPECT_THAT(errors, Contains(HasSubstr("must be positive and finite")));
  EXPECT_THAT(errors, Contains(HasSubstr("needs positive or negative")));
  EXPECT_THAT(errors, Contains(HasSubstr("evidence weight needs a provenance")));
  EXPECT_THAT(errors, Contains(HasSubstr("duplicate evidence id 'no_source'")));
  EXPECT_THAT(errors, Contains(HasSubstr("evidence id must be a lower-case identifier")));
  EXPECT_THAT(errors, Contains(HasSubstr("pretest probabilities sum to 1.1")));
}

TEST(CompilerTest, ConditionErrors) {
  const auto errors = Errors(CompileText(std::string(kMetadata) + R"pb(
    concepts { id: "c" codes { system: "HPO" code: "HP:0000001" } }
    labs { id: "l" canonical_unit: "u" codes { system: "LOINC" code: "1" } }
    hypotheses {
      id: "h" title: "H" pretest_probability: 0.1 pretest_provenance { assumption: true note: "x" }
      evidence { id: "e1" when { } likelihood_ratios { positive: 2 } provenance { reference_ids: "SRC" } }
      evidence { id: "e2" when { lab { lab: "nope" above: 1 } } likelihood_ratios { positive: 2 } provenance { reference_ids: "SRC" } }
      evidence { id: "e3" when { lab { lab: "l" } } likelihood_ratios { positive: 2 } provenance { reference_ids: "SRC" } }
      evidence { id: "e4" when { lab { lab: "l" above_upper_limit_times: -1 } } likelihood_ratios { positive: 2 } provenance { reference_ids: "SRC" } }
      evidence { id: "e5" when { sex: UNKNOWN_SEX } likelihood_ratios { positive: 2 } provenance { reference_ids: "SRC" } }
      evidence { id: "e6" when { age { } } likelihood_ratios { positive: 2 } provenance { reference_ids: "SRC" } }
      evidence { id: "e7" when { family { sex: MALE affected_concept: "c" } } likelihood_ratios { positive: 2 } provenance { reference_ids: "SRC" } }
      evidence { id: "e8" when { family { line: ANY_LINE } } likelihood_ratios { positive: 2 } provenance { reference_ids: "SRC" } }
      evidence { id: "e9" when { family { line: ANY_LINE affected_concept: "zz" } } likelihood_ratios { positive: 2 } provenance { reference_ids: "SRC" } }
      evidence { id: "e10" when { all { } } likelihood_ratios { positive: 2 } provenance { reference_ids: "SRC" } }
      evidence { id: "e11" when { any { } } likelihood_ratios { positive: 2 } provenance { reference_ids: "SRC" } }
      evidence { id: "e12" when { at_least { count: 3 conditions { sex: MALE } } } likelihood_ratios { positive: 2 } provenance { reference_ids: "SRC" } }
      evidence { id: "e13" when { probability { hypothesis: "h" at_least: 0.5 } } likelihood_ratios { positive: 2 } provenance { reference_ids: "SRC" } }
      evidence { id: "e14" when { finding { concept: "c" onset { from { days: -3 } } } } likelihood_ratios { positive: 2 } provenance { reference_ids: "SRC" } }
      evidence { id: "e15" when { finding { concept: "c" onset { to { iso8601_duration: "3 months" } } } } likelihood_ratios { positive: 2 } provenance { reference_ids: "SRC" } }
      evidence { id: "e16" when { not { } } likelihood_ratios { positive: 2 } provenance { reference_ids: "SRC" } }
    }
    actions { id: "a1" kind: TEST title: "A" urgency: INFO when { probability { hypothesis: "zz" at_least: 0.5 } } }
    actions { id: "a2" kind: TEST title: "A" urgency: INFO when { probability { hypothesis: "h" at_least: 1.5 } } }
    actions { id: "a3" kind: TEST title: "A" urgency: INFO when { probability { hypothesis: "h" in_top: -1 } } }
  )pb"));
  EXPECT_THAT(errors, Contains(HasSubstr("condition is empty")));
  EXPECT_THAT(errors, Contains(HasSubstr("unknown lab 'nope'")));
  EXPECT_THAT(errors, Contains(HasSubstr("lab condition has no threshold")));
  EXPECT_THAT(errors, Contains(HasSubstr("positive finite number")));
  EXPECT_THAT(errors, Contains(HasSubstr("sex condition must be MALE, FEMALE or OTHER_SEX")));
  EXPECT_THAT(errors, Contains(HasSubstr("age condition needs 'from' or 'to'")));
  EXPECT_THAT(errors, Contains(HasSubstr("family condition needs line")));
  EXPECT_THAT(errors, Contains(HasSubstr("needs affected_concept or or_died_in_infancy")));
  EXPECT_THAT(errors, Contains(HasSubstr("unknown concept 'zz'")));
  EXPECT_THAT(errors, Contains(HasSubstr("all has no conditions")));
  EXPECT_THAT(errors, Contains(HasSubstr("any has no conditions")));
  EXPECT_THAT(errors, Contains(HasSubstr("at_least count must be between 1 and the number")));
  EXPECT_THAT(errors, Contains(HasSubstr("allowed only in action rules")));
  EXPECT_THAT(errors, Contains(HasSubstr("onset 'from' must not be negative")));
  EXPECT_THAT(errors, Contains(HasSubstr("is not an ISO 8601 duration")));
  EXPECT_THAT(errors, Contains(HasSubstr("unknown hypothesis 'zz'")));
  EXPECT_THAT(errors, Contains(HasSubstr("probability at_least must be in [0, 1]")));
  EXPECT_THAT(errors, Contains(HasSubstr("in_top must not be negative")));
}

TEST(CompilerTest, DerivedLabErrors) {
  const auto errors = Errors(CompileText(std::string(kMetadata) + R"pb(
    labs { id: "pct" canonical_unit: "%" codes { system: "LOINC" code: "1" } }
    labs { id: "notpct" canonical_unit: "x" codes { system: "LOINC" code: "2" } }
    labs { id: "total" canonical_unit: "10*9/L" codes { system: "LOINC" code: "3" } }
    labs { id: "a" canonical_unit: "10*9/L" codes { system: "LOINC" code: "4" } derived_from { percent_lab: "nope" total_lab: "total" } }
    labs { id: "b" canonical_unit: "10*9/L" codes { system: "LOINC" code: "5" } derived_from { percent_lab: "notpct" total_lab: "total" } }
    labs { id: "c" canonical_unit: "g/L" codes { system: "LOINC" code: "6" } derived_from { percent_lab: "pct" total_lab: "total" } }
    labs { id: "d" canonical_unit: "10*9/L" codes { system: "LOINC" code: "7" } derived_from { percent_lab: "pct" total_lab: "total" max_days_apart: -2 } }
  )pb"));
  EXPECT_THAT(errors, Contains(HasSubstr("derived_from names unknown lab 'nope'")));
  EXPECT_THAT(errors, Contains(HasSubstr("must have canonical_unit \"%\"")));
  EXPECT_THAT(errors, Contains(HasSubstr("must have the canonical unit of 'c'")));
  EXPECT_THAT(errors, Contains(HasSubstr("max_days_apart must not be negative")));
}

TEST(CompilerTest, InformationValueErrors) {
  const auto errors = Errors(CompileText(std::string(kMetadata) + R"pb(
    concepts { id: "c" codes { system: "HPO" code: "HP:0000001" } }
    actions { id: "a1" kind: REFERRAL title: "A" urgency: INFO information { concepts: "c" } }
    actions { id: "a2" kind: TEST title: "A" urgency: INFO information { labs: "nope" } }
    actions { id: "a3" kind: TEST title: "A" urgency: INFO information { concepts: "nada" } }
    actions { id: "a4" kind: TEST title: "A" urgency: INFO information { } }
    actions { id: "a5" kind: TEST title: "A" urgency: INFO information { concepts: "c" min_gain_bits: -1 } }
  )pb"));
  EXPECT_THAT(errors, Contains(HasSubstr("only TEST actions can have an information value")));
  EXPECT_THAT(errors, Contains(HasSubstr("unknown lab 'nope'")));
  EXPECT_THAT(errors, Contains(HasSubstr("unknown concept 'nada'")));
  EXPECT_THAT(errors, Contains(HasSubstr("between 1 and 4")));
  EXPECT_THAT(errors, Contains(HasSubstr("min_gain_bits must not be negative")));
  // A test with an information value needs no `when`.
  EXPECT_TRUE(CompileText(std::string(kMetadata) + R"pb(
    concepts { id: "c" codes { system: "HPO" code: "HP:0000001" } }
    actions { id: "a" kind: TEST title: "A" urgency: INFO information { concepts: "c" } }
  )pb").ok());
}

TEST(CompilerTest, ScreeningErrors) {
  const std::string body = std::string(kValidBody);
  auto with = [&](const std::string& screening) {
    std::string text = std::string(kMetadata) + body;
    text.replace(text.find("disclaimer:"), 0, screening + "\n    ");
    return Errors(CompileText(text));
  };
  EXPECT_THAT(with("screening { hypothesis: \"ipex\" alert_threshold: 0.2 provenance { assumption: true note: \"x\" } }"),
              IsEmpty());
  EXPECT_THAT(with("screening { hypothesis: \"nope\" alert_threshold: 0.2 provenance { assumption: true note: \"x\" } }"),
              Contains(HasSubstr("unknown hypothesis 'nope'")));
  EXPECT_THAT(with("screening { hypothesis: \"ipex\" alert_threshold: 1.2 provenance { assumption: true note: \"x\" } }"),
              Contains(HasSubstr("alert_threshold must be in (0, 1)")));
  EXPECT_THAT(with("screening { hypothesis: \"ipex\" alert_threshold: 0.2 }"),
              Contains(HasSubstr("screening alert_threshold needs a provenance")));
}

TEST(CompilerTest, ActionErrors) {
  const auto errors = Errors(CompileText(std::string(kMetadata) + R"pb(
    concepts { id: "c" codes { system: "HPO" code: "HP:0000001" } }
    actions { id: "a1" kind: DIAGNOSIS title: "A" urgency: INFO when { finding { concept: "c" } } }
    actions { id: "a2" kind: TEST urgency: INFO when { finding { concept: "c" } } }
    actions { id: "a3" kind: TEST title: "A" when { finding { concept: "c" } } }
    actions { id: "a4" kind: TEST title: "A" urgency: INFO }
    actions { id: "a5" kind: TEST title: "A" urgency: INFO reference_ids: "NOPE" when { finding { concept: "c" } } }
  )pb"));
  EXPECT_THAT(errors, Contains(HasSubstr("action kind must be TEST, REFERRAL, TREATMENT or ALERT")));
  EXPECT_THAT(errors, Contains(HasSubstr("action has no title")));
  EXPECT_THAT(errors, Contains(HasSubstr("action urgency is required")));
  EXPECT_THAT(errors, Contains(HasSubstr("action has no 'when' condition")));
  EXPECT_THAT(errors, Contains(HasSubstr("unknown reference id 'NOPE'")));
}

TEST(CompilerTest, TestCaseErrors) {
  const CompileResult result = CompileText(std::string(kMetadata) + kValidBody, R"pb(
    cases { name: "a" patient { sex: MALE } expect { top_diagnosis: "nope" actions: "nada" } }
    cases { name: "a" expect { not_top_diagnosis: "ipex" } }
  )pb");
  const auto errors = Errors(result);
  EXPECT_THAT(errors, Contains(HasSubstr("unknown hypothesis 'nope'")));
  EXPECT_THAT(errors, Contains(HasSubstr("unknown action 'nada'")));
  EXPECT_THAT(errors, Contains(HasSubstr("unique name")));
  EXPECT_THAT(errors, Contains(HasSubstr("test case has no patient")));
  for (const Issue& issue : result.issues) {
    if (issue.message == "unknown hypothesis 'nope'") {
      EXPECT_EQ(issue.file, "tests.textproto");
    }
  }
}

TEST(CompilerTest, WarningsDoNotFailCompilation) {
  const CompileResult result = CompileText(std::string(kMetadata) + kValidBody + R"pb(
    concepts { id: "unused" codes { system: "HPO" code: "HP:0000003" } }
  )pb");
  ASSERT_TRUE(result.ok()) << result.IssuesToString();
  EXPECT_THAT(result.issues,
              Contains(AllOf(Field(&Issue::severity, Issue::Severity::kWarning),
                             Field(&Issue::message, HasSubstr("not used by any rule")))));
}

TEST(CompilerTest, ActionsThatCanNeverFireAreWarnings) {
  const CompileResult result = CompileText(std::string(kMetadata) + R"pb(
    concepts { id: "c" codes { system: "HPO" code: "HP:0000001" } }
    concepts { id: "d" codes { system: "HPO" code: "HP:0000002" } }
    hypotheses {
      id: "h" title: "H" pretest_probability: 0.1 pretest_provenance { assumption: true note: "x" }
      max_probability: 0.9 max_probability_provenance { assumption: true note: "x" }
      evidence { id: "e" when { finding { concept: "c" } } frequencies { in_hypothesis: 0.5 in_comparison: 0.1 } provenance { reference_ids: "SRC" } }
    }
    actions { id: "above_cap" kind: TEST title: "A" urgency: INFO when { probability { hypothesis: "h" at_least: 0.95 } } }
    actions { id: "too_deep" kind: TEST title: "A" urgency: INFO when { probability { hypothesis: "h" in_top: 5 } } }
    actions { id: "two_sexes" kind: TEST title: "A" urgency: INFO when { all { conditions { sex: MALE } conditions { sex: FEMALE } } } }
    actions { id: "no_age" kind: TEST title: "A" urgency: INFO when { all { conditions { age { to { days: 10 } } } conditions { age { from { days: 20 } } } } } }
    actions { id: "any_dead" kind: TEST title: "A" urgency: INFO when { any { conditions { probability { hypothesis: "h" at_least: 0.99 } } conditions { all { conditions { sex: MALE } conditions { sex: FEMALE } } } } } }
    actions { id: "unweighed" kind: TEST title: "A" urgency: INFO information { concepts: "d" } }
    actions { id: "fine" kind: TEST title: "A" urgency: INFO when { any { conditions { sex: MALE } conditions { probability { hypothesis: "h" at_least: 0.99 } } } } }
    actions { id: "weighed" kind: TEST title: "A" urgency: INFO information { concepts: "c" } }
  )pb");
  ASSERT_TRUE(result.ok()) << result.IssuesToString();
  std::set<std::string> never;
  for (const Issue& issue : result.issues) {
    if (issue.message.find("can never fire") != std::string::npos) never.insert(issue.rule_id);
  }
  EXPECT_EQ(never, (std::set<std::string>{"above_cap", "too_deep", "two_sexes", "no_age",
                                          "any_dead", "unweighed"}));
}

// An action's thresholds are numbers like any other: without a provenance they are a warning
// (not an error: versions published before the field existed must load); with one, it is
// checked like every provenance.
TEST(CompilerTest, ActionThresholdsNeedAProvenance) {
  const CompileResult result = CompileText(std::string(kMetadata) + R"pb(
    concepts { id: "c" codes { system: "HPO" code: "HP:0000001" } }
    labs {
      id: "ige" codes { system: "LOINC" code: "19113-0" } canonical_unit: "[IU]/mL"
      limits { upper: 13 provenance { reference_ids: "SRC" } }
    }
    hypotheses {
      id: "h" title: "H" pretest_probability: 0.1 pretest_provenance { assumption: true note: "x" }
      evidence { id: "e" when { finding { concept: "c" } } frequencies { in_hypothesis: 0.5 in_comparison: 0.1 } provenance { reference_ids: "SRC" } }
      evidence { id: "l" when { lab { lab: "ige" above: 100 } } likelihood_ratios { positive: 2 } provenance { reference_ids: "SRC" } }
    }
    actions { id: "on_probability" kind: TEST title: "A" urgency: INFO when { probability { hypothesis: "h" at_least: 0.3 } } }
    actions { id: "on_onset" kind: TEST title: "A" urgency: INFO when { not { finding { concept: "c" onset { to { days: 183 } } } } } }
    actions { id: "on_lab" kind: TEST title: "A" urgency: INFO when { any { conditions { sex: MALE } conditions { lab { lab: "ige" above: 500 } } } } }
    actions { id: "on_count" kind: TEST title: "A" urgency: INFO when { at_least { count: 1 conditions { finding { concept: "c" } } } } }
    actions { id: "on_gain" kind: TEST title: "A" urgency: INFO information { concepts: "c" min_gain_bits: 0.1 } }
    actions { id: "no_numbers" kind: TEST title: "A" urgency: INFO when { all { conditions { sex: MALE } conditions { finding { concept: "c" } } } } }
    actions { id: "sourced" kind: TEST title: "A" urgency: INFO when { probability { hypothesis: "h" at_least: 0.3 } } provenance { reference_ids: "SRC" } }
    actions { id: "assumed" kind: TEST title: "A" urgency: INFO when { age { to { days: 365.25 } } } provenance { assumption: true note: "first year" } }
  )pb");
  ASSERT_TRUE(result.ok()) << result.IssuesToString();
  std::set<std::string> warned;
  for (const Issue& issue : result.issues) {
    if (issue.message.find("need a provenance") != std::string::npos) {
      EXPECT_EQ(issue.severity, Issue::Severity::kWarning);
      warned.insert(issue.rule_id);
    }
  }
  EXPECT_EQ(warned, (std::set<std::string>{"on_probability", "on_onset", "on_lab", "on_count",
                                           "on_gain"}));

  const auto errors = Errors(CompileText(std::string(kMetadata) + R"pb(
    hypotheses { id: "h" title: "H" pretest_probability: 0.1 pretest_provenance { assumption: true note: "x" } }
    actions { id: "bad_ref" kind: TEST title: "A" urgency: INFO when { probability { hypothesis: "h" at_least: 0.3 } } provenance { reference_ids: "NOPE" } }
    actions { id: "empty" kind: TEST title: "A" urgency: INFO when { probability { hypothesis: "h" at_least: 0.3 } } provenance {} }
  )pb"));
  EXPECT_THAT(errors, Contains(HasSubstr("unknown reference id 'NOPE'")));
  EXPECT_THAT(errors, Contains(HasSubstr("the action's set of thresholds needs a provenance")));
}

TEST(CompilerTest, ImplausibleLikelihoodRatioIsAWarning) {
  const CompileResult result = CompileText(std::string(kMetadata) + R"pb(
    concepts { id: "c" codes { system: "HPO" code: "HP:0000001" } }
    hypotheses {
      id: "h" title: "H" pretest_probability: 0.1 pretest_provenance { assumption: true note: "x" }
      evidence { id: "e" when { finding { concept: "c" } } likelihood_ratios { positive: 5000 } provenance { reference_ids: "SRC" } }
    }
  )pb");
  ASSERT_TRUE(result.ok());
  EXPECT_THAT(result.IssuesToString(), HasSubstr("implausible likelihood ratio"));
}

TEST(CompilerTest, AgeConversion) {
  cds::v1::Age age;
  age.set_iso8601_duration("P1Y2M3D");
  AgeDays days = ToDays(age);
  EXPECT_TRUE(days.set);
  EXPECT_TRUE(days.error.empty());
  EXPECT_NEAR(days.days, 365.25 + 2 * 30.44 + 3, 1e-9);
  age.set_iso8601_duration("P2W");
  EXPECT_NEAR(ToDays(age).days, 14, 1e-9);
  age.set_iso8601_duration("PT36H");
  EXPECT_NEAR(ToDays(age).days, 1.5, 1e-9);
  for (const char* bad : {"P", "1Y", "P1X", "PY", "P1Y2", "PT1D", "P1.2.3D"}) {
    age.set_iso8601_duration(bad);
    EXPECT_FALSE(ToDays(age).error.empty()) << bad;
  }
  age.set_days(-1);
  EXPECT_FALSE(ToDays(age).error.empty());
  age.set_days(std::numeric_limits<double>::infinity());
  EXPECT_FALSE(ToDays(age).error.empty());
  EXPECT_FALSE(ToDays(cds::v1::Age()).set);
}

TEST(CompilerTest, NormalizesSystems) {
  EXPECT_EQ(NormalizeSystem("hpo", "HP:1"), "HPO");
  EXPECT_EQ(NormalizeSystem("", "HP:0000001"), "HPO");
  EXPECT_EQ(NormalizeSystem("", "OMIM:304790"), "OMIM");
  EXPECT_EQ(NormalizeSystem("SNOMED CT", "1"), "SNOMEDCT");
  EXPECT_EQ(NormalizeSystem("", "12345"), "");
}

}  // namespace
}  // namespace cds::compiler
