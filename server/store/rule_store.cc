#include "server/store/rule_store.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>
#include <sstream>
#include <system_error>
#include <thread>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "google/protobuf/text_format.h"
#include "server/common/log.h"
#include "server/common/status_macros.h"
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
  // MAJOR.MINOR.PATCH without allocating: requests that name no version compare the
  // available versions on every call (DefaultLocked).
  Semver v;
  uint64_t* fields[] = {&v.major, &v.minor, &v.patch};
  for (int i = 0; i < 3; ++i) {
    const size_t dot = i < 2 ? core.find('.') : core.size();
    if (dot == absl::string_view::npos) return std::nullopt;
    const absl::string_view part = core.substr(0, dot);
    if (!IsNumeric(part) || !absl::SimpleAtoi(part, fields[i])) return std::nullopt;
    core.remove_prefix(i < 2 ? dot + 1 : dot);
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


namespace fs = std::filesystem;

constexpr char kStateFile[] = "STATE";
constexpr char kBundlesDir[] = "bundles";
constexpr char kTmpDir[] = "tmp";
constexpr char kOriginRulesDir[] = "rules_dir";
constexpr char kOriginPublished[] = "published";

absl::Status ErrnoError(const std::string& what) {
  return absl::InternalError(absl::StrCat(what, ": ", std::strerror(errno)));
}

// Writes `content` to a new file; returns its open descriptor (writeback of the data
// started, not waited for).
absl::StatusOr<int> WriteFile(const std::string& path, const std::string& content) {
  const int fd = open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return ErrnoError(absl::StrCat("cannot create ", path));
  size_t written = 0;
  while (written < content.size()) {
    const ssize_t n = write(fd, content.data() + written, content.size() - written);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      absl::Status error = ErrnoError(absl::StrCat("cannot write ", path));
      close(fd);
      return error;
    }
    written += static_cast<size_t>(n);
  }
#ifdef __linux__
  // Only a hint (the fsync below is what makes the data durable): the blocks of every file
  // of a bundle are then allocated before the first fsync, whose journal commit covers
  // them all, and the later fsyncs have no commit of their own to wait for.
  sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE);
#endif
  return fd;
}

// fsyncs and closes `fd`, which `path` names (for the error).
absl::Status SyncAndClose(int fd, const std::string& path) {
  if (fsync(fd) != 0) {
    absl::Status error = ErrnoError(absl::StrCat("cannot fsync ", path));
    close(fd);
    return error;
  }
  if (close(fd) != 0) return ErrnoError(absl::StrCat("cannot close ", path));
  return absl::OkStatus();
}

// Writes `content` to a new file and fsyncs it before returning.
absl::Status WriteFileDurably(const std::string& path, const std::string& content) {
  absl::StatusOr<int> fd = WriteFile(path, content);
  if (!fd.ok()) return fd.status();
  return SyncAndClose(*fd, path);
}

// Files written into one directory, then fsynced together (Sync): one fsync per file as
// before, but with every file's writeback started first (see WriteFile).
class DurableFiles {
 public:
  DurableFiles() = default;
  DurableFiles(const DurableFiles&) = delete;
  DurableFiles& operator=(const DurableFiles&) = delete;
  ~DurableFiles() {
    for (const auto& [fd, unused] : open_) close(fd);
  }

  absl::Status Write(const std::string& path, const std::string& content) {
    absl::StatusOr<int> fd = WriteFile(path, content);
    if (!fd.ok()) return fd.status();
    open_.emplace_back(*fd, path);
    return absl::OkStatus();
  }

  // fsyncs and closes every file written, in order.
  absl::Status Sync() {
    absl::Status status;
    for (const auto& [fd, path] : open_) {
      if (absl::Status synced = SyncAndClose(fd, path); status.ok()) status = synced;
    }
    open_.clear();
    return status;
  }

 private:
  std::vector<std::pair<int, std::string>> open_;
};

// Makes a directory's entries (creations, renames) durable.
absl::Status SyncDir(const std::string& dir) {
  const int fd = open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return ErrnoError(absl::StrCat("cannot open ", dir));
  const int rc = fsync(fd);
  close(fd);
  if (rc != 0) return ErrnoError(absl::StrCat("cannot fsync ", dir));
  return absl::OkStatus();
}

absl::Status Rename(const std::string& from, const std::string& to) {
  if (rename(from.c_str(), to.c_str()) != 0) {
    return ErrnoError(absl::StrCat("cannot rename ", from, " to ", to));
  }
  return absl::OkStatus();
}

// A name no other staging file of this process or an earlier one uses.
std::string UniqueName(const std::string& prefix) {
  static std::atomic<uint64_t> counter{0};
  return absl::StrCat(prefix, "-", getpid(), "-", absl::ToUnixNanos(absl::Now()), "-",
                      counter.fetch_add(1));
}

// What identifies the content of a bundle directory without reading it: every file's
// name, size and modification time. `newest`, when set, receives the latest of those times.
std::string Fingerprint(const std::string& dir, absl::Time* newest = nullptr) {
  std::error_code ec;
  std::vector<std::string> parts;
  if (newest != nullptr) *newest = absl::InfinitePast();
  for (const auto& entry : fs::directory_iterator(dir, ec)) {
    struct stat st;
    if (stat(entry.path().c_str(), &st) != 0) continue;
    parts.push_back(absl::StrCat(entry.path().filename().string(), ":", st.st_size, ":",
                                 st.st_mtim.tv_sec, ".", st.st_mtim.tv_nsec));
    if (newest != nullptr) *newest = std::max(*newest, absl::TimeFromTimespec(st.st_mtim));
  }
  std::sort(parts.begin(), parts.end());
  return absl::StrJoin(parts, "|");
}

bool IsPlainName(const std::string& s) {
  return !s.empty() && s != "." && s != ".." && s.find('/') == std::string::npos &&
         s.find('\0') == std::string::npos;
}

std::string Key(const std::string& name, const std::string& version) {
  return absl::StrCat(name, "@", version);
}

// A rejection counts against the version it names (shown by status queries) only when the
// bundle is known to come from a trusted author: after the signature checked out.
bool AfterSignature(cds::v1::RejectReason reason) {
  switch (reason) {
    case cds::v1::EMPTY_BUNDLE:
    case cds::v1::MALFORMED_BUNDLE:
    case cds::v1::UNSIGNED:
    case cds::v1::UNKNOWN_KEY:
    case cds::v1::BAD_SIGNATURE:
      return false;
    default:
      return true;
  }
}

// The digest of a bundle's rule-set files (MANIFEST and signature excluded), as the
// compiler computes it, without compiling them.
std::string BundleDigest(cds::v1::Bundle bundle) {
  std::vector<compiler::SourceFile> files;
  files.reserve(bundle.files_size());
  for (cds::v1::BundleFile& file : *bundle.mutable_files()) {
    files.push_back({file.path(), std::move(*file.mutable_content())});
  }
  return compiler::DigestFiles(files);
}

