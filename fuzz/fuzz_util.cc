#include "fuzz/fuzz_util.h"

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "cds/v1/patient.pb.h"
#include "google/protobuf/text_format.h"
#include "server/compiler/compiler.h"
#include "server/compiler/source_loader.h"

namespace cds::fuzz {
namespace {

[[noreturn]] void Die(const std::string& message) {
  std::fprintf(stderr, "fuzz setup: %s\n", message.c_str());
  std::abort();
}

// "1.10.0" > "1.9.3": numeric components; a non-numeric one compares as 0.
bool VersionLess(const std::string& a, const std::string& b) {
  std::vector<std::string> pa = absl::StrSplit(a, '.');
  std::vector<std::string> pb = absl::StrSplit(b, '.');
  for (size_t i = 0; i < pa.size() || i < pb.size(); ++i) {
    int x = 0;
    int y = 0;
    if (i < pa.size() && !absl::SimpleAtoi(pa[i], &x)) x = 0;
    if (i < pb.size() && !absl::SimpleAtoi(pb[i], &y)) y = 0;
    if (x != y) return x < y;
  }
  return false;
}

}  // namespace

std::string RulesDir() {
  if (const char* dir = std::getenv("CDS_FUZZ_RULES_DIR"); dir != nullptr && *dir != '\0') {
    return dir;
  }
  return std::string(CDS_SOURCE_DIR) + "/rules";
}

const compiler::CompiledRuleSet& BundledIpexRuleSet() {
  static const std::shared_ptr<const compiler::CompiledRuleSet> rule_set = [] {
    const std::string ipex = RulesDir() + "/ipex";
    absl::StatusOr<std::vector<std::string>> dirs = compiler::FindRuleSetDirs(RulesDir());
    if (!dirs.ok()) Die(std::string(dirs.status().message()));
    std::string latest_dir;
    std::string latest_version;
    for (const std::string& dir : *dirs) {
      if (dir.rfind(ipex + "/", 0) != 0) continue;
      const std::string version = dir.substr(ipex.size() + 1);
      if (latest_dir.empty() || VersionLess(latest_version, version)) {
        latest_dir = dir;
        latest_version = version;
      }
    }
    if (latest_dir.empty()) Die("no rule set under " + ipex);
    absl::StatusOr<compiler::RuleSetSource> source = compiler::LoadRuleSetDir(latest_dir);
    if (!source.ok()) Die(std::string(source.status().message()));
    compiler::CompileResult result = compiler::Compile(*source);
    if (!result.ok()) Die(latest_dir + " does not compile:\n" + result.IssuesToString());
    return result.rule_set;
  }();
  return *rule_set;
}

const cds::v1::Patient& TypicalPatient() {
  static const cds::v1::Patient* const patient = [] {
    const std::string path = std::string(CDS_SOURCE_DIR) + "/bench/typical_patient.textproto";
    std::ifstream in(path);
    std::stringstream text;
    text << in.rdbuf();
    auto* parsed = new cds::v1::Patient();
    if (!in || !google::protobuf::TextFormat::ParseFromString(text.str(), parsed)) {
      Die("cannot parse " + path);
    }
    return parsed;
  }();
  return *patient;
}

}  // namespace cds::fuzz
