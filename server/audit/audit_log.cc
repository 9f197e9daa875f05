#include "server/audit/audit_log.h"

#include <openssl/core_names.h>
#include <openssl/evp.h>
#include <openssl/params.h>
#include <pthread.h>
#include <sqlite3.h>

#include <atomic>
#include <cstdint>
#include <deque>
#include <fstream>
#include <sstream>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"

namespace cds::audit {
namespace {

// `id` is the rowid: records are never deleted, so it only grows (no AUTOINCREMENT, which
// would write its sqlite_sequence page in every commit; databases made with it still work).
constexpr char kSchema[] = R"sql(
CREATE TABLE IF NOT EXISTS audit (
  id INTEGER PRIMARY KEY,
  time_us INTEGER NOT NULL,
  caller TEXT NOT NULL,
  method TEXT NOT NULL,
  rule_set TEXT NOT NULL,
  digest TEXT NOT NULL,
  pseudonym TEXT NOT NULL,
  evaluation_id TEXT NOT NULL,
  top_suggestions TEXT NOT NULL,
  status_code INTEGER NOT NULL,
  latency_us INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_time ON audit(time_us);
CREATE INDEX IF NOT EXISTS audit_pseudonym ON audit(pseudonym);
)sql";

// One writer thread commits whatever is queued as one transaction, then tells every record
// of the batch its outcome. A watchdog thread answers UNAVAILABLE for records still not
// committed after max_wait (a stuck disk); whichever comes first, commit or watchdog, claims
// the record and calls its callback, exactly once.
class SqliteAuditSink final : public AuditSink {
 public:
  // Takes ownership of the databases and the prepared statements. `checkpointer`: a second
  // connection to the same database for the syncer thread, or null when every commit is
  // fsynced (sync_interval zero).
  SqliteAuditSink(sqlite3* db, sqlite3_stmt* begin, sqlite3_stmt* insert, sqlite3_stmt* commit,
                  sqlite3* checkpointer, const SqliteAuditOptions& options)
      : options_(options),
        db_(db),
        begin_(begin),
        insert_(insert),
        commit_(commit),
        checkpointer_(checkpointer),
        writer_([this] {
          pthread_setname_np(pthread_self(), "audit-writer");  // for top -H and profiles
          WriteLoop();
        }),
        watchdog_([this] {
          pthread_setname_np(pthread_self(), "audit-watchdog");
          WatchLoop();
        }) {
    if (checkpointer_ != nullptr) {
      syncer_ = std::thread([this] {
        pthread_setname_np(pthread_self(), "audit-syncer");
        SyncLoop();
      });
    }
  }

  ~SqliteAuditSink() override {
    {
      absl::MutexLock lock(&mu_);
      stopping_ = true;
    }
    writer_.join();
    watchdog_.join();
    if (syncer_.joinable()) syncer_.join();  // after the writer: its last checkpoint is final
    sqlite3_finalize(begin_);
    sqlite3_finalize(insert_);
    sqlite3_finalize(commit_);
    sqlite3_close(checkpointer_);
    sqlite3_close(db_);
  }

  int QueueDepth() const override {
    absl::MutexLock lock(&mu_);
    return static_cast<int>(queue_.size());
  }

  void RecordAsync(AuditRecord record, Done done) override {
    auto pending = std::make_shared<Pending>();
    pending->record = std::move(record);
    pending->done = std::move(done);
    {
      absl::MutexLock lock(&mu_);
      if (static_cast<int>(queue_.size()) < options_.max_queued && !stopping_) {
        pending->deadline = absl::Now() + options_.max_wait;
        queue_.push_back(pending);
        watched_.push_back(std::move(pending));
        return;
      }
    }
    pending->Finish(absl::UnavailableError("audit trail cannot keep up: call refused unaudited"));
  }

  absl::StatusOr<std::vector<AuditRecord>> Query(const AuditQuery& query) const override {
    // A connection of its own, read-only: WAL readers never block the writer.
    return QuerySqliteAudit(options_.path, query);
  }

