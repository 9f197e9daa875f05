#include "server/audit/audit_log.h"

#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <sqlite3.h>

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
#include "absl/time/clock.h"

namespace cds::audit {
namespace {

constexpr char kSchema[] = R"sql(
CREATE TABLE IF NOT EXISTS audit (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
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

class SqliteAuditSink final : public AuditSink {
 public:
  SqliteAuditSink(sqlite3* db, sqlite3_stmt* insert, const SqliteAuditOptions& options)
      : options_(options), db_(db), insert_(insert), writer_([this] { WriteLoop(); }) {}

  ~SqliteAuditSink() override {
    {
      absl::MutexLock lock(&mu_);
      stopping_ = true;
    }
    writer_.join();
    sqlite3_finalize(insert_);
    sqlite3_close(db_);
  }

  int QueueDepth() const override {
    absl::MutexLock lock(&mu_);
    return static_cast<int>(queue_.size());
  }

  absl::Status Record(AuditRecord record) override {
    auto pending = std::make_shared<Pending>();
    pending->record = std::move(record);
    absl::MutexLock lock(&mu_);
    if (static_cast<int>(queue_.size()) >= options_.max_queued) {
      return absl::UnavailableError("audit trail cannot keep up: call refused unaudited");
    }
    queue_.push_back(pending);
    auto done = [&pending]() { return pending->done; };
    if (!mu_.AwaitWithTimeout(absl::Condition(&done), options_.max_wait)) {
      pending->abandoned = true;  // committed later or not, the caller is told UNAVAILABLE
      return absl::UnavailableError("audit trail too slow: call refused unaudited");
    }
    return pending->status;
  }

  absl::StatusOr<std::vector<AuditRecord>> Query(const AuditQuery& query) const override {
    // A connection of its own, read-only: WAL readers never block the writer.
    return QuerySqliteAudit(options_.path, query);
  }

 private:
  struct Pending {
    AuditRecord record;
    bool done = false;
    bool abandoned = false;
    absl::Status status;
  };

  void WriteLoop() {
    while (true) {
      std::vector<std::shared_ptr<Pending>> batch;
      {
        absl::MutexLock lock(&mu_);
        auto ready = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
          return stopping_ || !queue_.empty();
        };
        mu_.Await(absl::Condition(&ready));
        if (queue_.empty() && stopping_) return;
        batch.assign(queue_.begin(), queue_.end());
        queue_.clear();
      }
      const absl::Status status = Commit(batch);
      absl::MutexLock lock(&mu_);
      for (auto& p : batch) {
        p->status = status;
        p->done = true;
      }
    }
  }

  absl::Status Commit(const std::vector<std::shared_ptr<Pending>>& batch) {
    if (options_.commit_delay > absl::ZeroDuration()) absl::SleepFor(options_.commit_delay);
    if (sqlite3_exec(db_, "BEGIN IMMEDIATE", nullptr, nullptr, nullptr) != SQLITE_OK) {
      return absl::UnavailableError("audit trail cannot be written");
    }
    for (const auto& p : batch) {
      const AuditRecord& r = p->record;
      sqlite3_reset(insert_);
      sqlite3_bind_int64(insert_, 1, absl::ToUnixMicros(r.time));
      auto text = [this](int i, const std::string& s) {
        sqlite3_bind_text(insert_, i, s.data(), static_cast<int>(s.size()), SQLITE_TRANSIENT);
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
        sqlite3_exec(db_, "ROLLBACK", nullptr, nullptr, nullptr);
        return absl::UnavailableError("audit trail cannot be written");
      }
    }
    if (sqlite3_exec(db_, "COMMIT", nullptr, nullptr, nullptr) != SQLITE_OK) {
      sqlite3_exec(db_, "ROLLBACK", nullptr, nullptr, nullptr);
      return absl::UnavailableError("audit trail cannot be written");
    }
    return absl::OkStatus();
  }

  const SqliteAuditOptions options_;
  sqlite3* const db_;           // used by the writer thread only
  sqlite3_stmt* const insert_;  // ditto
  mutable absl::Mutex mu_;
  std::deque<std::shared_ptr<Pending>> queue_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::thread writer_;
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

std::string Pseudonymizer::Of(const std::string& reference) const {
  if (reference.empty()) return "";
  unsigned char mac[EVP_MAX_MD_SIZE];
  unsigned int length = 0;
  HMAC(EVP_sha256(), key_.data(), static_cast<int>(key_.size()),
       reinterpret_cast<const unsigned char*>(reference.data()), reference.size(), mac, &length);
  return absl::BytesToHexString(
      absl::string_view(reinterpret_cast<const char*>(mac), length));
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
  const std::string setup = absl::StrCat("PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;",
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
  sqlite3_stmt* insert = nullptr;
  if (sqlite3_prepare_v2(db,
                         "INSERT INTO audit (time_us, caller, method, rule_set, digest, "
                         "pseudonym, evaluation_id, top_suggestions, status_code, latency_us) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                         -1, &insert, nullptr) != SQLITE_OK) {
    sqlite3_close(db);
    return absl::InternalError("audit: cannot prepare the insert");
  }
  return std::unique_ptr<AuditSink>(new SqliteAuditSink(db, insert, options));
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
