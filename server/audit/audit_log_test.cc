#include "server/audit/audit_log.h"

#include <signal.h>
#include <sqlite3.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gtest/gtest.h"
#include "server/audit/journal.h"

namespace cds::audit {
namespace {

// A scratch database path, removed (with its WAL) at the end.
class TempDb {
 public:
  TempDb() {
    char dir[] = "/tmp/cds_audit_test_XXXXXX";
    dir_ = mkdtemp(dir);
    path_ = dir_ + "/audit.db";
  }
  ~TempDb() { std::system(("rm -rf '" + dir_ + "'").c_str()); }
  const std::string& path() const { return path_; }

 private:
  std::string dir_;
  std::string path_;
};

AuditRecord MakeRecord(const std::string& rule_set, const std::string& pseudonym = "") {
  AuditRecord r;
  r.time = absl::Now();
  r.caller = "alice";
  r.method = "/cds.v1.DecisionSupport/Evaluate";
  r.rule_set = rule_set;
  r.pseudonym = pseudonym;
  return r;
}

// Collects the outcome of RecordAsync and how many times it was delivered.
struct Outcome {
  absl::Notification done;
  std::atomic<int> calls{0};
  absl::Status status;
  AuditSink::Done Callback() {
    return [this](absl::Status s) {
      status = std::move(s);
      if (calls.fetch_add(1) == 0) done.Notify();
    };
  }
};

TEST(PseudonymizerTest, IsHmacSha256InLowerCaseHex) {
  // RFC 4231, test case 2.
  EXPECT_EQ(Pseudonymizer("Jefe").Of("what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
  EXPECT_EQ(Pseudonymizer("Jefe").Of(""), "");
  // Test case 6: a key longer than SHA-256's block is hashed first.
  EXPECT_EQ(Pseudonymizer(std::string(131, '\xaa'))
                .Of("Test Using Larger Than Block-Size Key - Hash Key First"),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54");
  // Test case 4: a key of 25 bytes.
  std::string key;
  for (char c = 1; c <= 25; ++c) key.push_back(c);
  EXPECT_EQ(Pseudonymizer(key).Of(std::string(50, '\xcd')),
            "82558a389a443c0ea4cc819899f2083a85f0faa3e578f8077a2e3ff46729665b");
  // Concurrent callers share the keyed contexts.
  std::vector<std::thread> threads;
  const Pseudonymizer shared("Jefe");
  std::atomic<int> wrong{0};
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 200; ++i) {
        wrong += shared.Of("what do ya want for nothing?") !=
                 "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843";
      }
    });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(wrong.load(), 0);
}

TEST(SqliteAuditTest, AnswersEachRecordOnceAfterItsCommit) {
  TempDb db;
  SqliteAuditOptions options;
  options.path = db.path();
  absl::StatusOr<std::unique_ptr<AuditSink>> sink = OpenSqliteAudit(options);
  ASSERT_TRUE(sink.ok()) << sink.status();
  constexpr int kRecords = 200;
  std::vector<std::unique_ptr<Outcome>> outcomes;
  for (int i = 0; i < kRecords; ++i) outcomes.push_back(std::make_unique<Outcome>());
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int i = t; i < kRecords; i += 4) {
        (*sink)->RecordAsync(MakeRecord(absl::StrCat("ipex@1.0.", i)), outcomes[i]->Callback());
      }
    });
  }
  for (std::thread& t : threads) t.join();
  for (auto& o : outcomes) {
    ASSERT_TRUE(o->done.WaitForNotificationWithTimeout(absl::Seconds(10)));
    EXPECT_TRUE(o->status.ok()) << o->status;
  }
  AuditQuery all;
  all.limit = 1000;
  absl::StatusOr<std::vector<AuditRecord>> records = (*sink)->Query(all);
  ASSERT_TRUE(records.ok()) << records.status();
  EXPECT_EQ(records->size(), static_cast<size_t>(kRecords));
  for (size_t i = 1; i < records->size(); ++i) EXPECT_GT((*records)[i].id, (*records)[i - 1].id);
  for (auto& o : outcomes) EXPECT_EQ(o->calls.load(), 1);
}

// Writes `count` records of a few hundred bytes each, waiting for every commit.
void WriteRecords(AuditSink& sink, int count) {
  for (int i = 0; i < count; ++i) {
    AuditRecord r = MakeRecord("ipex@1.1.0", std::string(64, 'a' + i % 26));
    r.top_suggestions = std::string(200, 'x');
    ASSERT_TRUE(sink.Record(std::move(r)).ok());
  }
}

