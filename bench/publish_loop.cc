// Publishes N new signed versions of a bundled rule set into an in-process RuleStore (state
// directory, keep_versions 10, as bench/run.sh's rule-update server) and moves `stable` to
// each: publish and label-move latency without gRPC, audit or load, to compare two builds.
// The store's log lines (stderr) give each publish's steps.
//
// Run: build/bench/publish_loop rules/ipex/1.1.1 <versions> <scratch dir> 2> publish.log
// (the scratch dir is emptied first; the version is re-versioned MAJOR.MINOR.101, .102, ...;
// the ontology comes from the rules directory two levels up).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "absl/time/clock.h"
#include "server/bundle/bundle.h"
#include "server/compiler/source_loader.h"
#include "server/store/rule_store.h"

namespace {

using Clock = std::chrono::steady_clock;

double Millis(Clock::duration d) { return std::chrono::duration<double, std::milli>(d).count(); }

void Report(const char* what, std::vector<double> ms) {
  std::sort(ms.begin(), ms.end());
  std::printf("%s p50 %.2f ms p90 %.2f ms max %.2f ms\n", what, ms[ms.size() / 2],
              ms[ms.size() * 9 / 10], ms.back());
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4 || std::atoi(argv[2]) < 1) {
    std::fprintf(stderr, "usage: publish_loop <rule-set version dir> <versions> <scratch dir>\n");
    return 2;
  }
  const std::filesystem::path source_dir = std::filesystem::path(argv[1]).lexically_normal();
  const std::string name = source_dir.parent_path().filename().string();
  const std::string source_version = source_dir.filename().string();
  const std::string prefix = source_version.substr(0, source_version.rfind('.') + 1);
  const int versions = std::atoi(argv[2]);
  const std::string scratch = argv[3];
  std::filesystem::remove_all(scratch);
  std::filesystem::create_directories(scratch + "/keys");
  const cds::bundle::PrivateKey key = cds::bundle::PrivateKey::Generate().value();
  std::ofstream(scratch + "/keys/bench.pub") << key.public_key().ToPem();

  cds::store::RuleStore::Options options;
  options.trusted_keys_dir = scratch + "/keys";
  options.state_dir = scratch + "/state";
  options.ontology_dir = (source_dir.parent_path().parent_path() / "ontology").string();
  options.keep_versions = 10;
  cds::store::RuleStore store(options);
  if (!store.RestoreState().ok()) return 1;
  absl::StatusOr<cds::compiler::RuleSetSource> source =
      cds::compiler::LoadRuleSetDir(source_dir.string());
  if (!source.ok()) {
    std::fprintf(stderr, "%s\n", source.status().ToString().c_str());
    return 1;
  }
  std::vector<double> publish_ms, label_ms;
  for (int i = 1; i <= versions; ++i) {
    const std::string version = absl::StrCat(prefix, 100 + i);
    std::vector<cds::compiler::SourceFile> files = source->files;
    for (cds::compiler::SourceFile& file : files) {
      if (file.path != "ruleset.textproto") continue;
      file.content = absl::StrReplaceAll(
          file.content, {{absl::StrCat("version: \"", source_version, "\""),
                          absl::StrCat("version: \"", version, "\"")}});
    }
    std::string bytes;
    cds::bundle::SignFiles(name, version, files, "publish_loop", key, absl::Now())
        .value()
        .SerializeToString(&bytes);
    const Clock::time_point start = Clock::now();
    const absl::StatusOr<cds::store::PublishResult> published = store.PublishBytes(bytes);
    const Clock::time_point published_at = Clock::now();
    if (!published.ok()) {
      std::fprintf(stderr, "publish %s: %s\n", version.c_str(),
                   published.status().ToString().c_str());
      return 1;
    }
    const absl::StatusOr<std::string> labelled = store.SetLabel(name, "stable", version);
    if (!labelled.ok()) {
      std::fprintf(stderr, "label %s: %s\n", version.c_str(),
                   labelled.status().ToString().c_str());
      return 1;
    }
    publish_ms.push_back(Millis(published_at - start));
    label_ms.push_back(Millis(Clock::now() - published_at));
  }
  Report("publish", publish_ms);
  Report("label", label_ms);
  return 0;
}
