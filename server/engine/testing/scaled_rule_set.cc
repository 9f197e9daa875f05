#include "server/engine/testing/scaled_rule_set.h"

#include <algorithm>
#include <cstdlib>
#include <string>

#include "absl/strings/str_cat.h"
#include "google/protobuf/text_format.h"

namespace cds::engine::testing {
namespace {

// Renames every id a condition refers to with `suffix`.
void Rename(cds::v1::Condition* c, const std::string& suffix) {
  switch (c->kind_case()) {
    case cds::v1::Condition::kFinding:
      c->mutable_finding()->set_concept(c->finding().concept() + suffix);
      break;
    case cds::v1::Condition::kLab:
      c->mutable_lab()->set_lab(c->lab().lab() + suffix);
      break;
    case cds::v1::Condition::kFamily:
      if (!c->family().affected_concept().empty()) {
        c->mutable_family()->set_affected_concept(c->family().affected_concept() + suffix);
      }
      break;
    case cds::v1::Condition::kProbability:
      c->mutable_probability()->set_hypothesis(c->probability().hypothesis() + suffix);
      break;
    case cds::v1::Condition::kAll:
      for (auto& child : *c->mutable_all()->mutable_conditions()) Rename(&child, suffix);
      break;
    case cds::v1::Condition::kAny:
      for (auto& child : *c->mutable_any()->mutable_conditions()) Rename(&child, suffix);
      break;
    case cds::v1::Condition::kNot:
      Rename(c->mutable_not_(), suffix);
      break;
    case cds::v1::Condition::kAtLeast:
      for (auto& child : *c->mutable_at_least()->mutable_conditions()) Rename(&child, suffix);
      break;
    default:
      break;
  }
}

}  // namespace

// The rule set plus `copies - 1` renamed copies of its concepts, labs, hypotheses and
// actions whose codes no patient carries (system LOCAL): `copies` times the rules, of which
// the typical patient touches only the original ones.
compiler::RuleSetSource Scaled(const compiler::RuleSetSource& base, int copies) {
  cds::v1::RuleSet rs;
  const auto& files = base.files;
  auto it = std::find_if(files.begin(), files.end(),
                         [](const auto& f) { return f.path == compiler::kRuleSetFile; });
  if (!google::protobuf::TextFormat::ParseFromString(it->content, &rs)) std::abort();
  const cds::v1::RuleSet original = rs;
  for (auto& h : *rs.mutable_hypotheses()) h.set_pretest_probability(h.pretest_probability() / copies);
  for (int k = 1; k < copies; ++k) {
    const std::string suffix = absl::StrCat("_x", k);
    for (auto c : original.concepts()) {
      c.set_id(c.id() + suffix);
      for (auto& code : *c.mutable_codes()) {
        code.set_system("LOCAL");
        code.set_code(code.code() + suffix);
      }
      *rs.add_concepts() = c;
    }
    for (auto l : original.labs()) {
      l.set_id(l.id() + suffix);
      for (auto& code : *l.mutable_codes()) {
        code.set_system("LOCAL");
        code.set_code(code.code() + suffix);
      }
      if (l.has_derived_from()) {
        l.mutable_derived_from()->set_percent_lab(l.derived_from().percent_lab() + suffix);
        l.mutable_derived_from()->set_total_lab(l.derived_from().total_lab() + suffix);
      }
      *rs.add_labs() = l;
    }
    for (auto h : original.hypotheses()) {
      h.set_id(h.id() + suffix);
      h.set_pretest_probability(h.pretest_probability() / copies);
      for (auto& e : *h.mutable_evidence()) Rename(e.mutable_when(), suffix);
      *rs.add_hypotheses() = h;
    }
    for (auto a : original.actions()) {
      a.set_id(a.id() + suffix);
      if (a.has_when()) Rename(a.mutable_when(), suffix);
      if (a.has_information()) {
        auto* info = a.mutable_information();
        for (auto& lab : *info->mutable_labs()) lab += suffix;
        for (auto& concept_id : *info->mutable_concepts()) concept_id += suffix;
      }
      *rs.add_actions() = a;
    }
  }
  rs.mutable_metadata()->clear_screening();
  compiler::RuleSetSource source = base;
  source.files.clear();
  std::string text;
  google::protobuf::TextFormat::PrintToString(rs, &text);
  source.files.push_back({compiler::kRuleSetFile, text});
  return source;
}

}  // namespace cds::engine::testing