// The RuleSetInfo fields that come from the compiled rule set itself.
void AddRuleSetFields(const compiler::CompiledRuleSet& rs, RuleSetInfo* info) {
  const cds::v1::RuleSetMetadata& metadata = rs.definition.metadata();
  info->mutable_ref()->set_ontology(metadata.ontology());
  info->set_title(metadata.title());
  info->set_description(metadata.description());
  for (const std::string& author : metadata.authors()) info->add_authors(author);
  info->set_effective_date(metadata.effective_date());
  info->set_hypothesis_count(static_cast<int32_t>(rs.hypotheses.size()));
  info->set_action_count(static_cast<int32_t>(rs.actions.size()));
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


bool IsValidLabel(const std::string& label) {
  if (label.empty() || label.size() > 32 || !absl::ascii_islower(label[0])) return false;
  return std::all_of(label.begin(), label.end(), [](char c) {
    return absl::ascii_islower(c) || absl::ascii_isdigit(c) || c == '_' || c == '-';
  });
}

RuleStore::RuleStore(Options options) : options_(std::move(options)) {
  if (options_.allow_unsigned) {
    log::Warning("WARNING: --allow_unsigned: rule-set bundles WITHOUT a signature are accepted. "
                 "Development only: never run a production server like this.");
  }
}

void RuleStore::Hook(absl::string_view step) const {
  if (options_.persistence_hook) options_.persistence_hook(step);
}

void RuleStore::Changed() const {
  if (options_.on_change) options_.on_change(AvailableCount());
}

void RuleStore::ReloadKeys() {
  if (options_.trusted_keys_dir.empty()) return;
  // Parsing the keys (OpenSSL's PEM decoders) cost a publish more than verifying its
  // signature: they are parsed again only when a file in the directory was added, removed
  // or changed (name, size, modification time), as the rules-directory scan decides. File
  // times are coarse (a clock tick): a directory changed within a second of being read
  // could change again unseen with the same times, so it is read again next time.
  absl::Time newest;
  const std::string fingerprint = Fingerprint(options_.trusted_keys_dir, &newest);
  if (keys_settled_ && fingerprint == keys_fingerprint_) return;
  const bool settled = absl::Now() - newest > absl::Seconds(1);
  absl::StatusOr<bundle::TrustedKeys> keys =
      bundle::TrustedKeys::LoadDirectory(options_.trusted_keys_dir);
  if (!keys.ok()) {
    log::Error("cannot load trusted keys, keeping the previous ones: ", keys.status().message());
    return;
  }
  if (keys->KeyIds() != keys_.KeyIds()) {
    log::Info("trusted keys from ", options_.trusted_keys_dir, ": ",
              keys->size() == 0 ? "none" : absl::StrJoin(keys->KeyIds(), ", "));
  }
  keys_ = *std::move(keys);
  keys_fingerprint_ = fingerprint;
  keys_settled_ = settled;
}

void RuleStore::CompileAndTest(const compiler::RuleSetSource& source, Candidate* c) const {
  VersionEntry& entry = c->entry;
  compiles_.fetch_add(1, std::memory_order_relaxed);
  absl::Time start = absl::Now();
  compiler::CompileResult compiled = compiler::Compile(source);
  c->compile_time = absl::Now() - start;
  if (!compiled.ok()) {
    entry.digest = compiler::DigestFiles(source.files);
    std::vector<std::string> errors;
    for (const compiler::Issue& issue : compiled.issues) {
      if (issue.severity == compiler::Issue::Severity::kError) errors.push_back(issue.ToString());
    }
    c->rejection = bundle::Rejection{
        cds::v1::COMPILE_ERROR,
        absl::StrCat("does not compile (", errors.size(), errors.size() == 1 ? " error" : " errors",
                     "):\n", FirstLines(errors))};
    return;
  }
  entry.name = compiled.rule_set->name;
  entry.version = compiled.rule_set->version;
  entry.digest = compiled.rule_set->digest;
  start = absl::Now();
  const std::vector<engine::CaseResult> results =
      engine::RunCases(*compiled.rule_set, compiled.rule_set->tests);
  c->cases_time = absl::Now() - start;
  std::vector<std::string> failures;
  for (const engine::CaseResult& result : results) {
    if (result.passed) continue;
    failures.push_back(absl::StrCat("case '", result.name, "' failed: ",
                                    absl::StrJoin(result.failures, "; ")));
  }
  if (!failures.empty()) {
    c->rejection = bundle::Rejection{
        cds::v1::FAILING_TEST, absl::StrCat(failures.size(), " of ", results.size(),
                                            " embedded test cases failed:\n", FirstLines(failures))};
    return;
  }
  entry.rule_set = compiled.rule_set;
  // A version whose metadata says RETIRED is listed (for audit) but never served.
  entry.state = compiled.rule_set->definition.metadata().status() == cds::v1::RuleSetMetadata::RETIRED
                    ? RuleSetInfo::RETIRED
                    : RuleSetInfo::AVAILABLE;
}

RuleStore::Candidate RuleStore::Gate(const cds::v1::Bundle& bundle,
                                     const bundle::VerifyOptions& verify,
                                     const std::string& origin, const std::string& source_dir,
                                     const std::string& ontology_dir,
                                     const std::function<void()>& on_verified) {
  Candidate c;
  c.entry.name = verify.expected_name;
  c.entry.version = verify.expected_version;
  c.entry.origin = origin;
  c.entry.source_dir = source_dir;
  c.entry.loaded_at = absl::Now();
  const absl::Time verify_start = absl::Now();
  c.rejection = bundle::VerifyBundle(bundle, keys_, verify, &c.verified);
  c.verify_time = absl::Now() - verify_start;
  if (c.entry.name.empty()) c.entry.name = c.verified.manifest.name();
  if (c.entry.version.empty()) c.entry.version = c.verified.manifest.version();
  if (c.rejection.has_value()) {
    c.signature_checked = AfterSignature(c.rejection->reason);
    return c;
  }
  c.signature_checked = true;
  c.entry.signer = c.verified.signer;
  const bool has_manifest = !bundle.manifest().empty();
  if (on_verified) on_verified();

  compiler::RuleSetSource source;
  source.files = std::move(c.verified.files);  // not needed after the compile
  if (!has_manifest) {
    // Unsigned (development): the directory layout is all that names the version.
    source.expected_name = verify.expected_name;
    source.expected_version = verify.expected_version;
  }
  source.ontology_provider = [ontology_dir](const std::string& release) {
    return compiler::LoadOntologyCached(ontology_dir, release);
  };
  CompileAndTest(source, &c);
  if (c.rejection.has_value()) return c;
  if (has_manifest && (c.entry.name != c.verified.manifest.name() ||
                       c.entry.version != c.verified.manifest.version())) {
    c.rejection = bundle::Rejection{
        cds::v1::MANIFEST_MISMATCH,
        absl::StrCat("the manifest names ", Echo(c.verified.manifest.name()), "@",
                     Echo(c.verified.manifest.version()), " but ruleset.textproto is ",
                     c.entry.name, "@", c.entry.version)};
    c.entry.rule_set = nullptr;
    c.entry.state = RuleSetInfo::LOADING;
  }
  if (c.entry.signer.empty()) {
    log::Warning("WARNING: rule set ", c.entry.name, "@", c.entry.version,
                 " is UNSIGNED and accepted only because of --allow_unsigned");
  }
  return c;
}

std::optional<bundle::Rejection> RuleStore::Insert(Candidate c, bool* created) {
  *created = false;
  VersionEntry& entry = c.entry;
  const std::string label = Key(entry.name, entry.version);
  if (c.rejection.has_value()) {
    entry.state = RuleSetInfo::REJECTED;
    entry.reject_reason = c.rejection->reason;
    entry.reason = CapReason(c.rejection->ToString());
    entry.rule_set = nullptr;
    log::Error("rule set ", label, " REJECTED (not served) ", entry.origin, " ", entry.source_dir,
               ": ", OneLine(entry.reason));
    const bool record = c.signature_checked || entry.origin != kOriginPublished;
    if (record && !entry.name.empty() && !entry.version.empty()) {
      absl::MutexLock lock(&mu_);
      auto& versions = entries_[entry.name];
      auto it = versions.find(entry.version);
      if (it == versions.end() ||
          ((it->second.state == RuleSetInfo::REJECTED ||
            it->second.state == RuleSetInfo::LOADING) &&
           !ConflictLocked(label, entry.digest).has_value())) {
        versions[entry.version] = std::move(entry);
      } else {
        // Loaded, or REJECTED with content that differs from what was once accepted.
        log::Error("rule set ", label, ": the existing record of this version is kept (",
                   RuleSetInfo::State_Name(it->second.state), ")");
      }
    }
    return c.rejection;
  }
  {
    absl::MutexLock lock(&mu_);
    auto& versions = entries_[entry.name];
    if (std::optional<bundle::Rejection> conflict = ConflictLocked(label, entry.digest)) {
      log::Error("rule set ", label, " REJECTED (not served) ", entry.origin, ": ",
                 conflict->ToString());
      return conflict;
    }
    auto it = versions.find(entry.version);
    if (it != versions.end() && (it->second.state == RuleSetInfo::AVAILABLE ||
                                 it->second.state == RuleSetInfo::RETIRED ||
                                 it->second.state == RuleSetInfo::UNLOADED)) {
      return std::nullopt;  // same content: no-op
    }
    if (retired_.count(label) > 0 && entry.state == RuleSetInfo::AVAILABLE) {
      entry.state = RuleSetInfo::RETIRED;
    }
    if (entry.state == RuleSetInfo::AVAILABLE) {
      log::Info("rule set ", label, " AVAILABLE digest=", entry.digest,
                " signer=", entry.signer.empty() ? "UNSIGNED" : entry.signer,
                " hypotheses=", entry.rule_set->hypotheses.size(),
                " actions=", entry.rule_set->actions.size(),
                " cases=", entry.rule_set->tests.cases_size(), " origin=", entry.origin,
                " dir=", entry.source_dir);
    } else {
      log::Info("rule set ", label, " RETIRED (not served) digest=", entry.digest);
    }
    accepted_digests_.emplace(label, entry.digest);
    versions[entry.version] = std::move(entry);
    *created = true;
  }
  Changed();
  return std::nullopt;
}

std::optional<bundle::Rejection> RuleStore::ConflictLocked(const std::string& key,
                                                          const std::string& digest) const {
  auto known = accepted_digests_.find(key);
  if (known == accepted_digests_.end() || known->second == digest) return std::nullopt;
  return bundle::Rejection{
      cds::v1::VERSION_CONFLICT,
      absl::StrCat(key, " already exists with other content (", known->second, "; this bundle is ",
                   digest, "): a published version is never edited, publish a new version")};
}

RuleSetInfo::State RuleStore::AddVersion(const compiler::RuleSetSource& source,
                                         const std::string& source_dir) {
  absl::MutexLock writer(&writer_mu_);
  Candidate c;
  c.entry.name = source.expected_name;
  c.entry.version = source.expected_version;
  c.entry.origin = "memory";
  c.entry.source_dir = source_dir;
  c.entry.loaded_at = absl::Now();
  c.signature_checked = true;
  CompileAndTest(source, &c);
  if (c.entry.name.empty()) c.entry.name = "(unnamed)";
  if (c.entry.version.empty()) c.entry.version = "(unversioned)";
  const RuleSetInfo::State state = c.rejection.has_value() ? RuleSetInfo::REJECTED : c.entry.state;
  bool created = false;
  std::optional<bundle::Rejection> rejection = Insert(std::move(c), &created);
  return rejection.has_value() ? RuleSetInfo::REJECTED : state;
}

absl::StatusOr<int> RuleStore::LoadFromDirectory(const std::string& root) {
  std::error_code ec;
  if (!fs::is_directory(root, ec)) {
    return absl::NotFoundError(
        absl::StrCat("cannot read rules directory '", root, "': not a directory"));
  }
  {
    absl::MutexLock writer(&writer_mu_);
    rules_root_ = root;
    ReloadKeys();
    ScanLocked(root, /*startup=*/true);
  }
  return AvailableCount();
}

int RuleStore::ScanRulesDir() {
  absl::MutexLock writer(&writer_mu_);
  if (rules_root_.empty()) return 0;
  ReloadKeys();
  const int added = ScanLocked(rules_root_, /*startup=*/false);
  ApplyRetention();
  return added;
}

int RuleStore::ScanLocked(const std::string& root, bool startup) {
  absl::StatusOr<std::vector<std::string>> dirs = compiler::FindRuleSetDirs(root);
  if (!dirs.ok()) {
    log::Error("cannot scan rules directory ", root, ": ", dirs.status().message());
    return 0;
  }
  if (startup && dirs->empty()) log::Warning("no rule sets found under ", root);
  const std::string ontology_dir = (fs::path(root) / "ontology").string();
  int added = 0;
  for (const std::string& dir : *dirs) {
    auto [name, version] = NameAndVersionFromDir(dir);
    {
      absl::ReaderMutexLock lock(&mu_);
      if (AvailableLocked(name, version) != nullptr) continue;
      auto by_name = entries_.find(name);
      if (by_name != entries_.end()) {
        auto it = by_name->second.find(version);
        if (it != by_name->second.end() && (it->second.state == RuleSetInfo::RETIRED ||
                                            it->second.state == RuleSetInfo::UNLOADED)) {
          continue;
        }
      }
    }
    std::error_code ec;
    if (!startup && !options_.allow_unsigned &&
        !fs::exists(fs::path(dir) / bundle::kSignatureFile, ec)) {
      continue;  // still being copied: MANIFEST.sig comes last
    }
    const std::string fingerprint = Fingerprint(dir);
    if (auto seen = scanned_.find(dir); seen != scanned_.end() && seen->second == fingerprint) {
      continue;  // already gated in this state
    }
    scanned_[dir] = fingerprint;
    bool created = false;
    Insert(GateDir(name, version, dir, kOriginRulesDir, ontology_dir), &created);
    if (created) {
      absl::ReaderMutexLock lock(&mu_);
      added += AvailableLocked(name, version) != nullptr ? 1 : 0;
    }
  }
  return added;
}

RuleStore::Candidate RuleStore::GateDir(const std::string& name, const std::string& version,
                                        const std::string& dir, const std::string& origin,
                                        const std::string& ontology_dir) {
  Candidate c;
  absl::StatusOr<cds::v1::Bundle> read = bundle::ReadBundleDir(dir);
  if (!read.ok()) {
    c.entry.name = name;
    c.entry.version = version;
    c.entry.origin = origin;
    c.entry.source_dir = dir;
    c.entry.loaded_at = absl::Now();
    c.rejection = bundle::Rejection{cds::v1::MALFORMED_BUNDLE,
                                    absl::StrCat("cannot read: ", read.status().message())};
  } else {
    bundle::VerifyOptions verify;
    verify.allow_unsigned = options_.allow_unsigned;
    verify.expected_name = name;
    verify.expected_version = version;
    c = Gate(*read, verify, origin, dir, ontology_dir);
    // Refused before the compile computed it: the digest of the files as they are.
    if (c.rejection.has_value() && c.entry.digest.empty()) {
      c.entry.digest = BundleDigest(*std::move(read));
    }
  }
  c.signature_checked = true;  // a bundle we hold: show the outcome whatever it is
  return c;
}

bool RuleStore::AddNotLoaded(const std::string& name, const std::string& version,
                             const std::string& dir) {
  absl::StatusOr<cds::v1::Bundle> read = bundle::ReadBundleDir(dir);
  if (!read.ok()) {
    log::Error("cannot read published bundle ", dir, ": ", read.status().message());
    return false;
  }
  VersionEntry entry;
  entry.name = name;
  entry.version = version;
  // What the gate would check first is not checked here: the digest of whatever the
  // directory holds. Loading the version (SetLabel) verifies that the signed files have
  // this same digest.
  entry.digest = BundleDigest(*std::move(read));
  accepted_digests_.emplace(Key(name, version), entry.digest);
  entry.origin = kOriginPublished;
  entry.source_dir = dir;
  entry.loaded_at = absl::InfinitePast();  // never loaded by this process
  entry.state =
      retired_.count(Key(name, version)) > 0 ? RuleSetInfo::RETIRED : RuleSetInfo::UNLOADED;
  absl::MutexLock lock(&mu_);
  entries_[name][version] = std::move(entry);
  return true;
}

absl::StatusOr<int> RuleStore::RestoreState() {
  absl::MutexLock writer(&writer_mu_);
  if (options_.state_dir.empty()) {
    ApplyRetention();
    return AvailableCount();
  }
  ReloadKeys();
  const fs::path state_dir(options_.state_dir);
  std::error_code ec;
  fs::create_directories(state_dir / kBundlesDir, ec);
  fs::create_directories(state_dir / kTmpDir, ec);
  if (ec) {
    return absl::UnavailableError(
        absl::StrCat("cannot create state directory ", state_dir.string(), ": ", ec.message()));
  }
  // Whatever is under tmp/ is an unfinished publish or label change: never part of the state.
  int removed = 0;
  for (const auto& entry : fs::directory_iterator(state_dir / kTmpDir, ec)) {
    std::error_code ignored;
    fs::remove_all(entry.path(), ignored);
    ++removed;
  }
  if (removed > 0) log::Warning("removed ", removed, " unfinished temporaries from ", state_dir.string(), "/tmp");

  // Labels and retirements first: the retention policy decides from them (and from the
  // versions' directory names) which bundles to load at all.
  cds::v1::ServerState state;
  const std::string state_path = (state_dir / kStateFile).string();
  if (fs::exists(state_path, ec)) {
    std::ifstream in(state_path, std::ios::binary);
    std::ostringstream text;
    text << in.rdbuf();
    if (!in || !google::protobuf::TextFormat::ParseFromString(text.str(), &state)) {
      return absl::DataLossError(absl::StrCat("cannot parse ", state_path));
    }
  }
  std::map<std::string, std::set<std::string>> labelled;
  for (const cds::v1::ServerState::Label& l : state.labels()) labelled[l.name()].insert(l.version());
  {
    absl::MutexLock lock(&mu_);
    for (const std::string& key : state.retired()) {
      retired_.insert(key);
      // Versions from the rules directory are already loaded.
      const size_t at = key.rfind('@');
      if (at == std::string::npos) continue;
      auto by_name = entries_.find(key.substr(0, at));
      if (by_name == entries_.end()) continue;
      auto it = by_name->second.find(key.substr(at + 1));
      if (it != by_name->second.end() && it->second.state == RuleSetInfo::AVAILABLE) {
        it->second.state = RuleSetInfo::RETIRED;
      }
    }
  }

  // Published bundles, per rule set: name -> version -> directory.
  std::map<std::string, std::map<std::string, std::string>> persisted;
  for (const auto& name_dir : fs::directory_iterator(state_dir / kBundlesDir, ec)) {
    if (!name_dir.is_directory()) continue;
    std::error_code inner;
    for (const auto& version_dir : fs::directory_iterator(name_dir.path(), inner)) {
      if (!version_dir.is_directory()) continue;
      auto [name, version] = NameAndVersionFromDir(version_dir.path().string());
      persisted[name][version] = version_dir.path().string();
    }
  }
  // The retention policy (ApplyRetention) as it would decide with every bundle loaded,
  // walking each rule set's versions from the highest: a labelled version is loaded; a
  // RETIRED one while fewer than keep_versions loaded versions are above it; any other
  // while fewer than keep_versions AVAILABLE ones are. A bundle that fails the gate does
  // not count, so the next lower one is loaded in its place, as before. The rest are only
  // listed. ApplyRetention below settles anything this walk did not foresee.
  const size_t keep_newest = static_cast<size_t>(std::max(options_.keep_versions, 0));
  int gated = 0, listed = 0;
  for (const auto& [name, dirs] : persisted) {
    std::vector<std::string> versions;
    {
      absl::ReaderMutexLock lock(&mu_);
      for (const auto& [version, unused] : dirs) versions.push_back(version);
      if (auto by_name = entries_.find(name); by_name != entries_.end()) {
        for (const auto& [version, unused] : by_name->second) {
          if (dirs.count(version) == 0) versions.push_back(version);
        }
      }
    }
    std::sort(versions.begin(), versions.end(), [](const std::string& a, const std::string& b) {
      return SemverLess(b, a);  // highest first
    });
    size_t rank = 0, available_rank = 0;
    for (const std::string& version : versions) {
      const auto dir = dirs.find(version);
      bool loaded_already = false;  // from the rules directory
      {
        absl::ReaderMutexLock lock(&mu_);
        if (auto by_name = entries_.find(name); by_name != entries_.end()) {
          auto it = by_name->second.find(version);
          loaded_already = it != by_name->second.end() && it->second.rule_set != nullptr;
        }
      }
      std::optional<RuleSetInfo::State> state_now;
      if (dir != dirs.end()) {
        const bool retired = retired_.count(Key(name, version)) > 0;
        const bool keep = keep_newest == 0 || loaded_already ||
                          labelled[name].count(version) > 0 ||
                          (retired ? rank < keep_newest : available_rank < keep_newest);
        if (keep) {
          // Loaded from the rules directory too: the same content is a no-op, other content
          // is logged as a conflict (the loaded version stays). It passed the gate when it
          // was published: its content stays the version's even if it no longer does.
          Candidate c =
              GateDir(name, version, dir->second, kOriginPublished, options_.ontology_dir);
          if (!c.entry.digest.empty()) {
            accepted_digests_.emplace(Key(name, version), c.entry.digest);
          }
          bool created = false;
          Insert(std::move(c), &created);
          ++gated;
        } else if (AddNotLoaded(name, version, dir->second)) {
          ++listed;
          // Counted as it would be if it passed the gate (it is below the ones kept anyway).
          state_now = retired ? RuleSetInfo::RETIRED : RuleSetInfo::AVAILABLE;
        }
      }
      if (!state_now.has_value()) {
        absl::ReaderMutexLock lock(&mu_);
        auto by_name = entries_.find(name);
        if (by_name == entries_.end()) continue;
        auto it = by_name->second.find(version);
        if (it == by_name->second.end()) continue;
        state_now = it->second.state;
      }
      if (*state_now == RuleSetInfo::AVAILABLE) ++available_rank;
      if (*state_now == RuleSetInfo::AVAILABLE || *state_now == RuleSetInfo::RETIRED) ++rank;
    }
  }
  if (listed > 0) {
    log::Info("restored ", gated + listed, " published versions: ", gated, " gated, ", listed,
              " listed without loading them (retention policy, --keep_versions ",
              options_.keep_versions, ")");
  }

  {
    absl::MutexLock lock(&mu_);
    for (const cds::v1::ServerState::Label& l : state.labels()) {
      if (AvailableLocked(l.name(), l.version()) == nullptr) {
        log::Warning("label ", l.name(), "@", l.label(), " points at ", l.version(),
                     ", which is not available: label dropped");
        continue;
      }
      labels_[l.name()][l.label()] = l.version();
      log::Info("label ", l.name(), "@", l.label(), " -> ", l.version());
    }
  }
  // Only now that the labels are known (a labelled version is always kept).
  ApplyRetention();
  Changed();
  return AvailableCount();
}

absl::StatusOr<std::string> RuleStore::StageBundle(const cds::v1::Bundle& bundle) const {
  const fs::path state_dir(options_.state_dir);
  const std::string tmp_dir = (state_dir / kTmpDir).string();
  const std::string staging = (fs::path(tmp_dir) / UniqueName("bundle")).string();
  std::error_code ec;
  fs::create_directories(tmp_dir, ec);
  if (ec || mkdir(staging.c_str(), 0755) != 0) {
    return absl::InternalError(absl::StrCat("cannot create ", staging));
  }
  // The files VerifyBundle accepted (each listed once, plain names, hashes checked).
  DurableFiles files;
  bool first = true;
  for (const cds::v1::BundleFile& file : bundle.files()) {
    CDS_RETURN_IF_ERROR(files.Write(staging + "/" + file.path(), file.content()));
    if (first) Hook("bundle_file_written");
    first = false;
  }
  // The exact manifest and signature bytes (signature last), so the bundle re-verifies.
  if (!bundle.manifest().empty()) {
    CDS_RETURN_IF_ERROR(files.Write(staging + "/" + bundle::kManifestFile, bundle.manifest()));
  }
  if (!bundle.signature().empty()) {
    CDS_RETURN_IF_ERROR(files.Write(staging + "/" + bundle::kSignatureFile, bundle.signature()));
  }
  // Each file's data, then the staging directory's entries. Nothing under tmp/ needs to
  // survive a crash (RestoreState removes it): tmp/ itself is never fsynced.
  CDS_RETURN_IF_ERROR(files.Sync());
  CDS_RETURN_IF_ERROR(SyncDir(staging));
  Hook("bundle_staged");
  return staging;
}

absl::Status RuleStore::CommitBundle(const std::string& staging, const Candidate& c) {
  const fs::path state_dir(options_.state_dir);
  const fs::path parent = state_dir / kBundlesDir / c.entry.name;
  const fs::path final_dir = parent / c.entry.version;
  std::error_code ec;
  // bundles/<name>/ is created (and its entry made durable) once per rule set.
  if (!fs::is_directory(parent, ec)) {
    fs::create_directories(parent, ec);
    if (ec) return absl::InternalError(absl::StrCat("cannot create ", parent.string()));
    CDS_RETURN_IF_ERROR(SyncDir((state_dir / kBundlesDir).string()));
  }
  std::string displaced;
  if (fs::exists(final_dir, ec)) {
    // A directory left by a version that was rejected (e.g. its key is no longer
    // trusted): moved aside first, then dropped.
    displaced = (state_dir / kTmpDir / UniqueName("displaced")).string();
    CDS_RETURN_IF_ERROR(Rename(final_dir.string(), displaced));
  }
  CDS_RETURN_IF_ERROR(Rename(staging, final_dir.string()));
  CDS_RETURN_IF_ERROR(SyncDir(parent.string()));
  if (!displaced.empty()) fs::remove_all(displaced, ec);
  Hook("bundle_renamed");
  return absl::OkStatus();
}

cds::v1::ServerState RuleStore::CurrentState() const {
  cds::v1::ServerState state;
  absl::ReaderMutexLock lock(&mu_);
  for (const auto& [name, labels] : labels_) {
    for (const auto& [label, version] : labels) {
      cds::v1::ServerState::Label* l = state.add_labels();
      l->set_name(name);
      l->set_label(label);
      l->set_version(version);
    }
  }
  for (const std::string& key : retired_) state.add_retired(key);
  return state;
}

absl::Status RuleStore::PersistState(const cds::v1::ServerState& state) {
  std::string text;
  google::protobuf::TextFormat::PrintToString(state, &text);
  text = absl::StrCat("# cds-server state: labels and retired versions (written atomically)\n",
                      text);
  const fs::path state_dir(options_.state_dir);
  const std::string tmp_dir = (state_dir / kTmpDir).string();
  std::error_code ec;
  fs::create_directories(tmp_dir, ec);
  const std::string staged = (fs::path(tmp_dir) / UniqueName("STATE")).string();
  CDS_RETURN_IF_ERROR(WriteFileDurably(staged, text));
  Hook("state_staged");
  CDS_RETURN_IF_ERROR(Rename(staged, (state_dir / kStateFile).string()));
  // The rename's new entry; what it took from tmp/ needs no fsync (see PersistBundle).
  CDS_RETURN_IF_ERROR(SyncDir(state_dir.string()));
  return absl::OkStatus();
}

absl::StatusOr<PublishResult> RuleStore::PublishBytes(const std::string& bytes) {
  if (bytes.empty()) {
    return bundle::RejectionStatus({cds::v1::EMPTY_BUNDLE, "no bundle bytes"});
  }
  cds::v1::Bundle bundle;
  if (!bundle.ParseFromString(bytes)) {
    return bundle::RejectionStatus(
        {cds::v1::MALFORMED_BUNDLE, "the bytes are not a serialized cds.v1.Bundle"});
  }
  return Publish(bundle);
}

absl::StatusOr<PublishResult> RuleStore::Publish(const cds::v1::Bundle& bundle) {
  absl::MutexLock writer(&writer_mu_);
  return PublishLocked(bundle);
}

absl::StatusOr<PublishResult> RuleStore::PublishLocked(const cds::v1::Bundle& bundle) {
  if (options_.state_dir.empty()) {
    return absl::FailedPreconditionError(
        "publishing needs a state directory: start cds-server with --state_dir");
  }
  ReloadKeys();
  bundle::VerifyOptions verify;
  verify.allow_unsigned = options_.allow_unsigned;
  // Once the signature and hashes check out, a second thread stages the bundle under tmp/
  // (writes and fsyncs it) while this one compiles and runs the cases: the disk's waits
  // overlap the CPU work instead of following it. Nothing staged is committed (renamed
  // into bundles/) unless the whole gate passes; otherwise it is removed.
  std::thread stager;
  absl::StatusOr<std::string> staging = absl::UnknownError("not staged");
  absl::Duration stage_time;
  Candidate c = Gate(bundle, verify, kOriginPublished, "", options_.ontology_dir, [&] {
    stager = std::thread([this, &bundle, &staging, &stage_time] {
      const absl::Time start = absl::Now();
      staging = StageBundle(bundle);
      stage_time = absl::Now() - start;
    });
  });
  const absl::Time stage_wait_start = absl::Now();
  if (stager.joinable()) stager.join();
  const absl::Duration stage_wait = absl::Now() - stage_wait_start;
  // Removes the staged copy of a bundle that is not committed.
  auto drop_staged = [&staging] {
    std::error_code ec;
    if (staging.ok()) fs::remove_all(*staging, ec);
  };
  if (!c.rejection.has_value()) {
    // Same version already there: identical content is a no-op, other content a conflict,
    // also when the version was accepted once and is REJECTED now (checked before
    // anything is committed, so its bundle is not replaced).
    c.rejection = ConflictLocked(Key(c.entry.name, c.entry.version), c.entry.digest);
    if (c.rejection.has_value()) c.signature_checked = false;  // leave the existing entry alone
  }
  if (!c.rejection.has_value()) {
    absl::ReaderMutexLock lock(&mu_);
    auto by_name = entries_.find(c.entry.name);
    if (by_name != entries_.end()) {
      auto it = by_name->second.find(c.entry.version);
      if (it != by_name->second.end() && (it->second.state == RuleSetInfo::AVAILABLE ||
                                          it->second.state == RuleSetInfo::RETIRED ||
                                          it->second.state == RuleSetInfo::UNLOADED)) {
        drop_staged();
        return PublishResult{InfoLocked(it->second), false};
      }
    }
  }
  if (!c.rejection.has_value() && (!IsPlainName(c.entry.name) || !IsPlainName(c.entry.version))) {
    // The compiler allows only identifiers and semantic versions; they become paths here.
    c.rejection = bundle::Rejection{cds::v1::MALFORMED_BUNDLE, "invalid rule-set name or version"};
  }
  if (c.rejection.has_value()) {
    drop_staged();
    const bundle::Rejection rejection = *c.rejection;
    bool created = false;
    Insert(std::move(c), &created);
    return bundle::RejectionStatus(rejection);
  }
  if (!staging.ok()) {
    drop_staged();
    return staging.status();
  }
  c.entry.source_dir =
      (fs::path(options_.state_dir) / kBundlesDir / c.entry.name / c.entry.version).string();
  const absl::Time commit_start = absl::Now();
  if (absl::Status committed = CommitBundle(*staging, c); !committed.ok()) {
    drop_staged();
    return committed;
  }
  const absl::Duration commit_time = absl::Now() - commit_start;
  const std::string name = c.entry.name, version = c.entry.version;
  auto ms = [](absl::Duration d) {
    return absl::StrFormat("%.1f ms", absl::ToDoubleMilliseconds(d));
  };
  const std::string timings = absl::StrCat(
      "verify ", ms(c.verify_time), ", compile ", ms(c.compile_time), ", cases ",
      ms(c.cases_time), ", stage ", ms(stage_time), " (beside the compile; waited ",
      ms(stage_wait), " for it), commit ", ms(commit_time));
  bool created = false;
  if (std::optional<bundle::Rejection> r = Insert(std::move(c), &created); r.has_value()) {
    return bundle::RejectionStatus(*r);
  }
  const absl::Time retention_start = absl::Now();
  ApplyRetention();
  log::Info("published ", name, "@", version, ": ", timings, ", retention ",
            ms(absl::Now() - retention_start));
  absl::ReaderMutexLock lock(&mu_);
  const VersionEntry& entry = entries_[name][version];
  return PublishResult{InfoLocked(entry), created};
}

absl::StatusOr<std::string> RuleStore::SetLabel(const std::string& name, const std::string& label,
                                                const std::string& version) {
  if (!IsValidLabel(label)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "label '", Echo(label), "' is invalid: a lower-case letter, then [a-z0-9_-], at most 32"));
  }
  absl::MutexLock writer(&writer_mu_);
  if (options_.state_dir.empty()) {
    return absl::FailedPreconditionError(
        "labels need a state directory: start cds-server with --state_dir");
  }
  // A rollback to a version the retention policy unloaded loads it again first (a label
  // is an explicit request to serve it; once labelled, retention keeps it).
  bool unloaded = false;
  {
    absl::ReaderMutexLock lock(&mu_);
    unloaded = UnloadedLocked(name, version);
  }
  const bool loaded_again = unloaded;
  if (unloaded) CDS_RETURN_IF_ERROR(LoadAgain(name, version));
  std::string previous;
  {
    absl::ReaderMutexLock lock(&mu_);
    if (AvailableLocked(name, version) == nullptr) {
      return absl::NotFoundError(absl::StrCat("version '", Echo(version), "' of rule set '",
                                              Echo(name), "' is not available"));
    }
    if (auto by_name = labels_.find(name); by_name != labels_.end()) {
      if (auto it = by_name->second.find(label); it != by_name->second.end()) previous = it->second;
    }
  }
  if (previous == version) return previous;
  cds::v1::ServerState state = CurrentState();
  bool replaced = false;
  for (cds::v1::ServerState::Label& l : *state.mutable_labels()) {
    if (l.name() == name && l.label() == label) {
      l.set_version(version);
      replaced = true;
    }
  }
  if (!replaced) {
    cds::v1::ServerState::Label* l = state.add_labels();
    l->set_name(name);
    l->set_label(label);
    l->set_version(version);
  }
  if (absl::Status persisted = PersistState(state); !persisted.ok()) {
    if (loaded_again) ApplyRetention();  // not labelled after all: unloaded again
    return persisted;
  }
  {
    absl::MutexLock lock(&mu_);
    labels_[name][label] = version;
  }
  log::Info("label ", name, "@", label, " -> ", version,
            previous.empty() ? "" : absl::StrCat(" (was ", previous, ")"));
  ApplyRetention();  // the version the label left may no longer be kept
  Changed();
  return previous;
}

