// The audit trail against the real cds-server (issue 6, part 3): every call that returned OK
// before a SIGKILL under concurrent load is in the SQLite database after it; patient
// references are stored only as HMAC-SHA256 pseudonyms; lifecycle calls are recorded; a
// store that cannot keep up fails calls closed with UNAVAILABLE.

#include <signal.h>
#include <sqlite3.h>
#include <stdlib.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "cds/v1/service.grpc.pb.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "tests/test_util.h"

namespace cds {
namespace {

using ::cds::testing::ReadFileOrEmpty;
using ::cds::testing::ServerProcess;
using ::cds::testing::TempDir;
using ::cds::testing::WriteFile;

const std::string kSourceDir = CDS_SOURCE_DIR;
constexpr char kRefPrefix[] = "audit-raw-ref-";

std::vector<std::string> Flags(const TempDir& dir) {
  return {"--listen",       "127.0.0.1:0",   "--rules_dir",      kSourceDir + "/rules",
          "--state_dir",    dir.path() + "/state", "--drain",    "0s",
          "--poll_interval", "0",            "--audit_db",       dir.path() + "/audit.db",
          "--audit_key_file", dir.path() + "/audit.key"};
}

cds::v1::EvaluateRequest Request(const std::string& reference) {
  cds::v1::EvaluateRequest request;
  request.set_rule_set("ipex");
  cds::v1::Patient* p = request.mutable_patient();
  p->set_reference(reference);
  p->set_sex(cds::v1::MALE);
  p->mutable_age()->set_days(60);
  cds::v1::Finding* f = p->add_findings();
  f->mutable_term()->set_system("HPO");
  f->mutable_term()->set_code("HP:0002041");
  f->set_status(cds::v1::Finding::PRESENT);
  return request;
}

// Rows of `sql` (one text column) from the database at `path`.
std::vector<std::string> Query(const std::string& path, const std::string& sql) {
  std::vector<std::string> rows;
  sqlite3* db = nullptr;
  EXPECT_EQ(sqlite3_open_v2(path.c_str(), &db, SQLITE_OPEN_READONLY, nullptr), SQLITE_OK);
  sqlite3_stmt* stmt = nullptr;
  EXPECT_EQ(sqlite3_prepare_v2(db, sql.c_str(), -1, &stmt, nullptr), SQLITE_OK)
      << sqlite3_errmsg(db);
  while (stmt != nullptr && sqlite3_step(stmt) == SQLITE_ROW) {
    const unsigned char* text = sqlite3_column_text(stmt, 0);
    rows.emplace_back(text == nullptr ? "" : reinterpret_cast<const char*>(text));
  }
  sqlite3_finalize(stmt);
  sqlite3_close(db);
  return rows;
}

class AuditTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(WriteFile(dir_.path() + "/audit.key", std::string(48, 'k') + "secret"));
  }
  TempDir dir_;
};

TEST_F(AuditTest, EveryCallAnsweredOkBeforeSigkillIsInTheDatabase) {
  ServerProcess server;
  std::string error;
  ASSERT_TRUE(server.Start(CDS_SERVER_BINARY, Flags(dir_), &error)) << error;
  auto channel = grpc::CreateChannel(server.address(), grpc::InsecureChannelCredentials());
  auto stub = cds::v1::DecisionSupport::NewStub(channel);

  std::mutex mu;
  std::vector<std::string> ok_ids;  // guarded by mu
  std::atomic<bool> stop{false};
  std::atomic<int> next{0};
  std::vector<std::thread> clients;
  for (int t = 0; t < 8; ++t) {
    clients.emplace_back([&] {
      while (!stop.load()) {
        grpc::ClientContext context;
        context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
        cds::v1::EvaluateResponse response;
        const grpc::Status status =
            stub->Evaluate(&context, Request(absl::StrCat(kRefPrefix, next.fetch_add(1))),
                           &response);
        if (status.ok()) {
          std::lock_guard<std::mutex> lock(mu);
          ok_ids.push_back(response.evaluation_id());
        } else if (status.error_code() == grpc::StatusCode::UNAVAILABLE) {
          return;  // the server is gone
        }
      }
    });
  }
  // Let load build up, then kill the server in the middle of it.
  while (true) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    std::lock_guard<std::mutex> lock(mu);
    if (ok_ids.size() >= 300) break;
  }
  ASSERT_EQ(server.Stop(SIGKILL), 128 + SIGKILL);
  stop.store(true);
  for (std::thread& t : clients) t.join();

  const std::string db = dir_.path() + "/audit.db";
  const std::vector<std::string> rows = Query(db, "SELECT evaluation_id FROM audit");
  const std::set<std::string> recorded(rows.begin(), rows.end());
  int missing = 0;
  for (const std::string& id : ok_ids) missing += recorded.count(id) == 0;
  EXPECT_EQ(missing, 0) << "of " << ok_ids.size() << " calls answered OK";
  EXPECT_GE(ok_ids.size(), 300u);

  // Pseudonyms only: 64 hex digits, never the raw reference, in the database or its WAL.
  for (const std::string& p : Query(db, "SELECT pseudonym FROM audit LIMIT 20")) {
    EXPECT_EQ(p.size(), 64u) << p;
    EXPECT_FALSE(absl::StrContains(p, kRefPrefix));
  }
  EXPECT_FALSE(absl::StrContains(ReadFileOrEmpty(db), kRefPrefix));
  EXPECT_FALSE(absl::StrContains(ReadFileOrEmpty(db + "-wal"), kRefPrefix));
  const std::vector<std::string> rule_sets =
      Query(db, "SELECT DISTINCT rule_set || ' ' || substr(digest, 1, 7) FROM audit");
  ASSERT_EQ(rule_sets.size(), 1u);
  EXPECT_EQ(rule_sets[0], "ipex@1.1.0 sha256:");

  // Restarted on the same database, the server goes on appending.
  ServerProcess again;
  ASSERT_TRUE(again.Start(CDS_SERVER_BINARY, Flags(dir_), &error)) << error;
  auto channel2 = grpc::CreateChannel(again.address(), grpc::InsecureChannelCredentials());
  grpc::ClientContext context;
  cds::v1::EvaluateResponse response;
  ASSERT_TRUE(cds::v1::DecisionSupport::NewStub(channel2)
                  ->Evaluate(&context, Request("after-restart"), &response)
                  .ok());
  EXPECT_EQ(Query(db, absl::StrCat("SELECT evaluation_id FROM audit WHERE evaluation_id = '",
                                   response.evaluation_id(), "'"))
                .size(),
            1u);
}