 private:
  struct Pending {
    AuditRecord record;
    Done done;
    absl::Time deadline;
    std::atomic<bool> claimed{false};
    // Calls `done` unless someone already has.
    void Finish(absl::Status status) {
      if (!claimed.exchange(true, std::memory_order_acq_rel)) std::move(done)(std::move(status));
    }
  };

  void WriteLoop() {
    std::vector<std::shared_ptr<Pending>> batch;
    while (true) {
      batch.clear();
      {
        absl::MutexLock lock(&mu_);
        auto ready = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
          return stopping_ || !queue_.empty();
        };
        mu_.Await(absl::Condition(&ready));
        // Forget the records answered so far (the watchdog would, but only when it wakes).
        while (!watched_.empty() && watched_.front()->claimed.load(std::memory_order_acquire)) {
          watched_.pop_front();
        }
        if (queue_.empty() && stopping_) {
          writer_done_ = true;
          return;
        }
        batch.swap(queue_);
      }
      CommitAndAnswer(batch);
    }
  }

  // Commits `batch` as one transaction and answers each record. Committed even when the
  // watchdog has already answered some of them: those callers were told UNAVAILABLE, and a
  // record too many is better than one too few.
  void CommitAndAnswer(const std::vector<std::shared_ptr<Pending>>& batch) {
    const absl::Status status = Commit(batch);
    if (status.ok()) commits_.fetch_add(1, std::memory_order_release);
    for (const auto& p : batch) p->Finish(status);
  }

  // Every sync_interval, makes what was committed since the last round durable: a PASSIVE
  // checkpoint on a connection of its own fsyncs the WAL, copies it into the database and
  // fsyncs that, without blocking the writer (WAL readers and checkpoints never do). The
  // writer keeps SQLite's automatic checkpoint (every 1000 WAL pages): under a steady stream
  // of commits a passive checkpoint from another connection never finds the WAL fully copied
  // when the writer starts its next transaction, so only the writer's own checkpoint lets the
  // WAL start over (without it the WAL grew by 150 MB in 20 s at 64 in flight, and its
  // memory-mapped index with it). Once the writer has stopped, one last checkpoint leaves
  // everything on disk.
  void SyncLoop() ABSL_LOCKS_EXCLUDED(mu_) {
    uint64_t synced = 0;
    bool last = false;
    while (!last) {
      {
        absl::MutexLock lock(&mu_);
        mu_.AwaitWithTimeout(absl::Condition(&writer_done_), options_.sync_interval);
        last = writer_done_;
      }
      const uint64_t committed = commits_.load(std::memory_order_acquire);
      if (committed == synced) continue;
      if (sqlite3_wal_checkpoint_v2(checkpointer_, nullptr, SQLITE_CHECKPOINT_PASSIVE, nullptr,
                                    nullptr) == SQLITE_OK) {
        synced = committed;
      }
    }
  }

  void WatchLoop() ABSL_LOCKS_EXCLUDED(mu_) {
    mu_.Lock();
    while (true) {
      while (!watched_.empty() && watched_.front()->claimed.load(std::memory_order_acquire)) {
        watched_.pop_front();
      }
      if (watched_.empty()) {
        if (stopping_) break;
        auto ready = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
          return stopping_ || !watched_.empty();
        };
        mu_.Await(absl::Condition(&ready));
        continue;
      }
      std::shared_ptr<Pending> oldest = watched_.front();
      if (absl::Now() < oldest->deadline) {
        // Records are watched in arrival order, so the oldest expires first. On shutdown
        // the writer answers every queued record before it stops.
        mu_.AwaitWithDeadline(absl::Condition(&writer_done_), oldest->deadline);
        continue;
      }
      watched_.pop_front();
      mu_.Unlock();
      oldest->Finish(absl::UnavailableError("audit trail too slow: call refused unaudited"));
      mu_.Lock();
    }
    mu_.Unlock();
  }