// Rows in the database file alone (not the journal), read as any SQLite client would.
int64_t DatabaseRows(const std::string& path, const std::string& where = "1") {
  sqlite3* db = nullptr;
  int64_t rows = -1;
  if (sqlite3_open_v2(path.c_str(), &db, SQLITE_OPEN_READONLY, nullptr) == SQLITE_OK) {
    sqlite3_stmt* stmt = nullptr;
    const std::string sql = "SELECT COUNT(*) FROM audit WHERE " + where;
    if (sqlite3_prepare_v2(db, sql.c_str(), -1, &stmt, nullptr) == SQLITE_OK &&
        sqlite3_step(stmt) == SQLITE_ROW) {
      rows = sqlite3_column_int64(stmt, 0);
    }
    sqlite3_finalize(stmt);
  }
  sqlite3_close(db);
  return rows;
}

int64_t FileSize(const std::string& path) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  return in ? static_cast<int64_t>(in.tellg()) : -1;
}

void WriteJournal(const std::string& db_path, const std::string& bytes) {
  std::ofstream out(JournalPath(db_path), std::ios::binary | std::ios::trunc);
  out << bytes;
}

std::string Frames(int64_t from, int64_t to) {
  std::string out;
  for (int64_t id = from; id <= to; ++id) {
    AuditRecord r = MakeRecord(absl::StrCat("ipex@1.0.", id));
    r.id = id;
    AppendJournalFrame(r, &out);
  }
  return out;
}

TEST(SqliteAuditTest, ImportsIntoTheDatabaseWithinTheSyncInterval) {
  TempDb db;
  SqliteAuditOptions options;
  options.path = db.path();
  options.sync_interval = absl::Milliseconds(50);
  absl::StatusOr<std::unique_ptr<AuditSink>> sink = OpenSqliteAudit(options);
  ASSERT_TRUE(sink.ok()) << sink.status();
  WriteRecords(**sink, 100);
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  while (DatabaseRows(db.path()) < 100 && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(10));
  }
  EXPECT_EQ(DatabaseRows(db.path()), 100) << "the importer did not catch up";
}

TEST(SqliteAuditTest, QueriesSeeRecordsNotImportedYet) {
  TempDb db;
  SqliteAuditOptions options;
  options.path = db.path();
  options.sync_interval = absl::Hours(1);  // no import while the sink is open
  absl::StatusOr<std::unique_ptr<AuditSink>> sink = OpenSqliteAudit(options);
  ASSERT_TRUE(sink.ok()) << sink.status();
  WriteRecords(**sink, 10);
  ASSERT_TRUE((*sink)->Record(MakeRecord("ipex@1.0.0", "feed")).ok());
  EXPECT_EQ(DatabaseRows(db.path()), 0);
  EXPECT_GT(FileSize(JournalPath(db.path())), 0);
  AuditQuery all;
  absl::StatusOr<std::vector<AuditRecord>> records = (*sink)->Query(all);
  ASSERT_TRUE(records.ok()) << records.status();
  EXPECT_EQ(records->size(), 11u);
  AuditQuery one;
  one.pseudonym = "feed";
  records = QuerySqliteAudit(db.path(), one);  // what cdsctl audit --db reads
  ASSERT_TRUE(records.ok()) << records.status();
  ASSERT_EQ(records->size(), 1u);
  EXPECT_EQ((*records)[0].rule_set, "ipex@1.0.0");
  EXPECT_EQ((*records)[0].id, 11);
  // Closing imports the rest and empties the journal.
  sink->reset();
  EXPECT_EQ(DatabaseRows(db.path()), 11);
  EXPECT_EQ(FileSize(JournalPath(db.path())), 0);
}

TEST(SqliteAuditTest, OpeningReplaysTheJournalPastTheDatabase) {
  TempDb db;
  SqliteAuditOptions options;
  options.path = db.path();
  {
    absl::StatusOr<std::unique_ptr<AuditSink>> sink = OpenSqliteAudit(options);
    ASSERT_TRUE(sink.ok()) << sink.status();
    WriteRecords(**sink, 3);  // ids 1..3, imported when the sink closes
  }
  ASSERT_EQ(DatabaseRows(db.path()), 3);
  // What a crash leaves: records 2..5 journaled, 2 and 3 already imported, and half a frame
  // of a record never answered.
  const std::string sixth = Frames(6, 6);
  WriteJournal(db.path(), Frames(2, 5) + sixth.substr(0, sixth.size() / 2));
  absl::StatusOr<std::unique_ptr<AuditSink>> sink = OpenSqliteAudit(options);
  ASSERT_TRUE(sink.ok()) << sink.status();
  EXPECT_EQ(DatabaseRows(db.path()), 5);  // replayed before the sink takes calls
  EXPECT_EQ(DatabaseRows(db.path(), "rule_set = 'ipex@1.0.4'"), 1);
  EXPECT_EQ(DatabaseRows(db.path(), "rule_set = 'ipex@1.0.2'"), 0);  // id 2 stayed as it was
  // The torn frame is cut off; the rest stays until checkpointed and rotated away.
  EXPECT_EQ(FileSize(JournalPath(db.path())), static_cast<int64_t>(Frames(2, 5).size()));
  // New records continue after the largest id seen, the torn one's included or not.
  ASSERT_TRUE((*sink)->Record(MakeRecord("ipex@2.0.0")).ok());
  AuditQuery query;
  query.rule_set = "ipex@2.0.0";
  absl::StatusOr<std::vector<AuditRecord>> records = (*sink)->Query(query);
  ASSERT_TRUE(records.ok());
  ASSERT_EQ(records->size(), 1u);
  EXPECT_EQ((*records)[0].id, 6);
}

