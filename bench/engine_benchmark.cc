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
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "google/protobuf/arena.h"
#include "google/protobuf/text_format.h"
#include "server/compiler/compiler.h"
#include "server/compiler/source_loader.h"
#include "server/engine/engine.h"
#include "server/engine/testing/scaled_rule_set.h"

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

// The protobuf path (engine::Evaluate building a cds.v1.EvaluateResponse, as the tools and
// EvaluateStream use it; unary Evaluate in the server takes the wire path below).
// range(0): explanation level; range(1): 1 = response on a protobuf arena, as
// EvaluateStream places it; 0 = on the heap.
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
                              arena ? ", protobuf, arena" : ", protobuf, heap", "; ", Shape(response)));
}
BENCHMARK(BM_EvaluateTypicalPatient)
    ->Args({kFull, 0})
    ->Args({kCompact, 0})
    ->Args({kNone, 0})
    ->Args({kFull, 1})
    ->Args({kCompact, 1})
    ->Args({kNone, 1});

// range(0): copies of the rule set; range(1): explanation level; range(2): 1 = protobuf
// response on an arena, 0 = on the heap.
void BM_EvaluateScaledRuleSet(benchmark::State& state) {
  const auto rs = CompileOrDie(engine::testing::Scaled(Source(), static_cast<int>(state.range(0))));
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
                              arena ? ", protobuf, arena; " : ", protobuf, heap; ", Shape(response)));
}
BENCHMARK(BM_EvaluateScaledRuleSet)
    ->Args({1, kFull, 0})
    ->Args({10, kFull, 0})
    ->Args({100, kFull, 0})
    ->Args({1, kCompact, 1})
    ->Args({10, kCompact, 1})
    ->Args({100, kCompact, 1});

// Evicts the caches a server call finds cold by sweeping `mib` MiB outside the timed region.
// 2 MiB: between two calls a busy server runs gRPC and the kernel, which displace the
// engine's data from L1 and L2 (a few hundred KB here). 64 MiB (twice this machine's L3):
// every level, as a call finds them when the service is idle between calls (a hospital's
// calls come one by one, with the machine doing other work in between).
void EvictCaches(int mib) {
  static std::vector<char>* sweep = new std::vector<char>(size_t{64} << 20, 1);
  const size_t bytes = std::min(sweep->size(), static_cast<size_t>(mib) << 20);
  for (size_t i = 0; i < bytes; i += 64) (*sweep)[i] = static_cast<char>((*sweep)[i] + 1);
  benchmark::ClobberMemory();
}

// The server's path: the evaluation into a reused engine::Evaluation, rendered straight to
// wire format from the rule set's precompiled fragments into a buffer allocated per call
// (the server writes into a gRPC slice it allocates per call). The same bytes as the
// protobuf response above serialized.
void EvaluateToWire(benchmark::State& state, const compiler::CompiledRuleSet& rs,
                    const engine::EvaluateOptions& options, int evict_mib = 0) {
  engine::Evaluation evaluation;
  engine::WireExtras extras;  // as the service adds them
  extras.evaluation_id = "1b4e28ba-2fa1-4d3b-a3f5-ef19b5a7633b";
  extras.has_evaluated_at = true;
  extras.evaluated_at_seconds = 1795000000;
  extras.evaluated_at_nanos = 123456789;
  size_t bytes = 0;
  for (auto _ : state) {
    if (evict_mib > 0) {
      state.PauseTiming();
      EvictCaches(evict_mib);
      state.ResumeTiming();
    }
    if (!engine::Evaluate(rs, TypicalPatient(), options, &evaluation).ok()) std::abort();
    bytes = evaluation.WireSize(extras);
    std::unique_ptr<char[]> buffer(new char[bytes]);
    evaluation.WriteWire(extras, buffer.get());
    benchmark::DoNotOptimize(buffer.get());
    benchmark::ClobberMemory();
  }
  state.counters["bytes"] = static_cast<double>(bytes);
}

// range(0): explanation level.
void BM_EvaluateTypicalPatientWire(benchmark::State& state) {
  const auto rs = CompileOrDie(Source());
  EvaluateToWire(state, *rs, Options(static_cast<int>(state.range(0))));
  state.SetLabel(absl::StrCat(rs->name, "@", rs->version, " ",
                              ExplanationName(static_cast<int>(state.range(0))), ", wire"));
}
BENCHMARK(BM_EvaluateTypicalPatientWire)->Arg(kFull)->Arg(kCompact)->Arg(kNone);

// The same with cold caches. range(0): explanation level; range(1): MiB swept before each
// call (EvictCaches).
void BM_EvaluateTypicalPatientWireCold(benchmark::State& state) {
  const auto rs = CompileOrDie(Source());
  const int mib = static_cast<int>(state.range(1));
  EvaluateToWire(state, *rs, Options(static_cast<int>(state.range(0))), mib);
  state.SetLabel(absl::StrCat(rs->name, "@", rs->version, " ",
                              ExplanationName(static_cast<int>(state.range(0))), ", wire, ",
                              mib >= 64 ? "every cache level" : "L1 and L2",
                              " evicted before each call"));
}
BENCHMARK(BM_EvaluateTypicalPatientWireCold)->Args({kCompact, 2})->Args({kNone, 2});
// Each call sweeps 64 MiB (~5 ms): a fixed count keeps the run short.
BENCHMARK(BM_EvaluateTypicalPatientWireCold)->Args({kCompact, 64})->Iterations(300);

// range(0): copies of the rule set; range(1): explanation level.
void BM_EvaluateScaledRuleSetWire(benchmark::State& state) {
  const auto rs =
      CompileOrDie(engine::testing::Scaled(Source(), static_cast<int>(state.range(0))));
  EvaluateToWire(state, *rs, Options(static_cast<int>(state.range(1))));
  state.SetLabel(absl::StrCat(rs->hypotheses.size(), " hypotheses, ", rs->evidence.size(),
                              " evidence, ", rs->actions.size(), " actions; ",
                              ExplanationName(static_cast<int>(state.range(1))), ", wire"));
}
BENCHMARK(BM_EvaluateScaledRuleSetWire)
    ->Args({1, kCompact})
    ->Args({10, kCompact})
    ->Args({100, kCompact});

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