  absl::Status Commit(const std::vector<std::shared_ptr<Pending>>& batch) {
    if (options_.commit_delay > absl::ZeroDuration()) absl::SleepFor(options_.commit_delay);
    // Prepared once: BEGIN and COMMIT cost no parsing per batch.
    const int begun = sqlite3_step(begin_);
    sqlite3_reset(begin_);
    if (begun != SQLITE_DONE) return absl::UnavailableError("audit trail cannot be written");
    for (const auto& p : batch) {
      const AuditRecord& r = p->record;
      sqlite3_reset(insert_);
      sqlite3_bind_int64(insert_, 1, absl::ToUnixMicros(r.time));
      // The record outlives the statement's step: no copies (SQLITE_STATIC).
      auto text = [this](int i, const std::string& s) {
        sqlite3_bind_text(insert_, i, s.data(), static_cast<int>(s.size()), SQLITE_STATIC);
      };
      text(2, r.caller);
      text(3, r.method);
      text(4, r.rule_set);
      text(5, r.digest);
      text(6, r.pseudonym);
      text(7, r.evaluation_id);
      text(8, r.top_suggestions);
      sqlite3_bind_int(insert_, 9, r.status_code);
      sqlite3_bind_int64(insert_, 10, r.latency_us);
      if (sqlite3_step(insert_) != SQLITE_DONE) {
        sqlite3_reset(insert_);
        sqlite3_exec(db_, "ROLLBACK", nullptr, nullptr, nullptr);
        return absl::UnavailableError("audit trail cannot be written");
      }
    }
    sqlite3_reset(insert_);
    const int committed = sqlite3_step(commit_);
    sqlite3_reset(commit_);
    if (committed != SQLITE_DONE) {
      sqlite3_exec(db_, "ROLLBACK", nullptr, nullptr, nullptr);
      return absl::UnavailableError("audit trail cannot be written");
    }
    return absl::OkStatus();
  }

  const SqliteAuditOptions options_;
  sqlite3* const db_;           // used by the writer thread only
  sqlite3_stmt* const begin_;   // ditto
  sqlite3_stmt* const insert_;  // ditto
  sqlite3_stmt* const commit_;  // ditto
  sqlite3* const checkpointer_;  // the syncer thread's, or null
  std::atomic<uint64_t> commits_{0};  // transactions committed so far
  mutable absl::Mutex mu_;
  // Records waiting for the writer.
  std::vector<std::shared_ptr<Pending>> queue_ ABSL_GUARDED_BY(mu_);
  // Records not yet answered, oldest first (the watchdog's view; answered ones are dropped
  // lazily from the front).
  std::deque<std::shared_ptr<Pending>> watched_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  bool writer_done_ ABSL_GUARDED_BY(mu_) = false;

  std::thread writer_;
  std::thread watchdog_;
  std::thread syncer_;  // with a sync_interval only
};

}  // namespace

absl::StatusOr<Pseudonymizer> Pseudonymizer::FromKeyFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("--audit_key_file: cannot read ", path));
  std::stringstream content;
  content << in.rdbuf();
  if (content.str().size() < 32) {
    return absl::FailedPreconditionError("--audit_key_file must hold at least 32 bytes");
  }
  return Pseudonymizer(content.str());
}

// An HMAC-SHA256 context keyed once; each pseudonym duplicates it (cheap) instead of
// fetching the algorithm and keying a new context per call (HMAC()'s one-shot path).
class Pseudonymizer::Keyed {
 public:
  explicit Keyed(const std::string& key) {
    mac_ = EVP_MAC_fetch(nullptr, "HMAC", nullptr);
    if (mac_ != nullptr) ctx_ = EVP_MAC_CTX_new(mac_);
    char digest[] = "SHA256";
    const OSSL_PARAM params[] = {
        OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, digest, 0), OSSL_PARAM_END};
    ok_ = ctx_ != nullptr &&
          EVP_MAC_init(ctx_, reinterpret_cast<const unsigned char*>(key.data()), key.size(),
                       params) == 1;
  }
  ~Keyed() {
    EVP_MAC_CTX_free(ctx_);
    EVP_MAC_free(mac_);
  }
  Keyed(const Keyed&) = delete;
  Keyed& operator=(const Keyed&) = delete;

  // Lower-case hex HMAC of `data`; "" when OpenSSL fails (then no pseudonym is recorded
  // rather than a wrong one).
  std::string Mac(const std::string& data) const {
    if (!ok_) return "";
    EVP_MAC_CTX* ctx = EVP_MAC_CTX_dup(ctx_);
    if (ctx == nullptr) return "";
    unsigned char mac[EVP_MAX_MD_SIZE];
    size_t length = 0;
    const bool ok =
        EVP_MAC_update(ctx, reinterpret_cast<const unsigned char*>(data.data()), data.size()) ==
            1 &&
        EVP_MAC_final(ctx, mac, &length, sizeof(mac)) == 1;
    EVP_MAC_CTX_free(ctx);
    if (!ok) return "";
    return absl::BytesToHexString(absl::string_view(reinterpret_cast<const char*>(mac), length));
  }

 private:
  EVP_MAC* mac_ = nullptr;
  EVP_MAC_CTX* ctx_ = nullptr;  // keyed; only duplicated after construction
  bool ok_ = false;
};