TEST(SqliteAuditTest, TheJournalMovesToANewFileAndTheOldOneGoesOnceImported) {
  TempDb db;
  SqliteAuditOptions options;
  options.path = db.path();
  options.sync_interval = absl::Milliseconds(20);
  options.journal_rotate_bytes = 4096;  // some ten records
  absl::StatusOr<std::unique_ptr<AuditSink>> sink = OpenSqliteAudit(options);
  ASSERT_TRUE(sink.ok()) << sink.status();
  for (int round = 0; round < 5; ++round) {
    WriteRecords(**sink, 30);
    AuditQuery all;
    all.limit = 10000;
    absl::StatusOr<std::vector<AuditRecord>> records = (*sink)->Query(all);
    ASSERT_TRUE(records.ok()) << records.status();
    ASSERT_EQ(records->size(), static_cast<size_t>(30 * (round + 1)));
    for (size_t i = 0; i < records->size(); ++i) EXPECT_EQ((*records)[i].id, int64_t(i) + 1);
    absl::SleepFor(absl::Milliseconds(60));  // the syncer retires the old journal
  }
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  while (FileSize(JournalPath(db.path()) + ".old") >= 0 && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(10));
  }
  EXPECT_EQ(FileSize(JournalPath(db.path()) + ".old"), -1) << "the old journal stayed";
  // The current file holds only what came after the last move (a record's frame is some
  // 350 bytes here).
  EXPECT_LT(FileSize(JournalPath(db.path())), 150 * 300);
  sink->reset();
  EXPECT_EQ(DatabaseRows(db.path()), 150);
  EXPECT_EQ(FileSize(JournalPath(db.path())), 0);
}

// The first column of every row `sql` selects from the database at `path` (read-only).
std::multiset<std::string> TextColumn(const std::string& path, const std::string& sql) {
  std::multiset<std::string> values;
  sqlite3* db = nullptr;
  if (sqlite3_open_v2(path.c_str(), &db, SQLITE_OPEN_READONLY, nullptr) == SQLITE_OK) {
    sqlite3_stmt* stmt = nullptr;
    if (sqlite3_prepare_v2(db, sql.c_str(), -1, &stmt, nullptr) == SQLITE_OK) {
      while (sqlite3_step(stmt) == SQLITE_ROW) {
        values.insert(reinterpret_cast<const char*>(sqlite3_column_text(stmt, 0)));
      }
    }
    sqlite3_finalize(stmt);
  }
  sqlite3_close(db);
  return values;
}

// The rule sets of the database's records that start with `prefix`.
std::multiset<std::string> RuleSetsIn(const std::string& path, const std::string& prefix) {
  return TextColumn(path,
                    absl::StrCat("SELECT rule_set FROM audit WHERE rule_set LIKE '", prefix, "%'"));
}