absl::Status RuleStore::LoadAgain(const std::string& name, const std::string& version) {
  const std::string key = Key(name, version);
  std::string origin, dir, digest;
  std::shared_ptr<std::atomic<int64_t>> evaluations;
  {
    absl::ReaderMutexLock lock(&mu_);
    const VersionEntry& entry = entries_.at(name).at(version);  // UNLOADED: the caller checked
    origin = entry.origin;
    dir = entry.source_dir;
    digest = entry.digest;
    evaluations = entry.evaluations;
  }
  std::string ontology_dir;
  if (origin == kOriginPublished) {
    ontology_dir = options_.ontology_dir;
  } else if (origin == kOriginRulesDir && !rules_root_.empty()) {
    ontology_dir = (fs::path(rules_root_) / "ontology").string();
  } else {
    return absl::FailedPreconditionError(absl::StrCat(
        key, " was unloaded by the retention policy and has no bundle to load it from again"));
  }
  ReloadKeys();
  Candidate c = GateDir(name, version, dir, origin, ontology_dir);
  if (!c.rejection.has_value() && !digest.empty() && c.entry.digest != digest) {
    // Validly signed, but not the content this version had: a version is never edited.
    c.rejection = bundle::Rejection{
        cds::v1::VERSION_CONFLICT,
        absl::StrCat("the bundle of ", key, " now holds other content (",
                     c.entry.digest, "; the version was ", digest, ")")};
  }
  if (c.rejection.has_value()) {
    // Listed as a restart would list it, with the reason; the digest stays the version's.
    const bundle::Rejection rejection = *c.rejection;
    VersionEntry& entry = c.entry;
    entry.state = RuleSetInfo::REJECTED;
    entry.reject_reason = rejection.reason;
    entry.reason = CapReason(rejection.ToString());
    entry.rule_set = nullptr;
    if (!digest.empty()) entry.digest = digest;
    entry.evaluations = evaluations;
    log::Error("rule set ", key, " cannot be loaded again from ", dir, ": ", OneLine(entry.reason));
    {
      absl::MutexLock lock(&mu_);
      entries_[name][version] = std::move(entry);
    }
    Changed();
    return absl::FailedPreconditionError(absl::StrCat(
        key, " was unloaded by the retention policy and its bundle no longer passes the gate, "
        "so it cannot be served again: ", OneLine(rejection.ToString())));
  }
  c.entry.evaluations = std::move(evaluations);  // one count per version
  if (retired_.count(key) > 0 && c.entry.state == RuleSetInfo::AVAILABLE) {
    c.entry.state = RuleSetInfo::RETIRED;
  }
  log::Info("rule set ", key, " loaded again from ", dir, " (", RuleSetInfo::State_Name(c.entry.state),
            ") digest=", c.entry.digest, " signer=", c.entry.signer.empty() ? "UNSIGNED" : c.entry.signer);
  {
    absl::MutexLock lock(&mu_);
    entries_[name][version] = std::move(c.entry);
  }
  Changed();
  return absl::OkStatus();
}