Pseudonymizer::Pseudonymizer(const std::string& key) : keyed_(std::make_shared<Keyed>(key)) {}

std::string Pseudonymizer::Of(const std::string& reference) const {
  if (reference.empty()) return "";
  return keyed_->Mac(reference);
}

absl::Status AuditSink::Record(AuditRecord record) {
  absl::Notification committed;
  absl::Status outcome;
  RecordAsync(std::move(record), [&committed, &outcome](absl::Status status) {
    outcome = std::move(status);
    committed.Notify();
  });
  committed.WaitForNotification();
  return outcome;
}

absl::StatusOr<std::unique_ptr<AuditSink>> OpenSqliteAudit(const SqliteAuditOptions& options) {
  sqlite3* db = nullptr;
  if (sqlite3_open_v2(options.path.c_str(), &db,
                      SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX,
                      nullptr) != SQLITE_OK) {
    sqlite3_close(db);
    return absl::UnavailableError(absl::StrCat("--audit_db: cannot open ", options.path));
  }
  sqlite3_busy_timeout(db, 2000);
  char* error = nullptr;
  const bool deferred_sync = options.sync_interval > absl::ZeroDuration();
  // Deferred: commits reach the WAL (synchronous=NORMAL); the syncer checkpoints on time.
  const std::string setup = absl::StrCat(
      "PRAGMA journal_mode=WAL;",
      deferred_sync ? "PRAGMA synchronous=NORMAL;"
                    : "PRAGMA synchronous=FULL;",
      kSchema);
  if (sqlite3_exec(db, setup.c_str(), nullptr, nullptr, &error) != SQLITE_OK) {
    const std::string message = error != nullptr ? error : "unknown error";
    sqlite3_free(error);
    sqlite3_close(db);
    return absl::UnavailableError(absl::StrCat("--audit_db ", options.path, ": ", message));
  }
  if (options.max_pages > 0) {
    const std::string limit = absl::StrCat("PRAGMA max_page_count = ", options.max_pages);
    sqlite3_exec(db, limit.c_str(), nullptr, nullptr, nullptr);
  }
  sqlite3_stmt* begin = nullptr;
  sqlite3_stmt* insert = nullptr;
  sqlite3_stmt* commit = nullptr;
  if (sqlite3_prepare_v2(db, "BEGIN IMMEDIATE", -1, &begin, nullptr) != SQLITE_OK ||
      sqlite3_prepare_v2(db,
                         "INSERT INTO audit (time_us, caller, method, rule_set, digest, "
                         "pseudonym, evaluation_id, top_suggestions, status_code, latency_us) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                         -1, &insert, nullptr) != SQLITE_OK ||
      sqlite3_prepare_v2(db, "COMMIT", -1, &commit, nullptr) != SQLITE_OK) {
    sqlite3_finalize(begin);
    sqlite3_finalize(insert);
    sqlite3_finalize(commit);
    sqlite3_close(db);
    return absl::InternalError("audit: cannot prepare the statements");
  }
  sqlite3* checkpointer = nullptr;
  if (deferred_sync) {
    if (sqlite3_open_v2(options.path.c_str(), &checkpointer,
                        SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOMUTEX, nullptr) != SQLITE_OK ||
        // It only checkpoints: no page cache worth keeping (64 KB instead of 2 MB).
        sqlite3_exec(checkpointer, "PRAGMA synchronous=NORMAL; PRAGMA cache_size=-64;", nullptr,
                     nullptr, nullptr) !=
            SQLITE_OK) {
      sqlite3_close(checkpointer);
      sqlite3_finalize(begin);
      sqlite3_finalize(insert);
      sqlite3_finalize(commit);
      sqlite3_close(db);
      return absl::UnavailableError(absl::StrCat("--audit_db: cannot open ", options.path));
    }
    sqlite3_busy_timeout(checkpointer, 2000);
  }
  return std::unique_ptr<AuditSink>(
      new SqliteAuditSink(db, begin, insert, commit, checkpointer, options));
}

absl::StatusOr<std::vector<AuditRecord>> QuerySqliteAudit(const std::string& path,
                                                          const AuditQuery& query) {
  sqlite3* db = nullptr;
  if (sqlite3_open_v2(path.c_str(), &db, SQLITE_OPEN_READONLY, nullptr) != SQLITE_OK) {
    sqlite3_close(db);
    return absl::NotFoundError(absl::StrCat("cannot open the audit database ", path));
  }
  sqlite3_busy_timeout(db, 2000);
  sqlite3_stmt* stmt = nullptr;
  const char* sql =
      "SELECT time_us, caller, method, rule_set, digest, pseudonym, evaluation_id, "
      "top_suggestions, status_code, latency_us, id FROM audit WHERE time_us >= ?1 "
      "AND time_us < ?2 AND (?3 = '' OR caller = ?3) "
      "AND (?4 = '' OR rule_set = ?4 OR substr(rule_set, 1, length(?4) + 1) = ?4 || '@') "
      "AND (?5 = '' OR pseudonym = ?5) AND id > ?7 ORDER BY id LIMIT ?6";
  if (sqlite3_prepare_v2(db, sql, -1, &stmt, nullptr) != SQLITE_OK) {
    const std::string message = sqlite3_errmsg(db);
    sqlite3_close(db);
    return absl::FailedPreconditionError(absl::StrCat(path, " is not an audit database: ", message));
  }
  auto micros = [](absl::Time t, int64_t fallback) {
    if (t == absl::InfinitePast() || t == absl::InfiniteFuture()) return fallback;
    return absl::ToUnixMicros(t);
  };
  sqlite3_bind_int64(stmt, 1, micros(query.since, INT64_MIN));
  sqlite3_bind_int64(stmt, 2, micros(query.until, INT64_MAX));
  sqlite3_bind_text(stmt, 3, query.caller.c_str(), -1, SQLITE_TRANSIENT);
  sqlite3_bind_text(stmt, 4, query.rule_set.c_str(), -1, SQLITE_TRANSIENT);
  sqlite3_bind_text(stmt, 5, query.pseudonym.c_str(), -1, SQLITE_TRANSIENT);
  sqlite3_bind_int(stmt, 6, query.limit);
  sqlite3_bind_int64(stmt, 7, query.after_id);
  std::vector<AuditRecord> records;
  auto text = [stmt](int i) {
    const unsigned char* t = sqlite3_column_text(stmt, i);
    return t == nullptr ? std::string() : std::string(reinterpret_cast<const char*>(t));
  };
  int rc;
  while ((rc = sqlite3_step(stmt)) == SQLITE_ROW) {
    AuditRecord r;
    r.time = absl::FromUnixMicros(sqlite3_column_int64(stmt, 0));
    r.caller = text(1);
    r.method = text(2);
    r.rule_set = text(3);
    r.digest = text(4);
    r.pseudonym = text(5);
    r.evaluation_id = text(6);
    r.top_suggestions = text(7);
    r.status_code = sqlite3_column_int(stmt, 8);
    r.latency_us = sqlite3_column_int64(stmt, 9);
    r.id = sqlite3_column_int64(stmt, 10);
    records.push_back(std::move(r));
  }
  sqlite3_finalize(stmt);
  sqlite3_close(db);
  if (rc != SQLITE_DONE) return absl::UnavailableError("the audit database cannot be read");
  return records;
}

}  // namespace cds::audit