TEST_F(AuditTest, SamePatientSamePseudonymAndLifecycleCallsAreRecorded) {
  ServerProcess server;
  std::string error;
  ASSERT_TRUE(server.Start(CDS_SERVER_BINARY, Flags(dir_), &error)) << error;
  auto channel = grpc::CreateChannel(server.address(), grpc::InsecureChannelCredentials());
  auto stub = cds::v1::DecisionSupport::NewStub(channel);
  for (const char* ref : {"patient-a", "patient-b", "patient-a"}) {
    grpc::ClientContext context;
    cds::v1::EvaluateResponse response;
    ASSERT_TRUE(stub->Evaluate(&context, Request(ref), &response).ok());
  }
  {
    grpc::ClientContext context;
    cds::v1::EvaluateRequest bad = Request("patient-c");
    bad.mutable_patient()->set_sex(cds::v1::SEX_UNSPECIFIED);
    cds::v1::EvaluateResponse response;
    EXPECT_EQ(stub->Evaluate(&context, bad, &response).error_code(),
              grpc::StatusCode::INVALID_ARGUMENT);
  }
  {
    grpc::ClientContext context;
    cds::v1::SetLabelRequest request;
    request.set_name("ipex");
    request.set_label("stable");
    request.set_version("1.0.0");
    cds::v1::SetLabelResponse response;
    ASSERT_TRUE(cds::v1::RuleSetAdmin::NewStub(channel)->SetLabel(&context, request, &response).ok());
  }
  const std::string db = dir_.path() + "/audit.db";
  const std::vector<std::string> pseudonyms =
      Query(db, "SELECT pseudonym FROM audit WHERE method LIKE '%Evaluate' ORDER BY id");
  ASSERT_EQ(pseudonyms.size(), 4u);
  EXPECT_EQ(pseudonyms[0], pseudonyms[2]);
  EXPECT_NE(pseudonyms[0], pseudonyms[1]);
  EXPECT_EQ(Query(db, "SELECT status_code FROM audit WHERE method LIKE '%Evaluate' ORDER BY id")[3],
            "3");
  EXPECT_EQ(Query(db, "SELECT top_suggestions FROM audit ORDER BY id LIMIT 1")[0].empty(), false);
  const std::vector<std::string> lifecycle =
      Query(db, "SELECT method || ' ' || rule_set || ' ' || status_code FROM audit "
                "WHERE method LIKE '%SetLabel'");
  ASSERT_EQ(lifecycle.size(), 1u);
  EXPECT_EQ(lifecycle[0], "/cds.v1.RuleSetAdmin/SetLabel ipex@1.0.0 0");

  // cdsctl audit: by patient (pseudonym computed with the key), rule version, time, caller.
  auto lines = [](const std::string& text) {
    std::vector<std::string> out;
    for (absl::string_view line : absl::StrSplit(text, '\n', absl::SkipEmpty())) {
      out.emplace_back(line);
    }
    return out;
  };
  const std::string key = dir_.path() + "/audit.key";
  testing::CommandResult r = testing::RunCommand(
      {CDSCTL_BINARY, "audit", "--db", db, "--patient-ref", "patient-a", "--audit-key", key});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(lines(r.out).size(), 2u) << r.out;
  EXPECT_FALSE(absl::StrContains(r.out, "patient-a")) << r.out;
  r = testing::RunCommand({CDSCTL_BINARY, "audit", "--db", db, "--pseudonym", pseudonyms[1]});
  EXPECT_EQ(lines(r.out).size(), 1u) << r.out;
  r = testing::RunCommand({CDSCTL_BINARY, "audit", "--db", db, "--rule-set", "ipex@1.0.0"});
  ASSERT_EQ(lines(r.out).size(), 1u) << r.out;
  EXPECT_TRUE(absl::StrContains(r.out, "SetLabel")) << r.out;
  r = testing::RunCommand({CDSCTL_BINARY, "audit", "--db", db, "--rule-set", "ipex", "--json"});
  EXPECT_EQ(lines(r.out).size(), 5u) << r.out;  // the 4 evaluations and the label
  EXPECT_TRUE(absl::StrContains(r.out, "\"statusCode\":0")) << r.out;
  r = testing::RunCommand({CDSCTL_BINARY, "audit", "--db", db, "--since", "1h"});
  EXPECT_EQ(lines(r.out).size(), 5u) << r.out;
  r = testing::RunCommand({CDSCTL_BINARY, "audit", "--db", db, "--until", "2000-01-01T00:00:00Z"});
  EXPECT_EQ(lines(r.out).size(), 0u) << r.out;
  r = testing::RunCommand({CDSCTL_BINARY, "audit", "--db", db, "--caller", "nobody"});
  EXPECT_EQ(lines(r.out).size(), 0u) << r.out;
  r = testing::RunCommand({CDSCTL_BINARY, "audit", "--db", dir_.path() + "/missing.db"});
  EXPECT_EQ(r.exit_code, 3) << r.err;
}