absl::StatusOr<RuleSetInfo> RuleStore::Retire(const std::string& name, const std::string& version) {
  absl::MutexLock writer(&writer_mu_);
  if (options_.state_dir.empty()) {
    return absl::FailedPreconditionError(
        "retiring needs a state directory: start cds-server with --state_dir");
  }
  {
    absl::ReaderMutexLock lock(&mu_);
    const VersionEntry* const found = EntryLocked(name, version);
    // Already retired: the same answer again, so a client may retry a call whose response
    // it lost.
    if (found != nullptr && found->state == RuleSetInfo::RETIRED) return InfoLocked(*found);
    if (found != nullptr && found->state == RuleSetInfo::REJECTED) {
      return absl::FailedPreconditionError(
          absl::StrCat(name, "@", version, " is REJECTED (not served): nothing to retire"));
    }
    // An UNLOADED version is retired without loading it (a restart lists it so as well).
    const bool unloaded = found != nullptr && found->state == RuleSetInfo::UNLOADED;
    if (!unloaded && (found == nullptr || found->state != RuleSetInfo::AVAILABLE)) {
      return absl::NotFoundError(absl::StrCat("version '", Echo(version), "' of rule set '",
                                              Echo(name), "' is not available"));
    }
    if (auto by_name = labels_.find(name); by_name != labels_.end()) {
      for (const auto& [label, target] : by_name->second) {
        if (target == version) {
          return absl::FailedPreconditionError(
              absl::StrCat("label '", label, "' points at ", name, "@", version,
                           ": move it to another version first"));
        }
      }
    }
    // Retention cannot bring an unloaded version back: never leave the rule set unserved.
    int available = 0;
    bool any_unloaded = false;
    for (const auto& [unused, entry] : entries_.find(name)->second) {
      available += entry.state == RuleSetInfo::AVAILABLE;
      any_unloaded |= entry.state == RuleSetInfo::UNLOADED;
    }
    if (!unloaded && available == 1 && any_unloaded) {
      return absl::FailedPreconditionError(absl::StrCat(
          name, "@", version, " is the only version of ", name,
          " still served (older ones were unloaded by the retention policy): publish "
          "another version first"));
    }
  }
  cds::v1::ServerState state = CurrentState();
  state.add_retired(Key(name, version));
  CDS_RETURN_IF_ERROR(PersistState(state));
  retired_.insert(Key(name, version));
  RuleSetInfo info;
  {
    absl::MutexLock lock(&mu_);
    VersionEntry& entry = entries_[name][version];
    entry.state = RuleSetInfo::RETIRED;
    info = InfoLocked(entry);
  }
  log::Info("rule set ", name, "@", version, " RETIRED (no longer served)");
  ApplyRetention();
  Changed();
  return info;
}

