#pragma once

// The rule-set versions the server holds, their labels, and which version serves each
// request. Thread-safe.
//
// Every version passes one gate before it can serve (Gate in rule_store.cc): the bundle's
// signature and file hashes verify against the trusted keys (server/bundle), it compiles,
// and every embedded test case passes. A version that fails is recorded as REJECTED with
// a RejectReason and never served; versions already serving are never touched by it.
//
// Versions come from three places: the rules directory at start-up (LoadFromDirectory),
// complete bundles dropped into it later (ScanRulesDir, driven by the poller or SIGHUP),
// and PublishRuleSet (Publish). Published bundles, labels and retirements are persisted
// under Options::state_dir (see persistence in rule_store.cc) and restored by
// RestoreState, so a restart serves the same versions with the same labels.
//
// Readers (Resolve) take a shared_ptr to an immutable CompiledRuleSet under a reader lock
// and evaluate without any lock: a call in flight finishes on the version it started with,
// and a replaced version is freed by its last reader.
//
// Retention (Options::keep_versions, like TensorFlow Serving's "latest N" version policy):
// after every change, per rule set, the compiled versions kept in memory are those a label
// points at, the default one, the keep_versions highest AVAILABLE ones, and the RETIRED ones
// among the keep_versions highest loaded. Every other AVAILABLE version is UNLOADED (listed,
// no longer served) and a RETIRED one keeps its state; both drop their compiled rule set,
// which calls already in flight on it still hold (shared_ptr) until they finish. Bundles stay
// persisted, and an UNLOADED version is loaded again (through the whole gate, from its bundle)
// when a label is pointed at it (SetLabel). A restart decides the policy before gating anything
// (from the persisted labels and retirements and the versions' directory names) and gates only
// the versions it keeps: the others are listed UNLOADED straight away, so start-up time and
// memory do not grow with the number of versions ever published. Writers (publish, labels,
// retire, scans) are serialized by writer_mu_, held across compile and disk I/O but never by
// readers.

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "cds/v1/service.pb.h"
#include "server/bundle/bundle.h"
#include "server/compiler/compiled_rule_set.h"
#include "server/compiler/compiler.h"

namespace cds::store {

// The label a request without version or label resolves through, when set.
inline constexpr char kDefaultLabel[] = "stable";

// One loaded (or rejected) version.
struct VersionEntry {
  std::string name;
  std::string version;
  cds::v1::RuleSetInfo::State state = cds::v1::RuleSetInfo::LOADING;
  std::string reason;  // why REJECTED
  cds::v1::RejectReason reject_reason = cds::v1::REJECT_REASON_UNSPECIFIED;
  // "sha256:<hex>" of the rule-set files (MANIFEST and signature excluded); kept for
  // rejected versions too, so status queries say which content failed.
  std::string digest;
  std::string source_dir;
  std::string origin;  // "rules_dir", "published" or "memory"
  std::string signer;  // key id; empty when unsigned
  absl::Time loaded_at;
  // Set when AVAILABLE or RETIRED, until the retention policy unloads it.
  std::shared_ptr<const compiler::CompiledRuleSet> rule_set;
  // What RuleSetInfo shows of a version whose rule_set was unloaded (title, counts, ...).
  std::shared_ptr<const cds::v1::RuleSetInfo> unloaded_summary;
  // Shared so that counting an evaluation needs no store lock.
  std::shared_ptr<std::atomic<int64_t>> evaluations =
      std::make_shared<std::atomic<int64_t>>(0);
};

// What a request evaluates against.
struct Resolved {
  std::shared_ptr<const compiler::CompiledRuleSet> rule_set;
  std::shared_ptr<std::atomic<int64_t>> evaluations;
  // The label resolved through ("" when a version was pinned or no label applied).
  std::string label;
};

struct PublishResult {
  cds::v1::RuleSetInfo info;
  bool created = false;  // false: this exact content was already there
};

class RuleStore {
 public:
  struct Options {
    // Directory of trusted "*.pub" keys, re-read before each publish and scan, so a key a
    // maintainer adds is trusted without a restart. Empty: no key is trusted.
    std::string trusted_keys_dir;
    // Development only: accept bundles without MANIFEST / MANIFEST.sig (logged loudly).
    bool allow_unsigned = false;
    // Where published bundles, labels and retirements are persisted. Empty: Publish,
    // SetLabel and Retire are FAILED_PRECONDITION.
    std::string state_dir;
    // Ontology releases for published bundles (the rules directory's ontology/).
    std::string ontology_dir;
    // Called after every change, with the number of AVAILABLE versions (health).
    std::function<void(int available)> on_change;
    // Retention: how many of the highest AVAILABLE versions of each rule set stay in memory
    // besides the labelled and default ones (see the class comment). 0: keep every version.
    int keep_versions = 0;
    // Tests only: called at each persistence step ("bundle_file_written",
    // "bundle_staged", "bundle_renamed", "state_staged") to pause or crash there.
    std::function<void(absl::string_view step)> persistence_hook;
  };

