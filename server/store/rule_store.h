#pragma once

// The rule-set versions the server holds, and which one serves each request. Thread-safe.
//
// Versions are compiled and checked off the request path (LoadFromDirectory); a version
// that fails to compile or fails its embedded test cases is recorded as REJECTED with the
// reason and never served. Readers get a shared_ptr to an immutable CompiledRuleSet and
// evaluate without holding the lock; a replaced version is freed by its last reader.

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "cds/v1/service.pb.h"
#include "server/compiler/compiled_rule_set.h"
#include "server/compiler/compiler.h"

namespace cds::store {

// One loaded (or rejected) version.
struct VersionEntry {
  std::string name;
  std::string version;
  cds::v1::RuleSetInfo::State state = cds::v1::RuleSetInfo::LOADING;
  std::string reason;  // why REJECTED
  // "sha256:<hex>" of the source files; kept for rejected versions too, so status
  // queries say which content failed.
  std::string digest;
  std::string source_dir;
  absl::Time loaded_at;
  std::shared_ptr<const compiler::CompiledRuleSet> rule_set;  // null unless AVAILABLE
  // Shared so that counting an evaluation needs no store lock.
  std::shared_ptr<std::atomic<int64_t>> evaluations =
      std::make_shared<std::atomic<int64_t>>(0);
};

// What a request evaluates against.
struct Resolved {
  std::shared_ptr<const compiler::CompiledRuleSet> rule_set;
  std::shared_ptr<std::atomic<int64_t>> evaluations;
};

class RuleStore {
 public:
  RuleStore() = default;
  RuleStore(const RuleStore&) = delete;
  RuleStore& operator=(const RuleStore&) = delete;

  // Compiles, tests and adds one version. Returns the entry's final state; a rejected
  // version is kept (as REJECTED, with its reason) for status queries.
  cds::v1::RuleSetInfo::State AddVersion(const compiler::RuleSetSource& source,
                                         const std::string& source_dir) ABSL_LOCKS_EXCLUDED(mu_);

  // Loads every <root>/<name>/<version>/ directory. Returns the number of AVAILABLE
  // versions, or an error when the root cannot be read.
  absl::StatusOr<int> LoadFromDirectory(const std::string& root) ABSL_LOCKS_EXCLUDED(mu_);

  // The version to evaluate: `version` exactly, or the highest AVAILABLE semantic version
  // when empty. NOT_FOUND when there is no such AVAILABLE version; UNAVAILABLE when the
  // store has nothing available at all.
  absl::StatusOr<Resolved> Resolve(const std::string& name, const std::string& version) const
      ABSL_LOCKS_EXCLUDED(mu_);

  // Status of every version (filtered by name when non-empty), sorted by name and version.
  std::vector<cds::v1::RuleSetInfo> List(const std::string& name) const ABSL_LOCKS_EXCLUDED(mu_);

  // Status and definition of one version (empty version: the default).
  absl::StatusOr<cds::v1::GetRuleSetResponse> Get(const std::string& name,
                                                  const std::string& version) const
      ABSL_LOCKS_EXCLUDED(mu_);

  // Number of AVAILABLE versions.
  int AvailableCount() const ABSL_LOCKS_EXCLUDED(mu_);

 private:
  cds::v1::RuleSetInfo InfoLocked(const VersionEntry& entry) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  const VersionEntry* DefaultLocked(const std::string& name) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  mutable absl::Mutex mu_;
  // name -> version -> entry.
  std::map<std::string, std::map<std::string, VersionEntry>> entries_ ABSL_GUARDED_BY(mu_);
};

// Orders "MAJOR.MINOR.PATCH" semantically; non-semver strings sort lexically after.
bool SemverLess(const std::string& a, const std::string& b);

}  // namespace cds::store
