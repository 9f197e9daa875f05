#pragma once

// The audit trail (issue 6, part 3): one record per call. A call is answered only after its
// record is committed: written to an append-only journal beside the database (journal.h),
// from which a background thread imports it into SQLite (SqliteAuditOptions::sync_interval
// says when it reaches the disk). When the store cannot keep up (queue full, or not written
// within the wait) or cannot be written, the record's outcome is UNAVAILABLE and the caller
// fails the call closed rather than answering it unaudited. Callers on gRPC's threads use
// RecordAsync, which never waits for another writer: the outcome is delivered to a callback,
// usually before RecordAsync returns, and the records of calls arriving while one is being
// written share the next write. Patient references
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
  // UNAVAILABLE (fail closed). Runs on the caller's thread (usually), on the thread of
  // another caller whose write took this record along, or on one of the store's threads; it
  // must not block for long, nor take a lock that a caller of Record may hold.
  using Done = absl::AnyInvocable<void(absl::Status) &&>;

  virtual ~AuditSink() = default;
  // Commits `record` and returns; `done` gets the outcome. Blocks at most for one journal
  // write (when nobody else is writing); never waits for another writer.
  virtual void RecordAsync(AuditRecord record, Done done) = 0;
  // Blocks until `record` is durably committed: OK, or UNAVAILABLE (fail closed).
  absl::Status Record(AuditRecord record);
  // Records not yet in the database: waiting for the journal, or journaled and waiting for
  // their import (for the metrics' queue-depth gauge).
  virtual int QueueDepth() const = 0;
  // Committed records matching `query`, in commit order (oldest first): every record whose
  // call was answered before the query, imported into the database or not.
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
  // Records not yet in the database beyond this are refused at once (UNAVAILABLE).
  int max_queued = 10000;
  // A record not written within this is answered UNAVAILABLE (by a watchdog that looks
  // every max_wait / 2, so within 1.5 x max_wait).
  absl::Duration max_wait = absl::Seconds(2);
  // How far behind the calls the disk may be. Zero: every journal write is fsynced before
  // its calls are answered. Positive: a record is written to the journal (the page cache)
  // before its call is answered, so a crash or SIGKILL of the server loses nothing, and a
  // background thread imports the journaled records into the database in one fsynced
  // transaction at most this long later (sooner once 1024 are waiting), off the calls' path;
  // a power failure or kernel crash can lose at most that much of the trail. This is the
  // trade MySQL's innodb_flush_log_at_trx_commit=2 makes (written at commit, flushed once a
  // second): an fsync per commit cost a call at 1 in flight more than the rest of its work
  // together. With zero, records are imported every second.
  absl::Duration sync_interval = absl::Seconds(1);
  // The journal moves to a new file past this size (the old one is removed once its records
  // are durably in the database). Queries read the journal whole.
  int64_t journal_rotate_bytes = int64_t{8} << 20;
  // Tests only: sleep this long inside each journal write (a slow disk).
  absl::Duration commit_delay = absl::ZeroDuration();
  // Tests only: when positive, the database may not grow beyond this many pages (a full
  // disk: imports then fail with SQLITE_FULL, and new records are refused).
  int max_pages = 0;
};

// The embedded default: a journal (`<path>.journal`, see journal.h) written by the calling
// threads, imported into SQLite (WAL mode) by a background thread. Opening replays the
// journal: records it holds beyond the database's largest id are imported first (a torn
// last record is dropped: it was never answered); a journal with damage before its end is
// refused (DATA_LOSS) rather than guessed at.
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

// Records of the SQLite audit database at `path` and of its journal matching `query`,
// oldest first. Reads both without writing (a running server may keep writing; after a
// crash, the records only the journal holds are included).
absl::StatusOr<std::vector<AuditRecord>> QuerySqliteAudit(const std::string& path,
                                                          const AuditQuery& query);

namespace internal {
// The SELECT that QuerySqliteAudit runs: by patient, one block of the patient index at a
// time; otherwise along the ids. Exposed for a test of SQLite's plan for it.
std::string AuditSelectSql(bool by_patient);
// The ids of the rows in a time window (?1, ?2), from the time index: the select above then
// reads only the ids between them.
std::string AuditWindowSql();
}  // namespace internal

}  // namespace cds::audit
