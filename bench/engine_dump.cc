// Prints every engine response (text format, full precision) for the typical patient, each
// bundled IPEX version's test cases and a validation corpus, with explanations on and off:
// diff the output of two builds to show that an engine change leaves results unchanged.
// Warnings are sorted (their order among derived labs was hash-map order before).
//
// Run: build/bench/engine_dump <source dir> ../shared/validation/cases.jsonl > out.txt
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>
#include "client/validation.h"
#include "google/protobuf/text_format.h"
#include "server/compiler/compiler.h"
#include "server/compiler/source_loader.h"
#include "server/engine/engine.h"
#include "server/engine/testing/scaled_rule_set.h"

namespace {
std::string Read(const std::string& p) { std::ifstream in(p); std::stringstream s; s << in.rdbuf(); return s.str(); }
void Dump(const cds::compiler::CompiledRuleSet& rs, const std::string& name, const cds::v1::Patient& p) {
  for (int level : {0, 1, 2}) {  // no explanation, compact, full trace
    const bool explain = level != 0;
    cds::engine::EvaluateOptions o; o.explain = explain; o.full_trace = level == 2;
    cds::v1::EvaluateResponse r;
    auto st = cds::engine::Evaluate(rs, p, o, &r);
    // Warnings in a set order (hash-map order before).
    std::sort(r.mutable_warnings()->pointer_begin(), r.mutable_warnings()->pointer_end(),
              [](auto* a, auto* b) { return a->SerializeAsString() < b->SerializeAsString(); });
    std::string text; google::protobuf::TextFormat::PrintToString(r, &text);
    std::cout << "### " << rs.version << " " << name << " explain=" << level << " " << st.ToString() << "\n" << text;
  }
}
}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::cerr << "usage: engine_dump <source dir> <corpus.jsonl>\n";
    return 2;
  }
  const std::string src = argv[1];
  auto corpus = cds::cli::ParseCorpus(Read(argv[2]));
  if (!corpus.ok()) { std::cerr << corpus.status() << "\n"; return 1; }
  cds::v1::Patient typical;
  google::protobuf::TextFormat::ParseFromString(Read(src + "/bench/typical_patient.textproto"), &typical);
  for (const char* v : {"1.0.0", "1.1.0", "1.1.1"}) {
    auto loaded = cds::compiler::LoadRuleSetDir(src + "/rules/ipex/" + v);
    if (!loaded.ok()) { std::cerr << loaded.status() << "\n"; return 1; }
    auto result = cds::compiler::Compile(*loaded);
    if (!result.ok()) { std::cerr << result.IssuesToString(); return 1; }
    const auto& rs = *result.rule_set;
    Dump(rs, "typical", typical);
    for (const auto& c : rs.tests.cases()) Dump(rs, c.name(), c.patient());
    for (const auto& e : *corpus) Dump(rs, e.source.id(), e.patient);
    // Ten copies of the rule set (bench/engine_benchmark's scaling): rankings, triggers and
    // folding over many hypotheses.
    auto scaled = cds::compiler::Compile(cds::engine::testing::Scaled(*loaded, 10));
    if (!scaled.ok()) { std::cerr << scaled.IssuesToString(); return 1; }
    Dump(*scaled.rule_set, "typical x10", typical);
    for (const auto& c : rs.tests.cases()) Dump(*scaled.rule_set, c.name() + " x10", c.patient());
  }
}
