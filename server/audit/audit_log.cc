#include "server/audit/audit_log.h"

#include <fcntl.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <pthread.h>
#include <sched.h>
#include <sqlite3.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <sstream>
#include <thread>
#include <utility>
#include <vector>

#include "absl/functional/function_ref.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "server/audit/journal.h"

namespace cds::audit {
namespace {

// `id` is the rowid: records are never deleted, so it only grows (no AUTOINCREMENT, which
// would write its sqlite_sequence page in every commit; databases made with it still work).
//
// Records by patient are found through `audit_patient`, an index on (block of 16 384 ids,
// first 8 hex digits of the pseudonym): a query seeks each block in turn (QuerySqliteAudit).
// A plain index on the pseudonym (audit_pseudonym, before) put every insert at a random
// place in one ever-growing B-tree: with many patients it cost the importer some 9 µs a
// record, rising with the table, and a call 7 µs of server CPU at 64 in flight
// (bench/audit_cost.md); no query used it either. Within the newest block the inserts stay
// in a small, cached part of the index, whatever the table's size.
constexpr int kPatientBlockBits = 14;
constexpr int kPatientKeyDigits = 8;
// The index's two columns as SQL expressions; a query must spell them exactly so.
std::string PatientBlockSql() { return absl::StrCat("id >> ", kPatientBlockBits); }
std::string PatientKeySql() {
  return absl::StrCat("substr(pseudonym, 1, ", kPatientKeyDigits, ")");
}
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
DROP INDEX IF EXISTS audit_pseudonym;
)sql";

std::string PatientIndexSql() {
  return absl::StrCat("CREATE INDEX IF NOT EXISTS audit_patient ON audit(", PatientBlockSql(),
                      ", ", PatientKeySql(), ");");
}

constexpr char kInsert[] =
    "INSERT OR IGNORE INTO audit (id, time_us, caller, method, rule_set, digest, pseudonym, "
    "evaluation_id, top_suggestions, status_code, latency_us) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)";

// Records imported per transaction at most, and how many waiting wake the importer early.
constexpr size_t kImportBatch = 1024;
// The importer offers the core to any runnable thread after this many inserts, while it is
// keeping up. A whole batch takes some 3 ms of CPU, and a call's thread woken meanwhile on
// the same core did not always preempt it (Linux's EEVDF lets the running thread reach its
// fair share first): at 1 call in flight on one core, p99.9 was 2.4 ms against 1.1 ms
// unaudited; yielding every 32 records (~100 µs) brought it to 1.2 ms (audit_cost.md). But
// each yield also gives up the rest of the importer's slice: on a core the calls keep busy
// (one stream at full speed) it then got ~8% of the core where it needed ~14%, and the
// backlog reached max_queued (calls refused unaudited). So it yields only while less than
// a batch waits behind the one it imports. (A lower priority would starve it the same way.)
constexpr size_t kYieldEvery = 32;

// The database side: the table, and one fsynced transaction per batch of journaled records.
class Importer {
 public:
  ~Importer() {
    sqlite3_finalize(begin_);
    sqlite3_finalize(insert_);
    sqlite3_finalize(commit_);
    sqlite3_close(db_);
  }

  static absl::StatusOr<std::unique_ptr<Importer>> Open(const SqliteAuditOptions& options) {
    auto importer = std::unique_ptr<Importer>(new Importer);
    sqlite3*& db = importer->db_;
    if (sqlite3_open_v2(options.path.c_str(), &db,
                        SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX,
                        nullptr) != SQLITE_OK) {
      return absl::UnavailableError(absl::StrCat("--audit_db: cannot open ", options.path));
    }
    sqlite3_busy_timeout(db, 2000);
    // synchronous=NORMAL and no automatic checkpoint: an import reaches the WAL (the page
    // cache) and never waits for the disk; the journal keeps its records durable until the
    // syncer's checkpoint has synced them (see Checkpoint). With an fsync per import
    // (synchronous=FULL), or SQLite's automatic checkpoint on this connection, imports
    // stalled for seconds while other processes wrote heavily, and calls were refused for
    // the backlog. Imports come in bursts, so the syncer's checkpoint between them copies
    // the whole WAL and the next import starts it over: it does not grow.
    char* error = nullptr;
    const std::string setup = absl::StrCat(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA wal_autocheckpoint=0;",
        kSchema, PatientIndexSql());
    if (sqlite3_exec(db, setup.c_str(), nullptr, nullptr, &error) != SQLITE_OK) {
      const std::string message = error != nullptr ? error : "unknown error";
      sqlite3_free(error);
      return absl::UnavailableError(absl::StrCat("--audit_db ", options.path, ": ", message));
    }
    if (options.max_pages > 0) {
      const std::string limit = absl::StrCat("PRAGMA max_page_count = ", options.max_pages);
      sqlite3_exec(db, limit.c_str(), nullptr, nullptr, nullptr);
    }
    if (sqlite3_prepare_v2(db, "BEGIN IMMEDIATE", -1, &importer->begin_, nullptr) != SQLITE_OK ||
        sqlite3_prepare_v2(db, kInsert, -1, &importer->insert_, nullptr) != SQLITE_OK ||
        sqlite3_prepare_v2(db, "COMMIT", -1, &importer->commit_, nullptr) != SQLITE_OK) {
      return absl::InternalError("audit: cannot prepare the statements");
    }
    return importer;
  }

