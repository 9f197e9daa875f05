#include "server/store/rule_store.h"

#include <algorithm>
#include <cstdint>
#include <optional>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "server/common/log.h"
#include "server/compiler/source_loader.h"
#include "server/engine/case_runner.h"

namespace cds::store {
namespace {

using cds::v1::RuleSetInfo;

// Rule-set names and versions come from the caller; they are not patient data, but an
// error message must stay short and printable whatever was sent.
constexpr size_t kMaxEchoedChars = 64;
// A rejection reason lists this many issues or failing cases, then "... and N more".
constexpr size_t kMaxReasonItems = 8;
constexpr size_t kMaxReasonChars = 4000;

std::string Echo(const std::string& text) {
  std::string shown = absl::CHexEscape(text.substr(0, kMaxEchoedChars));
  if (text.size() > kMaxEchoedChars) absl::StrAppend(&shown, "...");
  return shown;
}

std::string CapReason(std::string reason) {
  if (reason.size() > kMaxReasonChars) {
    reason.resize(kMaxReasonChars);
    reason += "...";
  }
  return reason;
}

// Joins the first kMaxReasonItems lines and says how many were left out.
std::string FirstLines(const std::vector<std::string>& lines) {
  std::vector<std::string> shown(lines.begin(),
                                 lines.begin() + std::min(lines.size(), kMaxReasonItems));
  std::string text = absl::StrJoin(shown, "\n");
  if (lines.size() > kMaxReasonItems) {
    absl::StrAppend(&text, "\n... and ", lines.size() - kMaxReasonItems, " more");
  }
  return CapReason(std::move(text));
}

std::string OneLine(const std::string& text) {
  return absl::StrReplaceAll(text, {{":\n", ": "}, {"\n", "; "}});
}

// Semantic version 2.0.0 precedence (https://semver.org/#spec-item-11); build metadata
// ("+...") is ignored.
struct Semver {
  uint64_t major = 0, minor = 0, patch = 0;
  std::vector<std::string> prerelease;
};

bool IsNumeric(absl::string_view s) {
  return !s.empty() && std::all_of(s.begin(), s.end(), [](char c) {
    return absl::ascii_isdigit(static_cast<unsigned char>(c));
  });
}

std::optional<Semver> ParseSemver(absl::string_view text) {
  text = text.substr(0, text.find('+'));
  absl::string_view core = text;
  absl::string_view pre;
  if (size_t dash = text.find('-'); dash != absl::string_view::npos) {
    core = text.substr(0, dash);
    pre = text.substr(dash + 1);
    if (pre.empty()) return std::nullopt;
  }
  std::vector<absl::string_view> parts = absl::StrSplit(core, '.');
  if (parts.size() != 3) return std::nullopt;
  Semver v;
  uint64_t* fields[] = {&v.major, &v.minor, &v.patch};
  for (int i = 0; i < 3; ++i) {
    if (!IsNumeric(parts[i]) || !absl::SimpleAtoi(parts[i], fields[i])) return std::nullopt;
  }
  if (!pre.empty()) {
    for (absl::string_view id : absl::StrSplit(pre, '.')) {
      if (id.empty()) return std::nullopt;
      v.prerelease.emplace_back(id);
    }
  }
  return v;
}

// <0, 0, >0 like strcmp.
int ComparePrereleaseId(const std::string& a, const std::string& b) {
  const bool a_num = IsNumeric(a), b_num = IsNumeric(b);
  if (a_num && b_num) {
    if (a.size() != b.size()) return a.size() < b.size() ? -1 : 1;
    return a.compare(b);
  }
  if (a_num != b_num) return a_num ? -1 : 1;  // numeric identifiers sort first
  return a.compare(b);
}

int CompareSemver(const Semver& a, const Semver& b) {
  if (a.major != b.major) return a.major < b.major ? -1 : 1;
  if (a.minor != b.minor) return a.minor < b.minor ? -1 : 1;
  if (a.patch != b.patch) return a.patch < b.patch ? -1 : 1;
  // A pre-release sorts before its release.
  if (a.prerelease.empty() != b.prerelease.empty()) return a.prerelease.empty() ? 1 : -1;
  for (size_t i = 0; i < std::min(a.prerelease.size(), b.prerelease.size()); ++i) {
    if (int c = ComparePrereleaseId(a.prerelease[i], b.prerelease[i]); c != 0) return c;
  }
  if (a.prerelease.size() != b.prerelease.size()) {
    return a.prerelease.size() < b.prerelease.size() ? -1 : 1;
  }
  return 0;
}

void SetTimestamp(absl::Time t, google::protobuf::Timestamp* out) {
  const int64_t seconds = absl::ToUnixSeconds(t);
  out->set_seconds(seconds);
  out->set_nanos(static_cast<int32_t>(
      absl::ToInt64Nanoseconds(t - absl::FromUnixSeconds(seconds))));
}

// The last two components of ".../<name>/<version>[/]".
std::pair<std::string, std::string> NameAndVersionFromDir(const std::string& dir) {
  std::vector<std::string> parts = absl::StrSplit(dir, '/', absl::SkipEmpty());
  if (parts.size() < 2) return {"", ""};
  return {parts[parts.size() - 2], parts.back()};
}

}  // namespace

bool SemverLess(const std::string& a, const std::string& b) {
  const std::optional<Semver> va = ParseSemver(a);
  const std::optional<Semver> vb = ParseSemver(b);
  if (va && vb) {
    if (int c = CompareSemver(*va, *vb); c != 0) return c < 0;
    return a < b;  // same precedence (e.g. different build metadata): keep a strict order
  }
  if (va.has_value() != vb.has_value()) return va.has_value();  // semver before the rest
  return a < b;
}

RuleSetInfo::State RuleStore::AddVersion(const compiler::RuleSetSource& source,
                                         const std::string& source_dir) {
  // Compile and run the embedded cases without the lock: readers keep being served.
  VersionEntry entry;
  entry.name = source.expected_name;
  entry.version = source.expected_version;
  entry.source_dir = source_dir;
  entry.loaded_at = absl::Now();

  compiler::CompileResult compiled = compiler::Compile(source);
  if (compiled.ok()) {
    entry.name = compiled.rule_set->name;
    entry.version = compiled.rule_set->version;
    entry.digest = compiled.rule_set->digest;
    const std::vector<engine::CaseResult> results =
        engine::RunCases(*compiled.rule_set, compiled.rule_set->tests);
    std::vector<std::string> failures;
    for (const engine::CaseResult& result : results) {
      if (result.passed) continue;
      failures.push_back(absl::StrCat("case '", result.name, "' failed: ",
                                      absl::StrJoin(result.failures, "; ")));
    }
    if (!failures.empty()) {
      entry.state = RuleSetInfo::REJECTED;
      entry.reason = absl::StrCat(failures.size(), " of ", results.size(),
                                  " embedded test cases failed:\n", FirstLines(failures));
    } else if (compiled.rule_set->definition.metadata().status() ==
               cds::v1::RuleSetMetadata::RETIRED) {
      // A retired version is listed (for audit) but never served.
      entry.state = RuleSetInfo::RETIRED;
      entry.rule_set = compiled.rule_set;
    } else {
      entry.state = RuleSetInfo::AVAILABLE;
      entry.rule_set = compiled.rule_set;
    }
  } else {
    entry.digest = compiler::DigestFiles(source.files);
    std::vector<std::string> errors;
    for (const compiler::Issue& issue : compiled.issues) {
      if (issue.severity == compiler::Issue::Severity::kError) errors.push_back(issue.ToString());
    }
    entry.state = RuleSetInfo::REJECTED;
    entry.reason = absl::StrCat("does not compile (", errors.size(),
                                errors.size() == 1 ? " error" : " errors", "):\n",
                                FirstLines(errors));
  }
  if (entry.name.empty()) entry.name = "(unnamed)";
  if (entry.version.empty()) entry.version = "(unversioned)";
  const std::string label = absl::StrCat(entry.name, "@", entry.version);

  const RuleSetInfo::State state = entry.state;
  absl::MutexLock lock(&mu_);
  auto& versions = entries_[entry.name];
  auto it = versions.find(entry.version);
  if (it != versions.end() && it->second.state == RuleSetInfo::AVAILABLE &&
      state != RuleSetInfo::AVAILABLE) {
    // A failed reload never replaces the version being served.
    log::Error("rule set ", label, " ", RuleSetInfo::State_Name(state),
               ", keeping the version already served: ", OneLine(entry.reason));
    return state;
  }
  if (state == RuleSetInfo::AVAILABLE) {
    log::Info("rule set ", label, " AVAILABLE digest=", entry.digest,
              " hypotheses=", entry.rule_set->hypotheses.size(),
              " actions=", entry.rule_set->actions.size(),
              " cases=", entry.rule_set->tests.cases_size(), " dir=", source_dir);
  } else if (state == RuleSetInfo::RETIRED) {
    log::Info("rule set ", label, " RETIRED (not served) digest=", entry.digest);
  } else {
    log::Error("rule set ", label, " REJECTED (not served) dir=", source_dir, ": ",
               OneLine(entry.reason));
  }
  entry.reason = CapReason(std::move(entry.reason));
  versions[entry.version] = std::move(entry);
  return state;
}

absl::StatusOr<int> RuleStore::LoadFromDirectory(const std::string& root) {
  absl::StatusOr<std::vector<std::string>> dirs = compiler::FindRuleSetDirs(root);
  if (!dirs.ok()) {
    return absl::Status(dirs.status().code(), absl::StrCat("cannot read rules directory '", root,
                                                           "': ", dirs.status().message()));
  }
  if (dirs->empty()) log::Warning("no rule sets found under ", root);
  for (const std::string& dir : *dirs) {
    absl::StatusOr<compiler::RuleSetSource> source = compiler::LoadRuleSetDir(dir);
    if (source.ok()) {
      AddVersion(*source, dir);
      continue;
    }
    // Unreadable files: record the version as rejected so status queries show why.
    auto [name, version] = NameAndVersionFromDir(dir);
    VersionEntry entry;
    entry.name = name.empty() ? dir : name;
    entry.version = version;
    entry.state = RuleSetInfo::REJECTED;
    entry.reason = CapReason(absl::StrCat("cannot read: ", source.status().message()));
    entry.source_dir = dir;
    entry.loaded_at = absl::Now();
    log::Error("rule set ", entry.name, "@", entry.version, " REJECTED (not served): ",
               OneLine(entry.reason));
    absl::MutexLock lock(&mu_);
    auto& slot = entries_[entry.name][entry.version];
    if (slot.state != RuleSetInfo::AVAILABLE) slot = std::move(entry);
  }
  return AvailableCount();
}

absl::StatusOr<Resolved> RuleStore::Resolve(const std::string& name,
                                            const std::string& version) const {
  absl::MutexLock lock(&mu_);
  const VersionEntry* entry = nullptr;
  if (version.empty()) {
    entry = DefaultLocked(name);
  } else if (auto by_name = entries_.find(name); by_name != entries_.end()) {
    if (auto it = by_name->second.find(version);
        it != by_name->second.end() && it->second.state == RuleSetInfo::AVAILABLE) {
      entry = &it->second;
    }
  }
  if (entry != nullptr) return Resolved{entry->rule_set, entry->evaluations};

  // Nothing at all to serve is a (retryable) server condition, not the caller's mistake.
  bool any_available = false;
  for (const auto& [unused_name, versions] : entries_) {
    for (const auto& [unused_version, e] : versions) {
      any_available |= e.state == RuleSetInfo::AVAILABLE;
    }
  }
  if (!any_available) return absl::UnavailableError("no rule set is available yet");
  if (entries_.find(name) == entries_.end()) {
    return absl::NotFoundError(absl::StrCat("rule set '", Echo(name), "' is not loaded"));
  }
  if (version.empty()) {
    return absl::NotFoundError(
        absl::StrCat("rule set '", Echo(name), "' has no available version"));
  }
  return absl::NotFoundError(absl::StrCat("version '", Echo(version), "' of rule set '",
                                          Echo(name), "' is not available"));
}

std::vector<RuleSetInfo> RuleStore::List(const std::string& name) const {
  absl::MutexLock lock(&mu_);
  std::vector<RuleSetInfo> out;
  for (const auto& [entry_name, versions] : entries_) {
    if (!name.empty() && entry_name != name) continue;
    std::vector<const VersionEntry*> sorted;
    for (const auto& [unused, entry] : versions) sorted.push_back(&entry);
    std::sort(sorted.begin(), sorted.end(), [](const VersionEntry* a, const VersionEntry* b) {
      return SemverLess(a->version, b->version);
    });
    for (const VersionEntry* entry : sorted) out.push_back(InfoLocked(*entry));
  }
  return out;
}

absl::StatusOr<cds::v1::GetRuleSetResponse> RuleStore::Get(const std::string& name,
                                                           const std::string& version) const {
  absl::MutexLock lock(&mu_);
  auto by_name = entries_.find(name);
  if (by_name == entries_.end()) {
    return absl::NotFoundError(absl::StrCat("rule set '", Echo(name), "' is not loaded"));
  }
  const VersionEntry* entry = nullptr;
  if (version.empty()) {
    entry = DefaultLocked(name);
    if (entry == nullptr) {
      return absl::NotFoundError(
          absl::StrCat("rule set '", Echo(name), "' has no available version"));
    }
  } else {
    auto it = by_name->second.find(version);
    if (it == by_name->second.end()) {
      return absl::NotFoundError(absl::StrCat("version '", Echo(version), "' of rule set '",
                                              Echo(name), "' is not loaded"));
    }
    entry = &it->second;  // any state: status queries also describe rejected versions
  }
  cds::v1::GetRuleSetResponse response;
  *response.mutable_info() = InfoLocked(*entry);
  if (entry->rule_set != nullptr) *response.mutable_definition() = entry->rule_set->definition;
  return response;
}

int RuleStore::AvailableCount() const {
  absl::MutexLock lock(&mu_);
  int count = 0;
  for (const auto& [unused_name, versions] : entries_) {
    for (const auto& [unused_version, entry] : versions) {
      count += entry.state == RuleSetInfo::AVAILABLE;
    }
  }
  return count;
}

RuleSetInfo RuleStore::InfoLocked(const VersionEntry& entry) const {
  RuleSetInfo info;
  info.mutable_ref()->set_name(entry.name);
  info.mutable_ref()->set_version(entry.version);
  info.mutable_ref()->set_digest(entry.digest);
  info.set_state(entry.state);
  info.set_reason(entry.reason);
  SetTimestamp(entry.loaded_at, info.mutable_loaded_at());
  info.set_evaluation_count(entry.evaluations->load(std::memory_order_relaxed));
  info.set_is_default(DefaultLocked(entry.name) == &entry);
  if (entry.rule_set != nullptr) {
    const compiler::CompiledRuleSet& rs = *entry.rule_set;
    const cds::v1::RuleSetMetadata& metadata = rs.definition.metadata();
    info.set_title(metadata.title());
    info.set_description(metadata.description());
    for (const std::string& author : metadata.authors()) info.add_authors(author);
    info.set_effective_date(metadata.effective_date());
    info.set_hypothesis_count(static_cast<int32_t>(rs.hypotheses.size()));
    info.set_action_count(static_cast<int32_t>(rs.actions.size()));
  }
  return info;
}

const VersionEntry* RuleStore::DefaultLocked(const std::string& name) const {
  auto by_name = entries_.find(name);
  if (by_name == entries_.end()) return nullptr;
  const VersionEntry* best = nullptr;
  for (const auto& [version, entry] : by_name->second) {
    if (entry.state != RuleSetInfo::AVAILABLE) continue;
    if (best == nullptr || SemverLess(best->version, version)) best = &entry;
  }
  return best;
}

}  // namespace cds::store
