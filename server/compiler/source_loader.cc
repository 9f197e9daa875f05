#include "server/compiler/source_loader.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <system_error>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"

namespace cds::compiler {
namespace fs = std::filesystem;

absl::StatusOr<std::shared_ptr<const ontology::Ontology>> LoadOntologyCached(
    const std::string& ontology_dir, const std::string& release) {
  // Release names become file names: keep them to plain names.
  if (release.empty() || release.find('/') != std::string::npos || release[0] == '.') {
    return absl::InvalidArgumentError(absl::StrCat("invalid ontology release '", release, "'"));
  }
  static absl::Mutex mu(absl::kConstInit);
  static auto* cache ABSL_GUARDED_BY(mu) =
      new absl::flat_hash_map<std::string, std::shared_ptr<const ontology::Ontology>>();
  const std::string path = (fs::path(ontology_dir) / (release + ".tsv")).lexically_normal().string();
  absl::MutexLock lock(&mu);
  if (auto it = cache->find(path); it != cache->end()) return it->second;
  auto loaded = ontology::Ontology::Load(path);
  if (!loaded.ok()) return loaded.status();
  cache->emplace(path, *loaded);
  return *loaded;
}

absl::StatusOr<RuleSetSource> LoadRuleSetDir(const std::string& dir) {
  std::error_code ec;
  const fs::path path = fs::path(dir).lexically_normal();
  if (!fs::is_directory(path, ec)) {
    return absl::NotFoundError(absl::StrCat("rule-set directory not found: ", dir));
  }
  RuleSetSource source;
  fs::path trimmed = path;
  if (trimmed.filename().empty()) trimmed = trimmed.parent_path();
  source.expected_version = trimmed.filename().string();
  source.expected_name = trimmed.parent_path().filename().string();
  const std::string ontology_dir = (trimmed.parent_path().parent_path() / "ontology").string();
  source.ontology_provider = [ontology_dir](const std::string& release) {
    return LoadOntologyCached(ontology_dir, release);
  };
  for (const auto& entry : fs::directory_iterator(path, ec)) {
    if (!entry.is_regular_file()) continue;
    // The bundle's signed manifest describes the rule set; it is not part of it (and not
    // of its content digest). server/bundle verifies it.
    const std::string name = entry.path().filename().string();
    if (name == "MANIFEST" || name == "MANIFEST.sig") continue;
    std::ifstream in(entry.path(), std::ios::binary);
    if (!in) {
      return absl::PermissionDeniedError(
          absl::StrCat("cannot read ", entry.path().string()));
    }
    std::ostringstream content;
    content << in.rdbuf();
    source.files.push_back(SourceFile{entry.path().filename().string(), content.str()});
  }
  if (ec) {
    return absl::UnavailableError(absl::StrCat("cannot list ", dir, ": ", ec.message()));
  }
  std::sort(source.files.begin(), source.files.end(),
            [](const SourceFile& a, const SourceFile& b) { return a.path < b.path; });
  return source;
}

absl::StatusOr<std::vector<std::string>> FindRuleSetDirs(const std::string& root) {
  std::error_code ec;
  if (!fs::is_directory(root, ec)) {
    return absl::NotFoundError(absl::StrCat("rules directory not found: ", root));
  }
  std::vector<std::string> dirs;
  for (const auto& name_dir : fs::directory_iterator(root, ec)) {
    if (!name_dir.is_directory()) continue;
    std::error_code inner;
    for (const auto& version_dir : fs::directory_iterator(name_dir.path(), inner)) {
      if (!version_dir.is_directory()) continue;
      if (fs::is_regular_file(version_dir.path() / kRuleSetFile)) {
        dirs.push_back(version_dir.path().string());
      }
    }
  }
  if (ec) return absl::UnavailableError(absl::StrCat("cannot list ", root, ": ", ec.message()));
  std::sort(dirs.begin(), dirs.end());
  return dirs;
}

}  // namespace cds::compiler