// A server killed (SIGKILL: no destructor, no flush) while it records, its journal moving
// to new files and the importer and syncer at work: opened again, the store holds every
// record that was answered OK, once.
TEST(SqliteAuditTest, EveryRecordAnsweredBeforeASigkillIsReplayed) {
  TempDb db;
  SqliteAuditOptions options;
  options.path = db.path();
  options.sync_interval = absl::Milliseconds(5);
  options.journal_rotate_bytes = 16 << 10;  // some 50 records
  for (int round = 0; round < 3; ++round) {
    const std::string prefix = absl::StrCat("kill@", round, ".");
    int answered[2];
    ASSERT_EQ(pipe(answered), 0);
    const pid_t child = fork();
    ASSERT_GE(child, 0);
    if (child == 0) {
      // Reports the rule set of each record answered OK, and goes on until killed.
      close(answered[0]);
      absl::StatusOr<std::unique_ptr<AuditSink>> sink = OpenSqliteAudit(options);
      if (!sink.ok()) _exit(2);
      for (int i = 0;; ++i) {
        const std::string rule_set = absl::StrCat(prefix, i);
        if (!(*sink)->Record(MakeRecord(rule_set, std::string(64, 'p'))).ok()) _exit(3);
        const std::string line = rule_set + "\n";
        if (write(answered[1], line.data(), line.size()) != static_cast<ssize_t>(line.size())) {
          _exit(4);
        }
      }
    }
    close(answered[1]);
    // Some 2000 records (dozens of journal files), then the kill, mid-stream.
    std::string reported;
    char buffer[4096];
    const absl::Time deadline = absl::Now() + absl::Seconds(60);
    while (std::count(reported.begin(), reported.end(), '\n') < 2000 && absl::Now() < deadline) {
      const ssize_t n = read(answered[0], buffer, sizeof buffer);
      if (n <= 0) break;
      reported.append(buffer, static_cast<size_t>(n));
    }
    kill(child, SIGKILL);
    // What it reported before dying was answered before the kill.
    for (ssize_t n; (n = read(answered[0], buffer, sizeof buffer)) > 0;) {
      reported.append(buffer, static_cast<size_t>(n));
    }
    close(answered[0]);
    int status = 0;
    ASSERT_EQ(waitpid(child, &status, 0), child);
    ASSERT_TRUE(WIFSIGNALED(status)) << "the child stopped on its own: " << status;
    std::set<std::string> want;
    std::istringstream lines(reported);
    for (std::string line; std::getline(lines, line);) want.insert(line);
    ASSERT_GE(want.size(), 2000u);

    absl::StatusOr<std::unique_ptr<AuditSink>> sink = OpenSqliteAudit(options);
    ASSERT_TRUE(sink.ok()) << sink.status();
    const std::multiset<std::string> got = RuleSetsIn(db.path(), prefix);
    int missing = 0;
    for (const std::string& rule_set : want) missing += got.count(rule_set) == 0;
    EXPECT_EQ(missing, 0) << "answered OK but not in the store, round " << round;
    EXPECT_EQ(std::set<std::string>(got.begin(), got.end()).size(), got.size()) << "twice";
    // At most the one record journaled but not yet reported when the kill came.
    EXPECT_LE(got.size(), want.size() + 1);
  }
}

TEST(SqliteAuditTest, OpeningReplaysBothJournalFiles) {
  TempDb db;
  SqliteAuditOptions options;
  options.path = db.path();
  // A crash right after a rotation: records 1..4 in the old file, 5..7 in the new one.
  {
    std::ofstream old(JournalPath(db.path()) + ".old", std::ios::binary);
    old << Frames(1, 4);
  }
  WriteJournal(db.path(), Frames(5, 7));
  options.sync_interval = absl::Milliseconds(20);
  absl::StatusOr<std::unique_ptr<AuditSink>> sink = OpenSqliteAudit(options);
  ASSERT_TRUE(sink.ok()) << sink.status();
  EXPECT_EQ(DatabaseRows(db.path()), 7);
  ASSERT_TRUE((*sink)->Record(MakeRecord("ipex@2.0.0")).ok());
  // The syncer checkpoints the replayed records, then removes the old file.
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  while (FileSize(JournalPath(db.path()) + ".old") >= 0 && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(10));
  }
  EXPECT_EQ(FileSize(JournalPath(db.path()) + ".old"), -1);
  AuditQuery all;
  absl::StatusOr<std::vector<AuditRecord>> records = (*sink)->Query(all);
  ASSERT_TRUE(records.ok());
  ASSERT_EQ(records->size(), 8u);
  EXPECT_EQ(records->back().id, 8);
  sink->reset();
  EXPECT_EQ(DatabaseRows(db.path()), 8);
  EXPECT_EQ(FileSize(JournalPath(db.path())), 0);
}

TEST(SqliteAuditTest, ADamagedJournalIsNotGuessedAt) {
  TempDb db;
  SqliteAuditOptions options;
  options.path = db.path();
  std::string bytes = Frames(1, 3);
  bytes[Frames(1, 1).size() + 40] ^= 0x04;  // the second record's CRC no longer matches
  WriteJournal(db.path(), bytes);
  absl::StatusOr<std::unique_ptr<AuditSink>> sink = OpenSqliteAudit(options);
  EXPECT_EQ(sink.status().code(), absl::StatusCode::kDataLoss) << sink.status();
  EXPECT_EQ(FileSize(JournalPath(db.path())), static_cast<int64_t>(bytes.size()));  // kept
}