const VersionEntry* RuleStore::EntryLocked(const std::string& name,
                                           const std::string& version) const {
  auto by_name = entries_.find(name);
  if (by_name == entries_.end()) return nullptr;
  auto it = by_name->second.find(version);
  return it == by_name->second.end() ? nullptr : &it->second;
}

const VersionEntry* RuleStore::AvailableLocked(const std::string& name,
                                               const std::string& version) const {
  const VersionEntry* entry = EntryLocked(name, version);
  return entry != nullptr && entry->state == RuleSetInfo::AVAILABLE ? entry : nullptr;
}

absl::StatusOr<Resolved> RuleStore::Resolve(const std::string& name, const std::string& version,
                                            const std::string& label) const {
  absl::ReaderMutexLock lock(&mu_);
  const VersionEntry* entry = nullptr;
  std::string via;
  if (!version.empty()) {
    entry = AvailableLocked(name, version);
  } else if (!label.empty()) {
    if (auto by_name = labels_.find(name); by_name != labels_.end()) {
      if (auto it = by_name->second.find(label); it != by_name->second.end()) {
        entry = AvailableLocked(name, it->second);
        via = label;
      }
    }
  } else {
    entry = DefaultLocked(name, &via);
  }
  if (entry != nullptr) return Resolved{entry->rule_set, entry->evaluations, via};

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
  if (!label.empty() && version.empty()) {
    return absl::NotFoundError(
        absl::StrCat("rule set '", Echo(name), "' has no label '", Echo(label), "'"));
  }
  if (version.empty()) {
    return absl::NotFoundError(
        absl::StrCat("rule set '", Echo(name), "' has no available version"));
  }
  return absl::NotFoundError(absl::StrCat("version '", Echo(version), "' of rule set '",
                                          Echo(name), "' is not available",
                                          UnloadedNoteLocked(name, version)));
}

