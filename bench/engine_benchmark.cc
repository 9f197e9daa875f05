// Engine microbenchmarks (Google Benchmark): a typical patient (30 findings, 5 labs,
// 3 relatives) against the newest bundled IPEX rule set, with explanations on and off;
// compiling a rule set; and synthetic rule sets 10x and 100x the size, to show that the
// cost follows the patient's findings rather than the number of rules.
//
// Run: build/bench/engine_benchmark (bench/run.sh collects the figures).

#include <benchmark/benchmark.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

#include "absl/strings/str_cat.h"
#include "google/protobuf/arena.h"
#include "google/protobuf/text_format.h"
#include "server/compiler/compiler.h"
#include "server/compiler/source_loader.h"
#include "server/engine/engine.h"

namespace cds {
namespace {

const std::string kSourceDir = CDS_SOURCE_DIR;

std::string NewestIpexDir() {
  std::vector<std::string> versions;
  for (const auto& e : std::filesystem::directory_iterator(kSourceDir + "/rules/ipex")) {
    if (std::filesystem::exists(e.path() / "ruleset.textproto")) versions.push_back(e.path().string());
  }
  std::sort(versions.begin(), versions.end());
  return versions.back();
}

const compiler::RuleSetSource& Source() {
  static const auto* source = [] {
    auto loaded = compiler::LoadRuleSetDir(NewestIpexDir());
    if (!loaded.ok()) std::abort();
    return new compiler::RuleSetSource(*std::move(loaded));
  }();
  return *source;
}

std::shared_ptr<const compiler::CompiledRuleSet> CompileOrDie(const compiler::RuleSetSource& s) {
  compiler::CompileResult result = compiler::Compile(s);
  if (!result.ok()) {
    std::fprintf(stderr, "%s\n", result.IssuesToString().c_str());
    std::abort();
  }
  return result.rule_set;
}

const cds::v1::Patient& TypicalPatient() {
  static const auto* patient = [] {
    std::ifstream in(kSourceDir + "/bench/typical_patient.textproto");
    std::stringstream text;
    text << in.rdbuf();
    auto* p = new cds::v1::Patient;
    if (!google::protobuf::TextFormat::ParseFromString(text.str(), p)) std::abort();
    return p;
  }();
  return *patient;
}

// What a response holds: suggestions, evidence items and serialized bytes.
std::string Shape(const cds::v1::EvaluateResponse& response) {
  int evidence = 0;
  for (const auto& s : response.suggestions()) evidence += s.evidence_size();
  return absl::StrCat(response.suggestions_size(), " suggestions, ", evidence, " evidence, ",
                      response.warnings_size(), " warnings, ", response.ByteSizeLong(), " B");
}

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

// The rule set plus `copies - 1` renamed copies of its concepts, labs, hypotheses and
// actions whose codes no patient carries (system LOCAL): `copies` times the rules, of which
// the typical patient touches only the original ones.
compiler::RuleSetSource Scaled(int copies) {
  cds::v1::RuleSet rs;
  const auto& files = Source().files;
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
  compiler::RuleSetSource source = Source();
  source.files.clear();
  std::string text;
  google::protobuf::TextFormat::PrintToString(rs, &text);
  source.files.push_back({compiler::kRuleSetFile, text});
  return source;
}

// Explanation levels, as the request's Explanation enum.
constexpr int kFull = 2;
constexpr int kCompact = 1;
constexpr int kNone = 0;

engine::EvaluateOptions Options(int explanation) {
  engine::EvaluateOptions options;
  options.explain = explanation != kNone;
  options.full_trace = explanation == kFull;
  return options;
}

const char* ExplanationName(int explanation) {
  return explanation == kFull ? "full trace" : explanation == kCompact ? "compact" : "no explanation";
}

// range(0): explanation level; range(1): 1 = response on a protobuf arena, as the server's
// per-call arenas place it; 0 = on the heap.
void BM_EvaluateTypicalPatient(benchmark::State& state) {
  const auto rs = CompileOrDie(Source());
  const engine::EvaluateOptions options = Options(static_cast<int>(state.range(0)));
  const bool arena = state.range(1) != 0;
  for (auto _ : state) {
    if (arena) {
      google::protobuf::Arena a;
      auto* response = google::protobuf::Arena::CreateMessage<cds::v1::EvaluateResponse>(&a);
      if (!engine::Evaluate(*rs, TypicalPatient(), options, response).ok()) std::abort();
      benchmark::DoNotOptimize(response);
    } else {
      cds::v1::EvaluateResponse response;
      if (!engine::Evaluate(*rs, TypicalPatient(), options, &response).ok()) std::abort();
      benchmark::DoNotOptimize(response);
    }
  }
  cds::v1::EvaluateResponse response;
  if (!engine::Evaluate(*rs, TypicalPatient(), options, &response).ok()) std::abort();
  state.SetLabel(absl::StrCat(rs->name, "@", rs->version, " ",
                              ExplanationName(static_cast<int>(state.range(0))),
                              arena ? ", arena" : ", heap", "; ", Shape(response)));
}
BENCHMARK(BM_EvaluateTypicalPatient)
    ->Args({kFull, 0})
    ->Args({kCompact, 0})
    ->Args({kNone, 0})
    ->Args({kFull, 1})
    ->Args({kCompact, 1})
    ->Args({kNone, 1});

// range(0): copies of the rule set; range(1): explanation level; range(2): 1 = response on
// an arena (as in the server), 0 = on the heap.
void BM_EvaluateScaledRuleSet(benchmark::State& state) {
  const auto rs = CompileOrDie(Scaled(static_cast<int>(state.range(0))));
  const engine::EvaluateOptions options = Options(static_cast<int>(state.range(1)));
  const bool arena = state.range(2) != 0;
  for (auto _ : state) {
    if (arena) {
      google::protobuf::Arena a;
      auto* response = google::protobuf::Arena::CreateMessage<cds::v1::EvaluateResponse>(&a);
      if (!engine::Evaluate(*rs, TypicalPatient(), options, response).ok()) std::abort();
      benchmark::DoNotOptimize(response);
    } else {
      cds::v1::EvaluateResponse response;
      if (!engine::Evaluate(*rs, TypicalPatient(), options, &response).ok()) std::abort();
      benchmark::DoNotOptimize(response);
    }
  }
  cds::v1::EvaluateResponse response;
  if (!engine::Evaluate(*rs, TypicalPatient(), options, &response).ok()) std::abort();
  state.SetLabel(absl::StrCat(rs->hypotheses.size(), " hypotheses, ", rs->evidence.size(),
                              " evidence, ", rs->actions.size(), " actions; ", ExplanationName(static_cast<int>(state.range(1))),
                              arena ? ", arena; " : ", heap; ", Shape(response)));
}
BENCHMARK(BM_EvaluateScaledRuleSet)
    ->Args({1, kFull, 0})
    ->Args({10, kFull, 0})
    ->Args({100, kFull, 0})
    ->Args({1, kCompact, 1})
    ->Args({10, kCompact, 1})
    ->Args({100, kCompact, 1});

void BM_CompileRuleSet(benchmark::State& state) {
  for (auto _ : state) {
    auto result = compiler::Compile(Source());
    benchmark::DoNotOptimize(result);
  }
}
BENCHMARK(BM_CompileRuleSet)->Unit(benchmark::kMillisecond);

}  // namespace
}  // namespace cds

BENCHMARK_MAIN();