TEST(SqliteAuditTest, WithoutASyncIntervalRecordsAreJournaledAndQueried) {
  TempDb db;
  SqliteAuditOptions options;
  options.path = db.path();
  options.sync_interval = absl::ZeroDuration();  // every journal write fsynced
  absl::StatusOr<std::unique_ptr<AuditSink>> sink = OpenSqliteAudit(options);
  ASSERT_TRUE(sink.ok()) << sink.status();
  WriteRecords(**sink, 100);
  AuditQuery all;
  absl::StatusOr<std::vector<AuditRecord>> records = (*sink)->Query(all);
  ASSERT_TRUE(records.ok());
  EXPECT_EQ(records->size(), 100u);
}

TEST(SqliteAuditTest, PagesByIdAndMatchesRuleSetNamesExactly) {
  TempDb db;
  SqliteAuditOptions options;
  options.path = db.path();
  absl::StatusOr<std::unique_ptr<AuditSink>> sink = OpenSqliteAudit(options);
  ASSERT_TRUE(sink.ok()) << sink.status();
  for (const char* rule_set : {"ipex@1.0.0", "ipex@1.1.0", "ip_x@1.0.0", "ipexx@1.0.0"}) {
    ASSERT_TRUE((*sink)->Record(MakeRecord(rule_set)).ok());
  }
  AuditQuery query;
  query.rule_set = "ipex";
  query.limit = 1;
  absl::StatusOr<std::vector<AuditRecord>> page = (*sink)->Query(query);
  ASSERT_TRUE(page.ok());
  ASSERT_EQ(page->size(), 1u);
  EXPECT_EQ((*page)[0].rule_set, "ipex@1.0.0");
  query.after_id = (*page)[0].id;
  page = (*sink)->Query(query);
  ASSERT_TRUE(page.ok());
  ASSERT_EQ(page->size(), 1u);
  EXPECT_EQ((*page)[0].rule_set, "ipex@1.1.0");
  query.after_id = (*page)[0].id;
  page = (*sink)->Query(query);
  ASSERT_TRUE(page.ok());
  EXPECT_TRUE(page->empty());  // neither "ip_x" (no wildcards) nor "ipexx"
}

// Runs `sql` on the database at `path` (read-write); false on any error.
bool Exec(const std::string& path, const std::string& sql) {
  sqlite3* db = nullptr;
  const bool ok = sqlite3_open_v2(path.c_str(), &db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE,
                                  nullptr) == SQLITE_OK &&
                  sqlite3_exec(db, sql.c_str(), nullptr, nullptr, nullptr) == SQLITE_OK;
  sqlite3_close(db);
  return ok;
}

// A row with id `id`, recorded at `time_us` (by default, `id` µs after the epoch).
std::string InsertAt(int64_t id, const std::string& pseudonym, int64_t time_us = -1) {
  return absl::StrCat(
      "INSERT INTO audit (id, time_us, caller, method, rule_set, digest, pseudonym, "
      "evaluation_id, top_suggestions, status_code, latency_us) VALUES (",
      id, ", ", time_us < 0 ? id : time_us,
      ", 'alice', '/cds.v1.DecisionSupport/Evaluate', 'ipex@1.1.0', '', '", pseudonym,
      "', '', '', 0, 1);");
}

std::vector<int64_t> IdsOf(const absl::StatusOr<std::vector<AuditRecord>>& records) {
  std::vector<int64_t> ids;
  if (records.ok()) {
    for (const AuditRecord& r : *records) ids.push_back(r.id);
  }
  return ids;
}

// The names of the audit table's indexes.
std::multiset<std::string> IndexesOf(const std::string& path) {
  return TextColumn(path, "SELECT name FROM sqlite_master WHERE type = 'index'");
}