bool RuleStore::UnloadedLocked(const std::string& name, const std::string& version) const {
  const VersionEntry* entry = EntryLocked(name, version);
  return entry != nullptr && entry->state == RuleSetInfo::UNLOADED;
}

std::string RuleStore::UnloadedNoteLocked(const std::string& name,
                                          const std::string& version) const {
  if (!UnloadedLocked(name, version)) return "";
  return absl::StrCat(" (unloaded by the retention policy: neither labelled nor among the ",
                      options_.keep_versions, " newest; labelling it loads it again)");
}

int RuleStore::ApplyRetention() {
  if (options_.keep_versions <= 0) return 0;
  const size_t keep_newest = static_cast<size_t>(options_.keep_versions);
  // Released after mu_ is dropped: freeing a rule set takes a while, and a call in flight
  // on one still holds its own reference anyway.
  std::vector<std::shared_ptr<const compiler::CompiledRuleSet>> released;
  std::vector<std::string> unloaded;
  {
    absl::MutexLock lock(&mu_);
    for (auto& [name, versions] : entries_) {
      std::vector<VersionEntry*> loaded;
      for (auto& [unused_version, entry] : versions) {
        if (entry.rule_set != nullptr) loaded.push_back(&entry);
      }
      if (loaded.size() <= keep_newest) continue;
      std::sort(loaded.begin(), loaded.end(), [](const VersionEntry* a, const VersionEntry* b) {
        return SemverLess(b->version, a->version);  // highest first
      });
      std::set<std::string> keep;
      if (auto labels = labels_.find(name); labels != labels_.end()) {
        for (const auto& [unused_label, version] : labels->second) keep.insert(version);
      }
      std::string unused_label;
      if (const VersionEntry* default_entry = DefaultLocked(name, &unused_label)) {
        keep.insert(default_entry->version);
      }
      // An AVAILABLE version stays among the N highest AVAILABLE ones (retired versions do
      // not push served ones out); a RETIRED one among the N highest loaded ones.
      size_t rank = 0, available_rank = 0;
      for (VersionEntry* entry : loaded) {
        const bool available = entry->state == RuleSetInfo::AVAILABLE;
        const bool newest = available ? available_rank < keep_newest : rank < keep_newest;
        ++rank;
        if (available) ++available_rank;
        if (newest || keep.count(entry->version) > 0) continue;
        auto summary = std::make_shared<RuleSetInfo>();
        AddRuleSetFields(*entry->rule_set, summary.get());
        entry->unloaded_summary = std::move(summary);
        released.push_back(std::move(entry->rule_set));
        entry->rule_set = nullptr;
        if (entry->state == RuleSetInfo::AVAILABLE) entry->state = RuleSetInfo::UNLOADED;
        unloaded.push_back(Key(name, entry->version));
      }
    }
  }
  released.clear();
  for (const std::string& key : unloaded) {
    log::Info("rule set ", key, " UNLOADED by the retention policy (not labelled, not the default, "
              "not among the ", keep_newest, " newest loaded)");
  }
  if (!unloaded.empty()) Changed();
  return static_cast<int>(unloaded.size());
}