TEST_F(AuditTest, AStoreThatCannotKeepUpFailsCallsClosed) {
  ServerProcess server;
  std::string error;
  setenv("CDS_TEST_AUDIT_COMMIT_DELAY", "3s", 1);
  const bool started = server.Start(CDS_SERVER_BINARY, Flags(dir_), &error);
  unsetenv("CDS_TEST_AUDIT_COMMIT_DELAY");
  ASSERT_TRUE(started) << error;
  auto channel = grpc::CreateChannel(server.address(), grpc::InsecureChannelCredentials());
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(20));
  cds::v1::EvaluateResponse response;
  const grpc::Status status =
      cds::v1::DecisionSupport::NewStub(channel)->Evaluate(&context, Request("slow"), &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAVAILABLE) << status.error_message();
  EXPECT_TRUE(absl::StrContains(status.error_message(), "audit")) << status.error_message();
}

TEST_F(AuditTest, AStoreThatCannotBeWrittenFailsCallsClosed) {
  ServerProcess server;
  std::string error;
  setenv("CDS_TEST_AUDIT_MAX_PAGES", "8", 1);  // the disk fills up after a few records
  const bool started = server.Start(CDS_SERVER_BINARY, Flags(dir_), &error);
  unsetenv("CDS_TEST_AUDIT_MAX_PAGES");
  ASSERT_TRUE(started) << error;
  auto channel = grpc::CreateChannel(server.address(), grpc::InsecureChannelCredentials());
  auto stub = cds::v1::DecisionSupport::NewStub(channel);
  int ok = 0;
  grpc::Status status;
  for (int i = 0; i < 5000; ++i) {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(20));
    cds::v1::EvaluateResponse response;
    status = stub->Evaluate(&context, Request(absl::StrCat("full-", i)), &response);
    if (!status.ok()) break;
    ++ok;
  }
  EXPECT_GT(ok, 0);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAVAILABLE) << status.error_message();
  EXPECT_TRUE(absl::StrContains(status.error_message(), "audit")) << status.error_message();
  // Every call answered OK is recorded; the refused one is not.
  EXPECT_EQ(Query(dir_.path() + "/audit.db", "SELECT COUNT(*) FROM audit")[0],
            std::to_string(ok));
}

TEST_F(AuditTest, AuditDbNeedsAKey) {
  const testing::CommandResult result =
      testing::RunCommand({CDS_SERVER_BINARY, "--listen", "127.0.0.1:0", "--insecure_dev",
                           "--rules_dir", kSourceDir + "/rules", "--audit_db",
                           dir_.path() + "/audit.db"});
  EXPECT_EQ(result.exit_code, 2);
  EXPECT_TRUE(absl::StrContains(result.err, "--audit_key_file")) << result.err;
}

}  // namespace
}  // namespace cds