// A patient's records are looked up block by block of 16 384 ids, under the first 8 hex
// digits of the pseudonym: records in several blocks, a neighbour sharing those 8 digits,
// paging across a block's edge, and records still in the journal.
TEST(SqliteAuditTest, FindsAPatientsRecordsInEveryBlock) {
  TempDb db;
  SqliteAuditOptions options;
  options.path = db.path();
  options.sync_interval = absl::Hours(1);
  ASSERT_TRUE(OpenSqliteAudit(options).ok());  // the schema
  const std::string patient = "ab12cd34" + std::string(56, '0');
  const std::string twin = "ab12cd34" + std::string(56, 'f');  // the same index key
  std::string rows;
  for (int64_t id : {3, 16383, 16384, 50000}) rows += InsertAt(id, patient);
  for (int64_t id : {16385, 50001}) rows += InsertAt(id, twin);
  rows += InsertAt(50002, "");
  ASSERT_TRUE(Exec(db.path(), rows));

  AuditQuery query;
  query.pseudonym = patient;
  EXPECT_EQ(IdsOf(QuerySqliteAudit(db.path(), query)),
            (std::vector<int64_t>{3, 16383, 16384, 50000}));
  query.pseudonym = twin;
  EXPECT_EQ(IdsOf(QuerySqliteAudit(db.path(), query)), (std::vector<int64_t>{16385, 50001}));
  query.pseudonym = patient;
  query.limit = 2;
  EXPECT_EQ(IdsOf(QuerySqliteAudit(db.path(), query)), (std::vector<int64_t>{3, 16383}));
  query.after_id = 16383;
  EXPECT_EQ(IdsOf(QuerySqliteAudit(db.path(), query)), (std::vector<int64_t>{16384, 50000}));

  absl::StatusOr<std::unique_ptr<AuditSink>> sink = OpenSqliteAudit(options);
  ASSERT_TRUE(sink.ok()) << sink.status();
  ASSERT_TRUE((*sink)->Record(MakeRecord("ipex@1.1.1", patient)).ok());  // journaled only
  query.after_id = 16384;
  EXPECT_EQ(IdsOf((*sink)->Query(query)), (std::vector<int64_t>{50000, 50003}));
}

// SQLite's EXPLAIN QUERY PLAN of `sql` on the database at `path`, one step per line (or the
// error that kept it from preparing).
std::string QueryPlanOf(const std::string& path, const std::string& sql) {
  sqlite3* handle = nullptr;
  std::string plan;
  sqlite3_stmt* stmt = nullptr;
  if (sqlite3_open_v2(path.c_str(), &handle, SQLITE_OPEN_READONLY, nullptr) != SQLITE_OK ||
      sqlite3_prepare_v2(handle, ("EXPLAIN QUERY PLAN " + sql).c_str(), -1, &stmt, nullptr) !=
          SQLITE_OK) {
    plan = sqlite3_errmsg(handle);
  } else {
    while (sqlite3_step(stmt) == SQLITE_ROW) {
      plan += reinterpret_cast<const char*>(sqlite3_column_text(stmt, 3));
      plan += "\n";
    }
  }
  sqlite3_finalize(stmt);
  sqlite3_close(handle);
  return plan;
}

// SQLite's plan for the query by patient seeks both columns of the patient index (its
// constant propagation can quietly leave the second unused: then every query reads a whole
// block of the table).
TEST(SqliteAuditTest, TheQueryByPatientSeeksTheIndex) {
  TempDb db;
  SqliteAuditOptions options;
  options.path = db.path();
  ASSERT_TRUE(OpenSqliteAudit(options).ok());
  const std::string plan = QueryPlanOf(db.path(), internal::AuditSelectSql(/*by_patient=*/true));
  EXPECT_TRUE(absl::StrContains(plan, "USING INDEX audit_patient (<expr>=? AND <expr>=?"))
      << plan;
}

// A time window is looked up in the time index and then read along the ids between its
// lowest and highest: the same records as reading every row, also where the clock went
// back (ids follow it only roughly), with paging, by patient, and for an empty window.
TEST(SqliteAuditTest, TimeWindowsFindTheSameRecordsAsReadingEveryRow) {
  TempDb db;
  SqliteAuditOptions options;
  options.path = db.path();
  options.sync_interval = absl::Hours(1);
  ASSERT_TRUE(OpenSqliteAudit(options).ok());  // the schema
  const std::string patient = "ab12cd34" + std::string(56, '0');
  // Times of ids 1..40000: 10 µs apart, except that the clock steps back 500 µs at id
  // 20000 and ids 30000..30009 carry times from far back and far ahead.
  auto time_of = [](int64_t id) -> int64_t {
    if (id >= 30000 && id < 30005) return 15;
    if (id >= 30005 && id < 30010) return 1000000;
    return id * 10 - (id >= 20000 ? 500 : 0);
  };
  std::string rows = "BEGIN;";
  for (int64_t id = 1; id <= 40000; ++id) {
    rows += InsertAt(id, id % 7 == 0 ? patient : "", time_of(id));
  }
  ASSERT_TRUE(Exec(db.path(), rows + "COMMIT;"));

  struct Window {
    int64_t since, until;
  };
  for (const Window w : {Window{15, 16}, Window{199800, 200000}, Window{199950, 200050},
                         Window{999999, 1000001}, Window{0, 40}, Window{400000, 500000},
                         Window{-1, 350000}, Window{250000, -1}}) {
    for (const bool by_patient : {false, true}) {
      AuditQuery query;
      if (w.since >= 0) query.since = absl::FromUnixMicros(w.since);
      if (w.until >= 0) query.until = absl::FromUnixMicros(w.until);
      if (by_patient) query.pseudonym = patient;
      query.limit = 100000;
      std::vector<int64_t> expected;
      for (int64_t id = 1; id <= 40000; ++id) {
        const int64_t t = time_of(id);
        if ((w.since < 0 || t >= w.since) && (w.until < 0 || t < w.until) &&
            (!by_patient || id % 7 == 0)) {
          expected.push_back(id);
        }
      }
      const std::string where = absl::StrCat("window [", w.since, ", ", w.until, ")",
                                             by_patient ? " by patient" : "");
      EXPECT_EQ(IdsOf(QuerySqliteAudit(db.path(), query)), expected) << where;
      // Paged: three records at a time, from the middle of the window.
      if (expected.size() > 4) {
        query.after_id = expected[1];
        query.limit = 3;
        EXPECT_EQ(IdsOf(QuerySqliteAudit(db.path(), query)),
                  std::vector<int64_t>(expected.begin() + 2, expected.begin() + 5))
            << where;
      }
    }
  }
}

