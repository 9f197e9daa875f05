#pragma once

// The audit trail (issue 6, part 3): one record per call. A call is answered only after its
// record is committed; records from concurrent calls are committed together (group commit:
// one transaction per batch; SqliteAuditOptions::sync_interval says when it reaches the
// disk). When the store cannot keep up (queue full, or no commit within the wait) or cannot
// be written, the record's outcome is UNAVAILABLE and the caller fails the call closed
// rather than answering it unaudited. Callers on gRPC's threads use RecordAsync, which never
// blocks: the outcome is delivered to a callback, so waiting for a commit holds no thread
// and the records of every call in flight can share one commit. Patient references
// are stored only as a keyed pseudonym (HMAC-SHA256 with a server secret); the raw
// reference never reaches the store.

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/functional/any_invocable.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace cds::audit {

struct AuditRecord {
  int64_t id = 0;          // set by the store: increasing in commit order
  absl::Time time;
  std::string caller;      // identity, "" when anonymous
  std::string method;      // "/cds.v1.DecisionSupport/Evaluate"
  std::string rule_set;    // "ipex@1.1.0", "" when none resolved
  std::string digest;      // "sha256:..."
  std::string pseudonym;   // Pseudonymizer::Of(reference), "" without a reference
  std::string evaluation_id;
  std::string top_suggestions;  // rule ids of the first suggestions, comma-separated
  int status_code = 0;          // gRPC code
  int64_t latency_us = 0;
};

struct AuditQuery;

// Where records go, and how they are read back. Implementations are thread-safe; a shared
// database for several replicas can be added behind this interface.
class AuditSink {
 public:
  // Called exactly once with the record's outcome: OK once it is durably committed, or
  // UNAVAILABLE (fail closed). May run on the caller's thread (refused at once) or on the
  // store's own thread; it must not block for long.
  using Done = absl::AnyInvocable<void(absl::Status) &&>;

  virtual ~AuditSink() = default;
  // Queues `record` and returns at once; `done` gets the outcome.
  virtual void RecordAsync(AuditRecord record, Done done) = 0;
  // Blocks until `record` is durably committed: OK, or UNAVAILABLE (fail closed).
  absl::Status Record(AuditRecord record);
  // Records waiting to be committed (for the metrics' queue-depth gauge).
  virtual int QueueDepth() const = 0;
  // Committed records matching `query`, in commit order (oldest first).
  virtual absl::StatusOr<std::vector<AuditRecord>> Query(const AuditQuery& query) const = 0;
};

// HMAC-SHA256 of patient references under a server secret, as lower-case hex. Immutable,
// thread-safe.
class Pseudonymizer {
 public:
  // REQUIRES: key of at least 32 bytes.
  static absl::StatusOr<Pseudonymizer> FromKeyFile(const std::string& path);
  explicit Pseudonymizer(const std::string& key);
  // "" for an empty reference.
  std::string Of(const std::string& reference) const;

 private:
  class Keyed;  // HMAC-SHA256 context keyed once (OpenSSL EVP_MAC), copied per call
  std::shared_ptr<const Keyed> keyed_;
};

struct SqliteAuditOptions {
  std::string path;
  // Records waiting for a commit beyond this are refused at once (UNAVAILABLE).
  int max_queued = 10000;
  // A record not committed within this is answered UNAVAILABLE.
  absl::Duration max_wait = absl::Seconds(2);
  // How far behind the calls the disk may be. Zero: every commit is fsynced before its
  // calls are answered (SQLite synchronous=FULL). Positive: a commit is written to the WAL
  // before its calls are answered, so a crash or SIGKILL of the server loses nothing, and a
  // background thread makes the WAL durable (a checkpoint: fsync of the WAL, then of the
  // database) at most this long later, off the calls' path; a power failure or kernel crash
  // can lose at most that much of the trail. This is the trade MySQL's
  // innodb_flush_log_at_trx_commit=2 makes (written at commit, flushed once a second): an
  // fsync per commit cost a call at 1 in flight more than the rest of its work together,
  // and a checkpoint every 200 ms still cost about 30 us per call at 2 k calls/s.
  absl::Duration sync_interval = absl::Seconds(1);
  // Tests only: sleep this long inside each commit (a slow disk).
  absl::Duration commit_delay = absl::ZeroDuration();
  // Tests only: when positive, the database may not grow beyond this many pages (a full
  // disk: inserts then fail with SQLITE_FULL).
  int max_pages = 0;
};

// The embedded default: SQLite in WAL mode, one writer thread that commits whatever is
// queued as one transaction, and (with a sync_interval) one that checkpoints it to disk.
absl::StatusOr<std::unique_ptr<AuditSink>> OpenSqliteAudit(const SqliteAuditOptions& options);

// Which records a query returns; empty fields match everything.
struct AuditQuery {
  absl::Time since = absl::InfinitePast();
  absl::Time until = absl::InfiniteFuture();
  std::string caller;
  std::string rule_set;   // "name@version", or "name" for every version
  std::string pseudonym;
  int64_t after_id = 0;  // only records with a larger id (paging)
  int limit = 1000;
};

// Records of the SQLite audit database at `path` matching `query`, oldest first. Opens
// the database read-only (a running server may keep writing).
absl::StatusOr<std::vector<AuditRecord>> QuerySqliteAudit(const std::string& path,
                                                          const AuditQuery& query);

}  // namespace cds::audit