std::vector<RuleSetInfo> RuleStore::List(const std::string& name) const {
  absl::ReaderMutexLock lock(&mu_);
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
  absl::ReaderMutexLock lock(&mu_);
  auto by_name = entries_.find(name);
  if (by_name == entries_.end()) {
    return absl::NotFoundError(absl::StrCat("rule set '", Echo(name), "' is not loaded"));
  }
  const VersionEntry* entry = nullptr;
  if (version.empty()) {
    std::string unused_label;
    entry = DefaultLocked(name, &unused_label);
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

int RuleStore::LoadedCount() const {
  absl::ReaderMutexLock lock(&mu_);
  int count = 0;
  for (const auto& [unused_name, versions] : entries_) {
    for (const auto& [unused_version, entry] : versions) count += entry.rule_set != nullptr;
  }
  return count;
}

int RuleStore::AvailableCount() const {
  absl::ReaderMutexLock lock(&mu_);
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
  info.set_reject_reason(entry.reject_reason);
  info.set_signer(entry.signer);
  info.set_origin(entry.origin);
  // Unset for a version listed at start-up without being loaded.
  if (entry.loaded_at != absl::InfinitePast()) SetTimestamp(entry.loaded_at, info.mutable_loaded_at());
  info.set_evaluation_count(entry.evaluations->load(std::memory_order_relaxed));
  std::string unused_label;
  info.set_is_default(DefaultLocked(entry.name, &unused_label) == &entry);
  if (auto by_name = labels_.find(entry.name); by_name != labels_.end()) {
    for (const auto& [label, version] : by_name->second) {
      if (version == entry.version) info.add_labels(label);
    }
  }
  if (entry.rule_set != nullptr) {
    AddRuleSetFields(*entry.rule_set, &info);
  } else if (entry.unloaded_summary != nullptr) {
    info.MergeFrom(*entry.unloaded_summary);
  }
  return info;
}

const VersionEntry* RuleStore::DefaultLocked(const std::string& name, std::string* label) const {
  label->clear();
  auto by_name = entries_.find(name);
  if (by_name == entries_.end()) return nullptr;
  if (auto labels = labels_.find(name); labels != labels_.end()) {
    if (auto it = labels->second.find(kDefaultLabel); it != labels->second.end()) {
      if (const VersionEntry* stable = AvailableLocked(name, it->second); stable != nullptr) {
        *label = kDefaultLabel;
        return stable;
      }
    }
  }
  const VersionEntry* best = nullptr;
  for (const auto& [version, entry] : by_name->second) {
    if (entry.state != RuleSetInfo::AVAILABLE) continue;
    if (best == nullptr || SemverLess(best->version, version)) best = &entry;
  }
  return best;
}

}  // namespace cds::store