  RuleStore() : RuleStore(Options()) {}
  explicit RuleStore(Options options);
  RuleStore(const RuleStore&) = delete;
  RuleStore& operator=(const RuleStore&) = delete;

  // Compiles, tests and adds one version given as trusted in-memory source (tests, tools:
  // no signature involved). Returns the entry's final state.
  cds::v1::RuleSetInfo::State AddVersion(const compiler::RuleSetSource& source,
                                         const std::string& source_dir) ABSL_LOCKS_EXCLUDED(mu_);

  // Start-up: loads every <root>/<name>/<version>/ bundle directory through the gate and
  // remembers `root` for ScanRulesDir. Returns the number of AVAILABLE versions, or an
  // error when the root cannot be read.
  absl::StatusOr<int> LoadFromDirectory(const std::string& root) ABSL_LOCKS_EXCLUDED(mu_);

  // Poller step: loads bundle directories that appeared or changed under the rules root
  // since the last look, but only complete ones: with MANIFEST.sig (written last) unless
  // unsigned bundles are allowed, and only versions not already AVAILABLE or RETIRED.
  // A half-copied directory fails its hashes, is never served, and is retried once its
  // files change. Returns the number of versions that became AVAILABLE.
  int ScanRulesDir() ABSL_LOCKS_EXCLUDED(mu_);

  // Start-up, after LoadFromDirectory: removes unfinished temporaries under state_dir,
  // re-applies labels and retirements, and loads through the gate the published bundles
  // the retention policy keeps (labelled ones, then the highest versions until
  // keep_versions of them pass); the rest are listed UNLOADED (digest only: their signature
  // and compile wait until they are labelled). No-op without a state_dir. Returns the number
  // of AVAILABLE versions.
  absl::StatusOr<int> RestoreState() ABSL_LOCKS_EXCLUDED(mu_);

  // Gate, persist, then serve a bundle. Refusals: see bundle::RejectionStatus.
  absl::StatusOr<PublishResult> Publish(const cds::v1::Bundle& bundle) ABSL_LOCKS_EXCLUDED(mu_);
  // Same, from serialized cds.v1.Bundle bytes (EMPTY_BUNDLE / MALFORMED_BUNDLE first).
  absl::StatusOr<PublishResult> PublishBytes(const std::string& bytes) ABSL_LOCKS_EXCLUDED(mu_);

  // Points `label` at an AVAILABLE version; returns the previous version ("" if none). An
  // UNLOADED version is first loaded again from its bundle through the whole gate
  // (signature, hashes, compile, embedded cases); if it no longer passes, it is listed
  // REJECTED with the reason, the label stays where it was, and the call fails with
  // FAILED_PRECONDITION naming the version and the reason.
  absl::StatusOr<std::string> SetLabel(const std::string& name, const std::string& label,
                                       const std::string& version) ABSL_LOCKS_EXCLUDED(mu_);

  // Stops serving an AVAILABLE version; an UNLOADED one is listed RETIRED without being
  // loaded; a RETIRED one is answered as it is (retiring is idempotent). FAILED_PRECONDITION
  // while a label points at it, for a REJECTED version, or for the last version of its rule
  // set still served once older ones were unloaded; NOT_FOUND for a version never seen.
  absl::StatusOr<cds::v1::RuleSetInfo> Retire(const std::string& name,
                                              const std::string& version)
      ABSL_LOCKS_EXCLUDED(mu_);

