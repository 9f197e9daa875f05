#include "server/audit/audit_log.h"

#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gtest/gtest.h"

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

// Pages in the main database file (its header's size field, big-endian at offset 28): the
// records move there from the WAL only when a checkpoint copies them, after fsyncing the WAL.
uint32_t MainFilePages(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  unsigned char header[32] = {};
  in.read(reinterpret_cast<char*>(header), sizeof header);
  return uint32_t{header[28]} << 24 | uint32_t{header[29]} << 16 | uint32_t{header[30]} << 8 |
         header[31];
}

// Writes `count` records of a few hundred bytes each, waiting for every commit.
void WriteRecords(AuditSink& sink, int count) {
  for (int i = 0; i < count; ++i) {
    AuditRecord r = MakeRecord("ipex@1.1.0", std::string(64, 'a' + i % 26));
    r.top_suggestions = std::string(200, 'x');
    ASSERT_TRUE(sink.Record(std::move(r)).ok());
  }
}

TEST(SqliteAuditTest, SyncerCheckpointsCommitsToTheDatabaseWithinTheInterval) {
  TempDb db;
  SqliteAuditOptions options;
  options.path = db.path();
  options.sync_interval = absl::Milliseconds(50);
  absl::StatusOr<std::unique_ptr<AuditSink>> sink = OpenSqliteAudit(options);
  ASSERT_TRUE(sink.ok()) << sink.status();
  const uint32_t before = MainFilePages(db.path());
  WriteRecords(**sink, 100);  // some 10 pages, far below the automatic checkpoint's 1000
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  while (MainFilePages(db.path()) < before + 5 && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(10));
  }
  EXPECT_GE(MainFilePages(db.path()), before + 5) << "no checkpoint reached the database file";
}

TEST(SqliteAuditTest, WithoutASyncIntervalEveryCommitIsFsyncedAndNothingCheckpointsEarly) {
  TempDb db;
  SqliteAuditOptions options;
  options.path = db.path();
  options.sync_interval = absl::ZeroDuration();
  absl::StatusOr<std::unique_ptr<AuditSink>> sink = OpenSqliteAudit(options);
  ASSERT_TRUE(sink.ok()) << sink.status();
  const uint32_t before = MainFilePages(db.path());
  WriteRecords(**sink, 100);
  absl::SleepFor(absl::Milliseconds(200));
  EXPECT_EQ(MainFilePages(db.path()), before);  // still in the (fsynced) WAL
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
  absl::StatusOr<std::unique_ptr<AuditSink>> sink = OpenSqliteAudit(options);
  ASSERT_TRUE(sink.ok()) << sink.status();
  absl::Status status;
  int written = 0;
  for (int i = 0; i < 5000 && status.ok(); ++i) {
    status = (*sink)->Record(MakeRecord("ipex@1.0.0", std::string(64, 'a' + i % 6)));
    written += status.ok();
  }
  EXPECT_GT(written, 0);
  EXPECT_EQ(status.code(), absl::StatusCode::kUnavailable) << status;
}

}  // namespace
}  // namespace cds::audit