  // Makes every committed import durable: a checkpoint syncs the WAL, copies it into the
  // database and syncs that. True only when it copied the whole WAL: a reader in the way can
  // make a passive checkpoint skip the copy (and the syncs) and still return OK.
  static bool Checkpoint(sqlite3* db) {
    int log_frames = -1;
    int copied_frames = -1;
    return sqlite3_wal_checkpoint_v2(db, nullptr, SQLITE_CHECKPOINT_PASSIVE, &log_frames,
                                     &copied_frames) == SQLITE_OK &&
           copied_frames == log_frames;
  }
  bool Checkpoint() { return Checkpoint(db_); }

  // The largest id in the database (0 when empty).
  absl::StatusOr<int64_t> MaxId() {
    sqlite3_stmt* stmt = nullptr;
    if (sqlite3_prepare_v2(db_, "SELECT COALESCE(MAX(id), 0) FROM audit", -1, &stmt, nullptr) !=
        SQLITE_OK) {
      return absl::UnavailableError("the audit database cannot be read");
    }
    const bool row = sqlite3_step(stmt) == SQLITE_ROW;
    const int64_t id = row ? sqlite3_column_int64(stmt, 0) : 0;
    sqlite3_finalize(stmt);
    if (!row) return absl::UnavailableError("the audit database cannot be read");
    return id;
  }

  // Inserts `records` (with their ids; ids already there are skipped) in transactions of at
  // most kImportBatch records, offering the core to other threads every kYieldEvery inserts
  // while `may_yield()`. On failure the records of the failed transaction and after are not
  // in the database.
  absl::Status Import(const std::vector<AuditRecord>& records,
                      absl::FunctionRef<bool()> may_yield = [] { return false; }) {
    for (size_t from = 0; from < records.size(); from += kImportBatch) {
      const size_t to = std::min(records.size(), from + kImportBatch);
      if (!Transaction(records, from, to, may_yield)) {
        return absl::UnavailableError("audit trail cannot be written");
      }
    }
    return absl::OkStatus();
  }

 private:
  Importer() = default;

  bool Transaction(const std::vector<AuditRecord>& records, size_t from, size_t to,
                   absl::FunctionRef<bool()> may_yield) {
    const int begun = sqlite3_step(begin_);
    sqlite3_reset(begin_);
    if (begun != SQLITE_DONE) return false;
    for (size_t i = from; i < to; ++i) {
      if ((i - from) % kYieldEvery == kYieldEvery - 1 && may_yield()) {
        sched_yield();  // returns at once when nothing else is runnable
      }
      const AuditRecord& r = records[i];
      sqlite3_reset(insert_);
      sqlite3_bind_int64(insert_, 1, r.id);
      sqlite3_bind_int64(insert_, 2, absl::ToUnixMicros(r.time));
      // The record outlives the statement's step: no copies (SQLITE_STATIC).
      auto text = [this](int i, const std::string& s) {
        sqlite3_bind_text(insert_, i, s.data(), static_cast<int>(s.size()), SQLITE_STATIC);
      };
      text(3, r.caller);
      text(4, r.method);
      text(5, r.rule_set);
      text(6, r.digest);
      text(7, r.pseudonym);
      text(8, r.evaluation_id);
      text(9, r.top_suggestions);
      sqlite3_bind_int(insert_, 10, r.status_code);
      sqlite3_bind_int64(insert_, 11, r.latency_us);
      if (sqlite3_step(insert_) != SQLITE_DONE) {
        sqlite3_reset(insert_);
        sqlite3_exec(db_, "ROLLBACK", nullptr, nullptr, nullptr);
        return false;
      }
    }
    sqlite3_reset(insert_);
    const int committed = sqlite3_step(commit_);
    sqlite3_reset(commit_);
    if (committed != SQLITE_DONE) {
      sqlite3_exec(db_, "ROLLBACK", nullptr, nullptr, nullptr);
      return false;
    }
    return true;
  }