  // The version to evaluate: `version` exactly, else the version `label` points at, else
  // the "stable" label's version, else the highest AVAILABLE semantic version. NOT_FOUND
  // when there is no such AVAILABLE version; UNAVAILABLE when nothing is available at all.
  // Never loads an UNLOADED version (as TensorFlow Serving answers a request for a version
  // its policy did not load): any caller could otherwise undo the retention policy one
  // compile at a time. The NOT_FOUND message says that labelling it loads it again.
  absl::StatusOr<Resolved> Resolve(const std::string& name, const std::string& version,
                                   const std::string& label = "") const
      ABSL_LOCKS_EXCLUDED(mu_);

  // Status of every version (filtered by name when non-empty), sorted by name and version.
  std::vector<cds::v1::RuleSetInfo> List(const std::string& name) const ABSL_LOCKS_EXCLUDED(mu_);

  // Status and definition of one version (empty version: the default).
  absl::StatusOr<cds::v1::GetRuleSetResponse> Get(const std::string& name,
                                                  const std::string& version) const
      ABSL_LOCKS_EXCLUDED(mu_);

  // Number of AVAILABLE versions.
  int AvailableCount() const ABSL_LOCKS_EXCLUDED(mu_);

  // Number of versions whose compiled rule set the store holds (AVAILABLE, or RETIRED and
  // not unloaded): what resident memory grows with.
  int LoadedCount() const ABSL_LOCKS_EXCLUDED(mu_);

  // How many times the gate compiled a rule set since construction (tests: what a restart
  // or a label costs).
  int64_t CompileCount() const { return compiles_.load(std::memory_order_relaxed); }

 private:
  // The outcome of the gate for one candidate version.
  struct Candidate {
    VersionEntry entry;
    std::optional<bundle::Rejection> rejection;
    bundle::VerifiedBundle verified;
    bool signature_checked = false;  // the rejection (if any) came after the signature
    // Where the gate's time went (logged for publishes).
    absl::Duration verify_time, compile_time, cases_time;
  };

  // `on_verified`, when set, is called once the signature and hashes checked out, before
  // the compile.
  Candidate Gate(const cds::v1::Bundle& bundle, const bundle::VerifyOptions& verify,
                 const std::string& origin, const std::string& source_dir,
                 const std::string& ontology_dir,
                 const std::function<void()>& on_verified = nullptr)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(writer_mu_);
  // Compiles and tests already verified files into `candidate`.
  void CompileAndTest(const compiler::RuleSetSource& source, Candidate* candidate) const;
  // Reads the bundle directory of name@version and gates it (an unreadable directory is a
  // MALFORMED_BUNDLE rejection). The outcome is shown whatever it is (signature_checked).
  Candidate GateDir(const std::string& name, const std::string& version, const std::string& dir,
                    const std::string& origin, const std::string& ontology_dir)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(writer_mu_);
  // Start-up: lists a persisted bundle as not loaded (UNLOADED, or RETIRED when retired)
  // without verifying or compiling it; only its files are read, for the digest that
  // republishing compares against. False when the directory cannot be read.
  bool AddNotLoaded(const std::string& name, const std::string& version, const std::string& dir)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(writer_mu_) ABSL_LOCKS_EXCLUDED(mu_);
  // Loads an UNLOADED version again from its bundle through the whole gate. On a refusal
  // the version is listed REJECTED and FAILED_PRECONDITION names it and the reason.
  absl::Status LoadAgain(const std::string& name, const std::string& version)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(writer_mu_) ABSL_LOCKS_EXCLUDED(mu_);
  // Adds a gated candidate. Never replaces an AVAILABLE, RETIRED or UNLOADED version: the
  // same content is a no-op (*created = false), other content a VERSION_CONFLICT rejection.
  // A version accepted once and REJECTED since is replaced only by its own content.
  std::optional<bundle::Rejection> Insert(Candidate candidate, bool* created)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(writer_mu_) ABSL_LOCKS_EXCLUDED(mu_);
  // VERSION_CONFLICT when `key` (name@version) was accepted with content other than `digest`.
  std::optional<bundle::Rejection> ConflictLocked(const std::string& key,
                                                  const std::string& digest) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(writer_mu_);
  absl::StatusOr<PublishResult> PublishLocked(const cds::v1::Bundle& bundle)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(writer_mu_);
  int ScanLocked(const std::string& root, bool startup) ABSL_EXCLUSIVE_LOCKS_REQUIRED(writer_mu_);
  void ReloadKeys() ABSL_EXCLUSIVE_LOCKS_REQUIRED(writer_mu_);
  // Writes labels and retirements (as they would be after a change) atomically.
  absl::Status PersistState(const cds::v1::ServerState& state)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(writer_mu_);
  cds::v1::ServerState CurrentState() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(writer_mu_);
  // Persisting a published bundle, in two steps: StageBundle writes a verified bundle's
  // files (exactly as received, so it re-verifies) under tmp/ and makes them durable;
  // CommitBundle renames the staged directory to bundles/<name>/<version>/ durably.
  // StageBundle touches no member: PublishLocked runs it beside the gate's compile.
  absl::StatusOr<std::string> StageBundle(const cds::v1::Bundle& bundle) const;
  absl::Status CommitBundle(const std::string& staging, const Candidate& candidate)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(writer_mu_);
  // Applies the retention policy (Options::keep_versions); returns how many versions it
  // unloaded. The compiled rule sets are released after mu_ is dropped.
  int ApplyRetention() ABSL_EXCLUSIVE_LOCKS_REQUIRED(writer_mu_) ABSL_LOCKS_EXCLUDED(mu_);
  void Hook(absl::string_view step) const;
  void Changed() const ABSL_LOCKS_EXCLUDED(mu_);