// The window's ids come from the time index alone (a covering index: no row is read), and
// the rows are then read along the ids between them.
TEST(SqliteAuditTest, TheTimeWindowSeeksTheTimeIndex) {
  TempDb db;
  SqliteAuditOptions options;
  options.path = db.path();
  ASSERT_TRUE(OpenSqliteAudit(options).ok());
  const std::string window = QueryPlanOf(db.path(), internal::AuditWindowSql());
  const std::string rows = QueryPlanOf(db.path(), internal::AuditSelectSql(/*by_patient=*/false));
  EXPECT_TRUE(absl::StrContains(window, "USING COVERING INDEX audit_time (time_us>? AND time_us<?)"))
      << window;
  EXPECT_TRUE(absl::StrContains(rows, "USING INTEGER PRIMARY KEY (rowid>? AND rowid<?)")) << rows;
}

// A database from before the patient index: queries by patient still find its records (by
// scanning), and the first server to open it swaps the old index for the new one.
TEST(SqliteAuditTest, OpeningReplacesTheOldPseudonymIndex) {
  TempDb db;
  const std::string patient(64, 'a');
  ASSERT_TRUE(Exec(db.path(),
                   "CREATE TABLE audit (id INTEGER PRIMARY KEY, time_us INTEGER NOT NULL, "
                   "caller TEXT NOT NULL, method TEXT NOT NULL, rule_set TEXT NOT NULL, "
                   "digest TEXT NOT NULL, pseudonym TEXT NOT NULL, evaluation_id TEXT NOT NULL, "
                   "top_suggestions TEXT NOT NULL, status_code INTEGER NOT NULL, "
                   "latency_us INTEGER NOT NULL);"
                   "CREATE INDEX audit_time ON audit(time_us);"
                   "CREATE INDEX audit_pseudonym ON audit(pseudonym);" +
                       InsertAt(1, patient) + InsertAt(2, "") + InsertAt(20000, patient)));
  AuditQuery query;
  query.pseudonym = patient;
  EXPECT_EQ(IdsOf(QuerySqliteAudit(db.path(), query)), (std::vector<int64_t>{1, 20000}));

  SqliteAuditOptions options;
  options.path = db.path();
  ASSERT_TRUE(OpenSqliteAudit(options).ok());
  EXPECT_EQ(IndexesOf(db.path()), (std::multiset<std::string>{"audit_time", "audit_patient"}));
  EXPECT_EQ(IdsOf(QuerySqliteAudit(db.path(), query)), (std::vector<int64_t>{1, 20000}));
}

// Both ways a commit reaches the disk: fsynced in each commit (0), or checkpointed later by
// the syncer. The callers here are threads of their own, as gRPC's would be.
class SlowStoreTest : public testing::TestWithParam<absl::Duration> {};