  sqlite3* db_ = nullptr;
  sqlite3_stmt* begin_ = nullptr;
  sqlite3_stmt* insert_ = nullptr;
  sqlite3_stmt* commit_ = nullptr;
};

// The journal's two files: the current one, and the previous one until the records it holds
// are durably in the database (see SyncLoop).
std::string OldJournalPath(const std::string& db_path) { return JournalPath(db_path) + ".old"; }

// A call's record is committed once it is written to the journal (see journal.h); the
// database gets it later. Writing is combined: a caller that finds nobody writing becomes
// the leader and writes its own record and whatever others queued meanwhile, one write()
// per batch, and answers them all from its own thread, until the queue is empty; a caller
// that finds a leader at work queues its record and returns (never blocks). At one call in
// flight the record is thus written and the call answered on the calling thread, with no
// other thread woken. (Handing a long queue over to a thread of the store's own was tried:
// when that thread was busy importing, every call waited for the import.)
// Three threads of the store's own, none on a call's path: the importer moves journaled
// records into SQLite in large transactions (every sync_interval, or once kImportBatch
// wait), without waiting for the disk; the syncer fsyncs the journal every sync_interval
// (what bounds a power failure's loss), checkpoints what was imported (which makes it
// durable in the database) and then removes the previous journal file once all its
// records are; the watchdog answers UNAVAILABLE
// for records not written within max_wait (a stuck disk). A record's callback is claimed
// under mu_ by whoever answers it first, and only ever called outside mu_. The journal
// moves to a new file (the old one renamed) once it passes journal_rotate_bytes, by the leader, so
// that nothing ever waits for a file to be emptied.
// What OpenSqliteAudit found and replayed.
struct JournalState {
  int fd = -1;              // the journal, open for appending, its torn tail cut off
  int64_t bytes = 0;        // its size
  int old_fd = -1;          // the previous journal, if one was left
  int64_t old_last_id = 0;  // its last record
  int64_t next_id = 1;
  int64_t imported_through = 0;  // every record up to it is in the database (not yet synced)
};

class JournalAuditSink final : public AuditSink {
 public:
  JournalAuditSink(std::unique_ptr<Importer> importer, sqlite3* checkpointer,
                   const JournalState& state, const SqliteAuditOptions& options)
      : options_(options),
        period_(options.sync_interval > absl::ZeroDuration() ? options.sync_interval
                                                             : absl::Seconds(1)),
        import_batch_(std::min(kImportBatch,
                               static_cast<size_t>(std::max(1, options.max_queued / 4)))),
        journal_(JournalPath(options.path)),
        old_journal_(OldJournalPath(options.path)),
        importer_(std::move(importer)),
        checkpointer_(checkpointer),
        fd_(state.fd),
        old_fd_(state.old_fd),
        old_last_id_(state.old_last_id),
        next_id_(state.next_id),
        journal_bytes_(state.bytes),
        imported_through_(state.imported_through),
        import_thread_([this] {
          pthread_setname_np(pthread_self(), "audit-import");  // for top -H and profiles
          ImportLoop();
        }),
        syncer_([this] {
          pthread_setname_np(pthread_self(), "audit-syncer");
          SyncLoop();
        }),
        watchdog_([this] {
          pthread_setname_np(pthread_self(), "audit-watchdog");
          WatchLoop();
        }) {}

  ~JournalAuditSink() override {
    {
      absl::MutexLock lock(&mu_);
      stopping_ = true;
      import_cv_.Signal();
      sync_cv_.Signal();
      watch_cv_.Signal();
    }
    import_thread_.join();  // writes what is queued, imports the rest
    syncer_.join();
    watchdog_.join();
    // Everything journaled is imported unless the database failed: once a checkpoint has
    // synced it, the journal has nothing left to keep.
    bool all_imported;
    {
      absl::MutexLock lock(&mu_);
      all_imported = unimported_.empty() && journal_ok_;
    }
    if (all_imported && importer_->Checkpoint()) {
      if (old_fd_ >= 0) unlink(old_journal_.c_str());
      if (ftruncate(fd_, 0) == 0) fdatasync(fd_);
    }
    if (old_fd_ >= 0) close(old_fd_);
    close(fd_);
    sqlite3_close(checkpointer_);
  }

  int QueueDepth() const override {
    absl::MutexLock lock(&mu_);
    return static_cast<int>(queue_.size() + unimported_.size() + importing_);
  }

  void RecordAsync(AuditRecord record, Done done) override {
    mu_.Lock();
    absl::Status refused;
    if (stopping_ || !journal_ok_ || !database_ok_) {
      // !database_ok_: the journal would still take records, but they could not be imported
      // (a full disk): take no more until the database can be written again.
      refused = absl::UnavailableError("audit trail cannot be written: call refused unaudited");
    } else if (static_cast<int>(queue_.size() + unimported_.size()) >= options_.max_queued) {
      refused = absl::UnavailableError("audit trail cannot keep up: call refused unaudited");
    }
    if (!refused.ok()) {
      mu_.Unlock();
      std::move(done)(std::move(refused));
      return;
    }
    queue_.push_back(Item{std::move(record), std::move(done), absl::Now()});
    if (writing_) {  // the leader writes it
      mu_.Unlock();
      return;
    }
    writing_ = true;
    LeadLocked();
    mu_.Unlock();
  }

  absl::StatusOr<std::vector<AuditRecord>> Query(const AuditQuery& query) const override {
    // Reads the journal, then the database (connections of its own, read-only): every
    // answered record is in one of them.
    return QuerySqliteAudit(options_.path, query);
  }

 private:
  struct Item {
    AuditRecord record;
    Done done;  // null once answered (by the watchdog)
    absl::Time queued;
  };

  // Writes queue_ to the journal batch by batch and answers each record, until the queue
  // is empty. REQUIRES: writing_ set by this thread.
  void LeadLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    while (!queue_.empty()) {
      if (journal_bytes_ >= options_.journal_rotate_bytes && old_fd_ < 0 && journal_ok_) {
        RotateLocked();
      }
      batch_.swap(queue_);
      const int64_t first_id = next_id_;
      next_id_ += static_cast<int64_t>(batch_.size());
      write_started_ = absl::Now();
      in_write_ = true;
      const int fd = fd_;
      const int64_t offset = journal_bytes_;
      mu_.Unlock();
      const absl::Status status = WriteBatch(fd, first_id, offset);
      mu_.Lock();
      in_write_ = false;
      if (status.ok()) {
        journal_bytes_ += static_cast<int64_t>(encoded_.size());
        const size_t before = unimported_.size();
        for (Item& item : batch_) unimported_.push_back(std::move(item.record));
        if (before < import_batch_ && unimported_.size() >= import_batch_) import_cv_.Signal();
      }
      mu_.Unlock();
      // writing_ is still ours: batch_ is not touched by anyone else meanwhile.
      for (Item& item : batch_) {
        if (item.done) std::move(item.done)(status);
      }
      batch_.clear();
      mu_.Lock();
    }
    writing_ = false;
  }