  cds::v1::RuleSetInfo InfoLocked(const VersionEntry& entry) const
      ABSL_SHARED_LOCKS_REQUIRED(mu_);
  const VersionEntry* DefaultLocked(const std::string& name, std::string* label) const
      ABSL_SHARED_LOCKS_REQUIRED(mu_);
  bool UnloadedLocked(const std::string& name, const std::string& version) const
      ABSL_SHARED_LOCKS_REQUIRED(mu_);
  // " (unloaded by the retention policy ...)" when that version was unloaded, else "".
  std::string UnloadedNoteLocked(const std::string& name, const std::string& version) const
      ABSL_SHARED_LOCKS_REQUIRED(mu_);
  // The entry of name@version in any state, or null.
  const VersionEntry* EntryLocked(const std::string& name, const std::string& version) const
      ABSL_SHARED_LOCKS_REQUIRED(mu_);
  const VersionEntry* AvailableLocked(const std::string& name, const std::string& version) const
      ABSL_SHARED_LOCKS_REQUIRED(mu_);

  const Options options_;
  // Compiles run by CompileAndTest (CompileCount).
  mutable std::atomic<int64_t> compiles_{0};

  // Serializes every change (gate, disk, then the swap under mu_). Lock order:
  // writer_mu_ before mu_.
  absl::Mutex writer_mu_ ABSL_ACQUIRED_BEFORE(mu_);
  bundle::TrustedKeys keys_ ABSL_GUARDED_BY(writer_mu_);
  // The trusted-keys directory as keys_ was last loaded from it, and whether that was long
  // enough after its last change to be trusted until the fingerprint changes (ReloadKeys).
  std::string keys_fingerprint_ ABSL_GUARDED_BY(writer_mu_);
  bool keys_settled_ ABSL_GUARDED_BY(writer_mu_) = false;
  std::string rules_root_ ABSL_GUARDED_BY(writer_mu_);
  // Rules-dir bundle directory -> fingerprint (names, sizes, mtimes) last gated.
  std::map<std::string, std::string> scanned_ ABSL_GUARDED_BY(writer_mu_);
  // "name@version" -> digest of every version that passed the gate or was persisted by a
  // publish (restored from the bundles at start-up): published versions are immutable, so
  // no other content is accepted under that name@version, even once it is REJECTED (its
  // bundle failing the gate at a restart or when loaded again).
  std::map<std::string, std::string> accepted_digests_ ABSL_GUARDED_BY(writer_mu_);
  // "name@version" retired (persisted even when that version is not loaded).
  std::set<std::string> retired_ ABSL_GUARDED_BY(writer_mu_);

  mutable absl::Mutex mu_;
  // name -> version -> entry.
  std::map<std::string, std::map<std::string, VersionEntry>> entries_ ABSL_GUARDED_BY(mu_);
  // name -> label -> version.
  std::map<std::string, std::map<std::string, std::string>> labels_ ABSL_GUARDED_BY(mu_);
};

// Orders "MAJOR.MINOR.PATCH" semantically; non-semver strings sort lexically after.
bool SemverLess(const std::string& a, const std::string& b);

// True for a label authors may set: a lower-case letter, then up to 31 of [a-z0-9_-].
bool IsValidLabel(const std::string& label);

}  // namespace cds::store