TEST_P(SlowStoreTest, ASlowStoreAnswersUnavailableOnceAndStillCommits) {
  TempDb db;
  SqliteAuditOptions options;
  options.path = db.path();
  options.sync_interval = GetParam();
  options.commit_delay = absl::Milliseconds(500);
  options.max_wait = absl::Milliseconds(50);
  absl::StatusOr<std::unique_ptr<AuditSink>> sink = OpenSqliteAudit(options);
  ASSERT_TRUE(sink.ok()) << sink.status();
  Outcome outcome;
  const absl::Time start = absl::Now();
  std::thread caller(
      [&] { (*sink)->RecordAsync(MakeRecord("ipex@1.0.0"), outcome.Callback()); });
  ASSERT_TRUE(outcome.done.WaitForNotificationWithTimeout(absl::Seconds(10)));
  EXPECT_EQ(outcome.status.code(), absl::StatusCode::kUnavailable) << outcome.status;
  EXPECT_LT(absl::Now() - start, absl::Milliseconds(450));  // the watchdog, not the commit
  caller.join();
  sink->reset();  // waits for the writer: the commit still happens, answered once
  EXPECT_EQ(outcome.calls.load(), 1);
  AuditQuery all;
  absl::StatusOr<std::vector<AuditRecord>> records = QuerySqliteAudit(db.path(), all);
  ASSERT_TRUE(records.ok());
  EXPECT_EQ(records->size(), 1u);
}

TEST_P(SlowStoreTest, AFullQueueRefusesAtOnce) {
  TempDb db;
  SqliteAuditOptions options;
  options.path = db.path();
  options.sync_interval = GetParam();
  options.commit_delay = absl::Milliseconds(300);
  options.max_queued = 1;
  absl::StatusOr<std::unique_ptr<AuditSink>> sink = OpenSqliteAudit(options);
  ASSERT_TRUE(sink.ok()) << sink.status();
  // The first is being committed (by the writer, sleeping in the commit), the
  // second waits in the queue, the third finds the queue full.
  std::vector<std::unique_ptr<Outcome>> outcomes;
  for (int i = 0; i < 3; ++i) outcomes.push_back(std::make_unique<Outcome>());
  std::thread first(
      [&] { (*sink)->RecordAsync(MakeRecord("ipex@1.0.0"), outcomes[0]->Callback()); });
  absl::SleepFor(absl::Milliseconds(100));
  for (int i = 1; i < 3; ++i) {
    (*sink)->RecordAsync(MakeRecord("ipex@1.0.0"), outcomes[i]->Callback());
  }
  ASSERT_TRUE(outcomes[2]->done.HasBeenNotified());
  EXPECT_EQ(outcomes[2]->status.code(), absl::StatusCode::kUnavailable);
  for (int i = 0; i < 2; ++i) {
    ASSERT_TRUE(outcomes[i]->done.WaitForNotificationWithTimeout(absl::Seconds(10)));
    EXPECT_TRUE(outcomes[i]->status.ok()) << outcomes[i]->status;
  }
  first.join();
}

INSTANTIATE_TEST_SUITE_P(SyncIntervals, SlowStoreTest,
                         testing::Values(absl::ZeroDuration(), absl::Milliseconds(200)),
                         [](const testing::TestParamInfo<absl::Duration>& info) {
                           return info.param == absl::ZeroDuration() ? "FsyncEachCommit"
                                                                     : "DeferredSync";
                         });

TEST(SqliteAuditTest, AStoreThatCannotBeWrittenAnswersUnavailable) {
  TempDb db;
  SqliteAuditOptions options;
  options.path = db.path();
  options.max_pages = 8;
  options.sync_interval = absl::Milliseconds(10);  // imports (which fail) come soon
  absl::StatusOr<std::unique_ptr<AuditSink>> sink = OpenSqliteAudit(options);
  ASSERT_TRUE(sink.ok()) << sink.status();
  absl::Status status;
  int written = 0;
  // Records are taken until an import has failed (the journal takes them; the database
  // cannot): not a fixed count, since when the importer runs depends on the scheduler.
  const absl::Time deadline = absl::Now() + absl::Seconds(30);
  for (int i = 0; status.ok() && absl::Now() < deadline; ++i) {
    status = (*sink)->Record(MakeRecord("ipex@1.0.0", std::string(64, 'a' + i % 6)));
    written += status.ok();
    if (i % 100 == 99) absl::SleepFor(absl::Milliseconds(1));  // stay below max_queued
  }
  EXPECT_GT(written, 0);
  EXPECT_EQ(status.code(), absl::StatusCode::kUnavailable) << status;
  EXPECT_TRUE(absl::StrContains(status.message(), "cannot be written")) << status;
  // Refused from then on; every record answered OK is in the trail (the journal keeps what
  // the database cannot take).
  EXPECT_EQ((*sink)->Record(MakeRecord("ipex@1.0.0")).code(), absl::StatusCode::kUnavailable);
  AuditQuery all;
  all.limit = 10000;
  absl::StatusOr<std::vector<AuditRecord>> records = (*sink)->Query(all);
  ASSERT_TRUE(records.ok()) << records.status();
  EXPECT_EQ(records->size(), static_cast<size_t>(written));
}

}  // namespace
}  // namespace cds::audit