  // Moves the journal aside (it becomes the old one, retired by the syncer) and starts a new
  // one. Two metadata operations, once per journal_rotate_bytes of records. The syncer fsyncs the
  // directory before it next counts on the new file.
  void RotateLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (rename(journal_.c_str(), old_journal_.c_str()) != 0) return;  // try again later
    const int fd = open(journal_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_APPEND | O_CLOEXEC,
                        0600);
    if (fd < 0) {
      // The old file still is the journal: back under its name, or nothing more is written.
      if (rename(old_journal_.c_str(), journal_.c_str()) != 0) journal_ok_ = false;
      return;
    }
    old_fd_ = fd_;
    old_last_id_ = next_id_ - 1;
    fd_ = fd;
    journal_bytes_ = 0;
    rotated_ = true;
  }

  // Appends batch_ (numbered from `first_id`) to the journal `fd` at `offset`, its current
  // end. Runs without mu_ but as the only writer.
  absl::Status WriteBatch(int fd, int64_t first_id, int64_t offset) ABSL_LOCKS_EXCLUDED(mu_) {
    encoded_.clear();
    int64_t id = first_id;
    for (Item& item : batch_) {
      item.record.id = id++;
      AppendJournalFrame(item.record, &encoded_);
    }
    if (options_.commit_delay > absl::ZeroDuration()) absl::SleepFor(options_.commit_delay);
    size_t written = 0;
    while (written < encoded_.size()) {
      const ssize_t n = write(fd, encoded_.data() + written, encoded_.size() - written);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) break;
      written += static_cast<size_t>(n);
    }
    bool ok = written == encoded_.size();
    // sync_interval zero: on disk before anyone is answered. After a failed fsync the kernel
    // may have dropped the pages, so the journal is not trusted again.
    bool trusted = true;
    if (ok && options_.sync_interval <= absl::ZeroDuration() && fdatasync(fd) != 0) {
      ok = false;
      trusted = false;
    }
    if (!ok && written > 0 && trusted) {
      // A partial frame would hide every later record from a replay: cut it off.
      trusted = ftruncate(fd, offset) == 0;
    }
    if (!trusted) {
      absl::MutexLock lock(&mu_);
      journal_ok_ = false;
    }
    return ok ? absl::OkStatus() : absl::UnavailableError("audit trail cannot be written");
  }

  void ImportLoop() ABSL_LOCKS_EXCLUDED(mu_) {
    absl::MutexLock lock(&mu_);
    while (true) {
      const absl::Time deadline = absl::Now() + period_;
      while (!stopping_ && unimported_.size() < import_batch_) {
        if (import_cv_.WaitWithDeadline(&mu_, deadline)) break;  // timed out
      }
      if (stopping_) {
        // Let a leader finish: what it writes is imported below.
        auto settled = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return !writing_; };
        mu_.Await(absl::Condition(&settled));
      }
      ImportLocked();
      if (stopping_) break;
    }
    import_done_ = true;
    sync_cv_.Signal();
  }

  // Imports what has been journaled so far. On failure the records wait for the next round
  // (new ones are refused meanwhile).
  void ImportLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (unimported_.empty()) return;
    std::vector<AuditRecord>& records = import_buffer_;  // keeps its capacity
    records.swap(unimported_);
    importing_ = records.size();
    mu_.Unlock();
    // Asked every kYieldEvery inserts (~100 µs): a brief lock beside the calls' own.
    const absl::Status status = importer_->Import(records, [this] {
      absl::MutexLock lock(&mu_);
      return unimported_.size() < import_batch_;
    });
    const int64_t last_id = records.back().id;
    // Imported records are freed before taking mu_ again (a batch's thousands of strings),
    // not under the lock every call's RecordAsync takes.
    if (status.ok()) records.clear();
    mu_.Lock();
    importing_ = 0;
    database_ok_ = status.ok();
    if (status.ok()) {
      imported_through_ = last_id;
    } else {
      // In id order: the ones that failed, then any journaled meanwhile.
      for (AuditRecord& r : unimported_) records.push_back(std::move(r));
      unimported_.swap(records);
    }
    records.clear();
  }

  // Every sync_interval: fsyncs the journal (and, after a rotation, its directory), so a
  // power failure loses at most that much; checkpoints what was imported since the last
  // round, on a connection of its own (this makes it durable in the database, and lets the
  // next import start the WAL over); then, once the old journal's records are all
  // checkpointed, the old file goes. Blocks nobody: the calls and imports go on meanwhile.
  // Once the importer has stopped, one last round.
  void SyncLoop() ABSL_LOCKS_EXCLUDED(mu_) {
    bool last = false;
    int64_t checkpointed = 0;  // every id up to it is durably in the database
    while (!last) {
      int fd;
      int old_fd;
      bool rotated;
      int64_t imported;
      int64_t old_last_id;
      {
        absl::MutexLock lock(&mu_);
        if (!import_done_) sync_cv_.WaitWithTimeout(&mu_, period_);
        last = import_done_;
        fd = fd_;  // only this thread closes a journal: safe to use after unlocking
        old_fd = old_fd_;
        rotated = rotated_;
        rotated_ = false;
        imported = imported_through_;
        old_last_id = old_last_id_;
      }
      if (rotated) {
        // The new file's name, and the old one's, must survive a power failure too.
        const std::string dir = journal_.substr(0, journal_.find_last_of('/') + 1);
        const int dir_fd =
            open(dir.empty() ? "." : dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (dir_fd >= 0) {
          fsync(dir_fd);
          close(dir_fd);
        }
        if (old_fd >= 0) fdatasync(old_fd);
      }
      if (options_.sync_interval > absl::ZeroDuration()) fdatasync(fd);
      if (imported > checkpointed && Importer::Checkpoint(checkpointer_)) checkpointed = imported;
      if (old_fd >= 0 && checkpointed >= old_last_id && unlink(old_journal_.c_str()) == 0) {
        absl::MutexLock lock(&mu_);
        close(old_fd_);
        old_fd_ = -1;
      }
    }
  }

  // Answers UNAVAILABLE for records waiting longer than max_wait, whether queued behind a
  // leader or in a write that does not return. Looks every max_wait / 2, so no call wakes it.
  void WatchLoop() ABSL_LOCKS_EXCLUDED(mu_) {
    const absl::Duration tick = std::max(options_.max_wait / 2, absl::Milliseconds(1));
    std::vector<Done> late;
    while (true) {
      {
        absl::MutexLock lock(&mu_);
        if (!stopping_) watch_cv_.WaitWithTimeout(&mu_, tick);
        if (stopping_) return;  // the leaders answer whatever is left
        const absl::Time now = absl::Now();
        if (in_write_ && now - write_started_ >= options_.max_wait) {
          for (Item& item : batch_) Claim(item, &late);
        }
        for (Item& item : queue_) {
          if (now - item.queued < options_.max_wait) break;  // queued in arrival order
          Claim(item, &late);
        }
      }
      for (Done& done : late) {
        std::move(done)(absl::UnavailableError("audit trail too slow: call refused unaudited"));
      }
      late.clear();
    }
  }

  static void Claim(Item& item, std::vector<Done>* late) {
    if (!item.done) return;
    late->push_back(std::move(item.done));
    item.done = nullptr;
  }

  const SqliteAuditOptions options_;
  const absl::Duration period_;  // of imports and syncs
  const size_t import_batch_;
  const std::string journal_;
  const std::string old_journal_;
  const std::unique_ptr<Importer> importer_;  // the importer thread's
  sqlite3* const checkpointer_;               // the syncer thread's connection

  mutable absl::Mutex mu_;
  absl::CondVar import_cv_;  // wakes the importer: a full batch, stopping
  absl::CondVar sync_cv_;    // wakes the syncer: the importer has stopped
  absl::CondVar watch_cv_;   // wakes the watchdog: stopping
  std::vector<Item> queue_ ABSL_GUARDED_BY(mu_);  // waiting for a leader
  // Set while a leader owns the journal's end, batch_ and encoded_.
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  // The batch being written and answered. Its records are the leader's alone; their
  // callbacks are claimed under mu_ (the watchdog may take them while in_write_).
  std::vector<Item> batch_;
  std::string encoded_;  // the leader's: batch_'s frames
  bool in_write_ ABSL_GUARDED_BY(mu_) = false;
  absl::Time write_started_ ABSL_GUARDED_BY(mu_);
  int fd_ ABSL_GUARDED_BY(mu_);            // the journal, O_APPEND
  int old_fd_ ABSL_GUARDED_BY(mu_);          // the previous journal until retired, or -1
  int64_t old_last_id_ ABSL_GUARDED_BY(mu_);  // the last record in the old journal
  bool rotated_ ABSL_GUARDED_BY(mu_) = false;     // since the syncer's last round
  int64_t next_id_ ABSL_GUARDED_BY(mu_);
  int64_t journal_bytes_ ABSL_GUARDED_BY(mu_);
  std::vector<AuditRecord> unimported_ ABSL_GUARDED_BY(mu_);  // journaled, id order
  size_t importing_ ABSL_GUARDED_BY(mu_) = 0;  // records in the importer's hands
  int64_t imported_through_ ABSL_GUARDED_BY(mu_);  // every id up to it is imported
  std::vector<AuditRecord> import_buffer_;      // the importer's, between rounds empty
  bool journal_ok_ ABSL_GUARDED_BY(mu_) = true;   // false after a write it could not undo
  bool database_ok_ ABSL_GUARDED_BY(mu_) = true;  // false while imports fail
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  bool import_done_ ABSL_GUARDED_BY(mu_) = false;

  std::thread import_thread_;
  std::thread syncer_;
  std::thread watchdog_;
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

// HMAC-SHA256 (RFC 2104) with both keyed halves hashed once: SHA-256 contexts that have
// absorbed the key's inner and outer pad blocks. Each pseudonym copies them, so it costs the
// message's own compression rounds only. EVP_MAC's keyed context, duplicated per call,
// cost some 11 k instructions per pseudonym (a third of what auditing a call cost); this
// a third of that.
class Pseudonymizer::Keyed {
 public:
  explicit Keyed(const std::string& key) {
    constexpr size_t kBlock = 64;  // SHA-256's block size
    sha256_ = EVP_MD_fetch(nullptr, "SHA256", nullptr);
    inner_ = EVP_MD_CTX_new();
    outer_ = EVP_MD_CTX_new();
    if (sha256_ == nullptr || inner_ == nullptr || outer_ == nullptr) return;
    unsigned char block[kBlock] = {};
    if (key.size() > kBlock) {  // a longer key is hashed first
      unsigned int length = 0;
      if (EVP_Digest(key.data(), key.size(), block, &length, sha256_, nullptr) != 1) return;
    } else {
      memcpy(block, key.data(), key.size());
    }
    unsigned char ipad[kBlock];
    unsigned char opad[kBlock];
    for (size_t i = 0; i < kBlock; ++i) {
      ipad[i] = block[i] ^ 0x36;
      opad[i] = block[i] ^ 0x5c;
    }
    ok_ = EVP_DigestInit_ex(inner_, sha256_, nullptr) == 1 &&
          EVP_DigestUpdate(inner_, ipad, kBlock) == 1 &&
          EVP_DigestInit_ex(outer_, sha256_, nullptr) == 1 &&
          EVP_DigestUpdate(outer_, opad, kBlock) == 1;
    OPENSSL_cleanse(block, kBlock);
    OPENSSL_cleanse(ipad, kBlock);
    OPENSSL_cleanse(opad, kBlock);
  }
  ~Keyed() {
    EVP_MD_CTX_free(inner_);
    EVP_MD_CTX_free(outer_);
    EVP_MD_free(sha256_);
  }
  Keyed(const Keyed&) = delete;
  Keyed& operator=(const Keyed&) = delete;

  // Lower-case hex HMAC of `data`; "" when OpenSSL fails (then no pseudonym is recorded
  // rather than a wrong one).
  std::string Mac(const std::string& data) const {
    if (!ok_) return "";
    // One scratch context per thread, reused: no allocation per pseudonym.
    thread_local std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> scratch(
        EVP_MD_CTX_new(), &EVP_MD_CTX_free);
    EVP_MD_CTX* ctx = scratch.get();
    unsigned char inner[EVP_MAX_MD_SIZE];
    unsigned char mac[EVP_MAX_MD_SIZE];
    unsigned int inner_length = 0;
    unsigned int length = 0;
    const bool ok = ctx != nullptr && EVP_MD_CTX_copy_ex(ctx, inner_) == 1 &&
                    EVP_DigestUpdate(ctx, data.data(), data.size()) == 1 &&
                    EVP_DigestFinal_ex(ctx, inner, &inner_length) == 1 &&
                    EVP_MD_CTX_copy_ex(ctx, outer_) == 1 &&
                    EVP_DigestUpdate(ctx, inner, inner_length) == 1 &&
                    EVP_DigestFinal_ex(ctx, mac, &length) == 1;
    if (!ok) return "";
    return absl::BytesToHexString(absl::string_view(reinterpret_cast<const char*>(mac), length));
  }

 private:
  EVP_MD* sha256_ = nullptr;
  EVP_MD_CTX* inner_ = nullptr;  // absorbed key ^ ipad; only copied after construction
  EVP_MD_CTX* outer_ = nullptr;  // absorbed key ^ opad; ditto
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
  absl::StatusOr<std::unique_ptr<Importer>> importer = Importer::Open(options);
  if (!importer.ok()) return importer.status();
  absl::StatusOr<int64_t> max_id = (*importer)->MaxId();
  if (!max_id.ok()) return max_id.status();
  // Replay: what the journal files hold beyond the database (a crash before their import)
  // goes in first. A torn last frame was never answered OK; it is cut off. The files stay
  // until the syncer has checkpointed their records, as they would have.
  const std::string journal = JournalPath(options.path);
  const std::string old_journal = OldJournalPath(options.path);
  JournalState state;
  state.next_id = *max_id + 1;
  std::vector<AuditRecord> replay;
  bool old_exists = false;
  size_t journal_bytes = 0;
  for (const std::string& path : {old_journal, journal}) {
    absl::StatusOr<std::string> bytes = ReadJournalFile(path);
    if (!bytes.ok()) return bytes.status();
    JournalContents contents = ParseJournal(*bytes, /*check_damage=*/true);
    if (contents.damaged) {
      return absl::DataLossError(absl::StrCat(
          "the audit journal ", path, " is damaged at byte ", contents.valid_bytes,
          " (valid records follow an invalid one); keep a copy, then move it aside to start"));
    }
    if (path == old_journal) {
      old_exists = access(path.c_str(), F_OK) == 0;
      if (!contents.records.empty()) state.old_last_id = contents.records.back().id;
    } else {
      journal_bytes = contents.valid_bytes;
    }
    for (AuditRecord& r : contents.records) {
      if (r.id < state.next_id) continue;  // imported already (or in both files)
      state.next_id = r.id + 1;
      replay.push_back(std::move(r));
    }
  }
  if (!(*importer)->Import(replay).ok()) {
    return absl::UnavailableError(
        absl::StrCat("--audit_db ", options.path, ": cannot import the audit journal"));
  }
  state.imported_through = state.next_id - 1;
  state.fd = open(journal.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
  if (state.fd < 0) {
    return absl::UnavailableError(absl::StrCat("cannot open the audit journal ", journal));
  }
  state.bytes = static_cast<int64_t>(journal_bytes);
  if (ftruncate(state.fd, state.bytes) != 0) {
    close(state.fd);
    return absl::UnavailableError(absl::StrCat("cannot write the audit journal ", journal));
  }
  if (old_exists) state.old_fd = open(old_journal.c_str(), O_RDONLY | O_CLOEXEC);
  // The syncer's connection: it only checkpoints, so no page cache worth keeping.
  sqlite3* checkpointer = nullptr;
  if (sqlite3_open_v2(options.path.c_str(), &checkpointer,
                      SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOMUTEX, nullptr) != SQLITE_OK ||
      sqlite3_exec(checkpointer, "PRAGMA synchronous=NORMAL; PRAGMA cache_size=-64;", nullptr,
                   nullptr, nullptr) != SQLITE_OK) {
    sqlite3_close(checkpointer);
    close(state.fd);
    if (state.old_fd >= 0) close(state.old_fd);
    return absl::UnavailableError(absl::StrCat("--audit_db: cannot open ", options.path));
  }
  sqlite3_busy_timeout(checkpointer, 2000);
  return std::unique_ptr<AuditSink>(
      new JournalAuditSink(*std::move(importer), checkpointer, state, options));
}

namespace internal {

std::string AuditSelectSql(bool by_patient) {
  // By patient: one block of the patient index at a time (?8, the block; ?9, the key).
  // `+pseudonym` keeps SQLite from substituting ?5 into the indexed expression (its
  // constant propagation), which would leave the key column of the index unused.
  return absl::StrCat(
      "SELECT time_us, caller, method, rule_set, digest, pseudonym, evaluation_id, "
      "top_suggestions, status_code, latency_us, id FROM audit WHERE time_us >= ?1 "
      "AND time_us < ?2 AND (?3 = '' OR caller = ?3) "
      "AND (?4 = '' OR rule_set = ?4 OR substr(rule_set, 1, length(?4) + 1) = ?4 || '@') ",
      by_patient ? absl::StrCat("AND ", PatientBlockSql(), " = ?8 AND ", PatientKeySql(),
                                " = ?9 AND +pseudonym = ?5 ")
                 : "AND (?5 = '' OR pseudonym = ?5) ",
      "AND id > ?7 AND id <= ?10 ORDER BY id LIMIT ?6");
}

std::string AuditWindowSql() {
  return "SELECT MIN(id), MAX(id) FROM audit WHERE time_us >= ?1 AND time_us < ?2";
}

}  // namespace internal

namespace {

bool HasPatientIndex(sqlite3* db) {
  sqlite3_stmt* stmt = nullptr;
  const bool found =
      sqlite3_prepare_v2(db,
                         "SELECT 1 FROM sqlite_master WHERE type = 'index' AND "
                         "name = 'audit_patient'",
                         -1, &stmt, nullptr) == SQLITE_OK &&
      sqlite3_step(stmt) == SQLITE_ROW;
  sqlite3_finalize(stmt);
  return found;
}

// AuditQuery's filters, as the SQL of QuerySqliteAudit applies them.
bool Matches(const AuditRecord& r, const AuditQuery& query, int64_t since_us, int64_t until_us) {
  const int64_t time_us = absl::ToUnixMicros(r.time);
  return time_us >= since_us && time_us < until_us &&
         (query.caller.empty() || r.caller == query.caller) &&
         (query.rule_set.empty() || r.rule_set == query.rule_set ||
          (r.rule_set.size() > query.rule_set.size() &&
           r.rule_set.compare(0, query.rule_set.size(), query.rule_set) == 0 &&
           r.rule_set[query.rule_set.size()] == '@')) &&
         (query.pseudonym.empty() || r.pseudonym == query.pseudonym) && r.id > query.after_id;
}

}  // namespace

absl::StatusOr<std::vector<AuditRecord>> QuerySqliteAudit(const std::string& path,
                                                          const AuditQuery& query) {
  // The journal, then the old journal, then the database: a record moves from the journal
  // to the old one (a rename), and the old one goes only once its records are durably in
  // the database, so whatever was answered before this query is in one of the snapshots.
  std::vector<AuditRecord> pending;
  for (const std::string& file : {JournalPath(path), OldJournalPath(path)}) {
    absl::StatusOr<std::string> bytes = ReadJournalFile(file);
    if (!bytes.ok()) return bytes.status();
    // A server may be appending: a partial last frame is not a record yet.
    JournalContents contents = ParseJournal(*bytes, /*check_damage=*/false);
    for (AuditRecord& r : contents.records) pending.push_back(std::move(r));
  }
  std::sort(pending.begin(), pending.end(),
            [](const AuditRecord& a, const AuditRecord& b) { return a.id < b.id; });

  sqlite3* db = nullptr;
  if (sqlite3_open_v2(path.c_str(), &db, SQLITE_OPEN_READONLY, nullptr) != SQLITE_OK) {
    sqlite3_close(db);
    return absl::NotFoundError(absl::StrCat("cannot open the audit database ", path));
  }
  sqlite3_busy_timeout(db, 2000);
  // A database no server has opened since the patient index came has no such index: then
  // the table is scanned.
  const bool by_patient = !query.pseudonym.empty() && HasPatientIndex(db);
  const std::string sql = internal::AuditSelectSql(by_patient);
  sqlite3_stmt* stmt = nullptr;
  sqlite3_stmt* max_id = nullptr;
  sqlite3_stmt* window = nullptr;
  if (sqlite3_prepare_v2(db, sql.c_str(), -1, &stmt, nullptr) != SQLITE_OK ||
      sqlite3_prepare_v2(db, "SELECT COALESCE(MAX(id), 0) FROM audit", -1, &max_id, nullptr) !=
          SQLITE_OK ||
      sqlite3_prepare_v2(db, internal::AuditWindowSql().c_str(), -1, &window, nullptr) !=
          SQLITE_OK) {
    const std::string message = sqlite3_errmsg(db);
    sqlite3_finalize(stmt);
    sqlite3_finalize(max_id);
    sqlite3_finalize(window);
    sqlite3_close(db);
    return absl::FailedPreconditionError(absl::StrCat(path, " is not an audit database: ", message));
  }
  auto micros = [](absl::Time t, int64_t fallback) {
    if (t == absl::InfinitePast() || t == absl::InfiniteFuture()) return fallback;
    return absl::ToUnixMicros(t);
  };
  const int64_t since_us = micros(query.since, INT64_MIN);
  const int64_t until_us = micros(query.until, INT64_MAX);
  sqlite3_bind_int64(stmt, 1, since_us);
  sqlite3_bind_int64(stmt, 2, until_us);
  sqlite3_bind_text(stmt, 3, query.caller.c_str(), -1, SQLITE_TRANSIENT);
  sqlite3_bind_text(stmt, 4, query.rule_set.c_str(), -1, SQLITE_TRANSIENT);
  sqlite3_bind_text(stmt, 5, query.pseudonym.c_str(), -1, SQLITE_TRANSIENT);
  const std::string patient_key = query.pseudonym.substr(0, kPatientKeyDigits);
  if (by_patient) sqlite3_bind_text(stmt, 9, patient_key.c_str(), -1, SQLITE_STATIC);
  std::vector<AuditRecord> records;
  auto text = [stmt](int i) {
    const unsigned char* t = sqlite3_column_text(stmt, i);
    return t == nullptr ? std::string() : std::string(reinterpret_cast<const char*>(t));
  };
  // One read transaction: the largest id and the rows come from the same snapshot.
  sqlite3_exec(db, "BEGIN", nullptr, nullptr, nullptr);
  int rc = sqlite3_step(max_id);
  const int64_t imported = rc == SQLITE_ROW ? sqlite3_column_int64(max_id, 0) : 0;
  // A time window: the ids its rows have, from the time index (ids follow the clock only
  // roughly, so the lowest and highest of the window's rows, not the first and last found);
  // the rows are then read along the ids between them instead of from the first one.
  int64_t first_id = std::max<int64_t>(query.after_id, 0) + 1;
  int64_t last_id = imported;
  if (rc == SQLITE_ROW && (since_us != INT64_MIN || until_us != INT64_MAX)) {
    sqlite3_bind_int64(window, 1, since_us);
    sqlite3_bind_int64(window, 2, until_us);
    rc = sqlite3_step(window);
    if (rc == SQLITE_ROW && sqlite3_column_type(window, 0) == SQLITE_NULL) {
      last_id = 0;  // no row in the window
    } else if (rc == SQLITE_ROW) {
      first_id = std::max<int64_t>(first_id, sqlite3_column_int64(window, 0));
      last_id = std::min<int64_t>(last_id, sqlite3_column_int64(window, 1));
    }
  }
  sqlite3_bind_int64(stmt, 7, first_id - 1);
  sqlite3_bind_int64(stmt, 10, last_id);
  // The blocks to look in, in id order; without the patient index, the one statement.
  int64_t block = by_patient ? first_id >> kPatientBlockBits : 0;
  const int64_t last_block = by_patient ? last_id >> kPatientBlockBits : 0;
  for (; rc == SQLITE_ROW && first_id <= last_id && block <= last_block &&
         static_cast<int>(records.size()) < query.limit;
       ++block) {
    sqlite3_reset(stmt);
    sqlite3_bind_int(stmt, 6, query.limit - static_cast<int>(records.size()));
    if (by_patient) sqlite3_bind_int64(stmt, 8, block);
    int step;
    while ((step = sqlite3_step(stmt)) == SQLITE_ROW) {
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
    if (step != SQLITE_DONE) rc = step;
  }
  sqlite3_exec(db, "COMMIT", nullptr, nullptr, nullptr);
  sqlite3_finalize(max_id);
  sqlite3_finalize(window);
  sqlite3_finalize(stmt);
  sqlite3_close(db);
  if (rc != SQLITE_ROW) return absl::UnavailableError("the audit database cannot be read");
  // Then the journal's records not imported yet: all of them have larger ids.
  int64_t last = imported;
  for (AuditRecord& r : pending) {
    if (static_cast<int>(records.size()) >= query.limit) break;
    if (r.id > last && Matches(r, query, since_us, until_us)) {
      last = r.id;
      records.push_back(std::move(r));
    }
  }
  return records;
}

}  // namespace cds::audit
