// The audit trail against the real cds-server (issue 6, part 3): every call that returned OK
// before a SIGKILL under concurrent load is in the trail after it (its journal at once, the
// SQLite database once the server restarts); patient
// references are stored only as HMAC-SHA256 pseudonyms; lifecycle calls are recorded; a
// store that cannot keep up fails calls closed with UNAVAILABLE.

#include <signal.h>
#include <sqlite3.h>
#include <stdlib.h>

#include <atomic>
#include <chrono>
#include <functional>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "cds/v1/audit.grpc.pb.h"
#include "cds/v1/service.grpc.pb.h"
#include "google/rpc/error_details.pb.h"
#include "google/rpc/status.pb.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "server/audit/audit_log.h"
#include "server/audit/journal.h"
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

// Rows of `sql` (one text column) from the database file at `path` alone.
std::vector<std::string> QueryDatabase(const std::string& path, const std::string& sql) {
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

// The whole audit trail at `path` as it stands, in a database of its own under `scratch`:
// a copy of the database (SQLite's backup API: the server may be writing) into which the
// journal's records not imported yet are replayed, as a restarted server would. The journal
// is copied first: the server imports a record before its journal lets go of it.
std::string TrailSnapshot(const std::string& path, const std::string& scratch) {
  static std::atomic<int> snapshots{0};
  const std::string copy = absl::StrCat(scratch, "/trail-", snapshots.fetch_add(1), ".db");
  EXPECT_TRUE(WriteFile(audit::JournalPath(copy), ReadFileOrEmpty(audit::JournalPath(path))));
  sqlite3* from = nullptr;
  sqlite3* to = nullptr;
  EXPECT_EQ(sqlite3_open_v2(path.c_str(), &from, SQLITE_OPEN_READONLY, nullptr), SQLITE_OK);
  EXPECT_EQ(sqlite3_open(copy.c_str(), &to), SQLITE_OK);
  sqlite3_backup* backup = sqlite3_backup_init(to, "main", from, "main");
  EXPECT_NE(backup, nullptr) << sqlite3_errmsg(to);
  if (backup != nullptr) {
    EXPECT_EQ(sqlite3_backup_step(backup, -1), SQLITE_DONE);
    sqlite3_backup_finish(backup);
  }
  sqlite3_close(from);
  sqlite3_close(to);
  audit::SqliteAuditOptions options;
  options.path = copy;
  absl::StatusOr<std::unique_ptr<audit::AuditSink>> replayed = audit::OpenSqliteAudit(options);
  EXPECT_TRUE(replayed.ok()) << replayed.status();
  return copy;
}

// Rows of `sql` (one text column) from the whole audit trail of the server whose database
// is `path`: what it imported and what its journal still holds.
std::vector<std::string> Query(const std::string& path, const std::string& sql) {
  const std::string scratch = path.substr(0, path.rfind('/'));
  return QueryDatabase(TrailSnapshot(path, scratch), sql);
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
  EXPECT_FALSE(absl::StrContains(ReadFileOrEmpty(audit::JournalPath(db)), kRefPrefix));
  const std::vector<std::string> rule_sets =
      Query(db, "SELECT DISTINCT rule_set || ' ' || substr(digest, 1, 7) FROM audit");
  ASSERT_EQ(rule_sets.size(), 1u);
  EXPECT_EQ(rule_sets[0], "ipex@1.1.1 sha256:");

  // Restarted on the same database, the server first imports what only its journal held
  // (the calls answered since the last import), then goes on appending.
  ServerProcess again;
  ASSERT_TRUE(again.Start(CDS_SERVER_BINARY, Flags(dir_), &error)) << error;
  const std::vector<std::string> imported = QueryDatabase(db, "SELECT evaluation_id FROM audit");
  const std::set<std::string> in_database(imported.begin(), imported.end());
  missing = 0;
  for (const std::string& id : ok_ids) missing += in_database.count(id) == 0;
  EXPECT_EQ(missing, 0) << "of " << ok_ids.size() << " calls answered OK";
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

  // Through the server (plaintext here; see authz_test for mutual TLS and roles): the server
  // pseudonymises the reference itself, no key on the client.
  r = testing::RunCommand(
      {CDSCTL_BINARY, "audit", "--server", server.address(), "--patient-ref", "patient-a"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(lines(r.out).size(), 2u) << r.out;
  EXPECT_FALSE(absl::StrContains(r.out, "patient-a")) << r.out;
  r = testing::RunCommand({CDSCTL_BINARY, "audit", "--server", server.address(), "--rule-set",
                           "ipex", "--limit", "3", "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(lines(r.out).size(), 3u) << r.out;
  r = testing::RunCommand({CDSCTL_BINARY, "audit", "--server", server.address(), "--patient-ref",
                           "patient-a", "--audit-key", key});
  EXPECT_EQ(r.exit_code, 2) << r.err;  // the key is for --db only
  r = testing::RunCommand({CDSCTL_BINARY, "audit", "--server", server.address(), "--pseudonym",
                           "not-hex"});
  EXPECT_EQ(r.exit_code, 5) << r.err;  // INVALID_ARGUMENT from the server
  EXPECT_TRUE(absl::StrContains(r.err, "pseudonym")) << r.err;
}

// Every method leaves one record, whether it succeeds or fails: evaluations, streams (each
// patient, or the stream itself when it carries none), rule-set reads, lifecycle calls and
// audit queries; the status code recorded is the one the client saw.
TEST_F(AuditTest, EveryMethodLeavesARecordIncludingFailedCalls) {
  ServerProcess server;
  std::string error;
  ASSERT_TRUE(server.Start(CDS_SERVER_BINARY, Flags(dir_), &error)) << error;
  auto channel = grpc::CreateChannel(server.address(), grpc::InsecureChannelCredentials());
  auto stub = cds::v1::DecisionSupport::NewStub(channel);
  auto admin = cds::v1::RuleSetAdmin::NewStub(channel);
  auto audit = cds::v1::AuditService::NewStub(channel);
  std::vector<std::string> expected;
  auto expect = [&](const std::string& method, const grpc::Status& status) {
    expected.push_back(absl::StrCat(method, " ", status.error_code()));
  };
  auto context = [] {
    auto c = std::make_unique<grpc::ClientContext>();
    c->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    return c;
  };
  const std::string ds = "/cds.v1.DecisionSupport/";
  const std::string ra = "/cds.v1.RuleSetAdmin/";
  {
    cds::v1::EvaluateResponse response;
    grpc::Status s = stub->Evaluate(context().get(), Request("every-a"), &response);
    EXPECT_TRUE(s.ok());
    expect(ds + "Evaluate", s);
    cds::v1::EvaluateRequest bad = Request("every-b");
    bad.set_rule_set("nosuch");
    s = stub->Evaluate(context().get(), bad, &response);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::NOT_FOUND);
    expect(ds + "Evaluate", s);
  }
  for (int patients : {2, 0}) {
    auto c = context();
    auto stream = stub->EvaluateStream(c.get());
    for (int i = 0; i < patients; ++i) {
      cds::v1::StreamEvaluateRequest request;
      *request.mutable_request() = Request("stream");
      ASSERT_TRUE(stream->Write(request));
    }
    stream->WritesDone();
    cds::v1::StreamEvaluateResponse response;
    while (stream->Read(&response)) expect(ds + "EvaluateStream", grpc::Status::OK);
    const grpc::Status s = stream->Finish();
    EXPECT_TRUE(s.ok());
    if (patients == 0) expect(ds + "EvaluateStream", s);
  }
  {
    cds::v1::ListRuleSetsResponse response;
    grpc::Status s = stub->ListRuleSets(context().get(), cds::v1::ListRuleSetsRequest(), &response);
    EXPECT_TRUE(s.ok());
    expect(ds + "ListRuleSets", s);
    cds::v1::GetRuleSetRequest get;
    get.set_name("ipex");
    cds::v1::GetRuleSetResponse got;
    s = stub->GetRuleSet(context().get(), get, &got);
    EXPECT_TRUE(s.ok());
    expect(ds + "GetRuleSet", s);
    get.set_version("9.9.9");
    s = stub->GetRuleSet(context().get(), get, &got);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::NOT_FOUND);
    expect(ds + "GetRuleSet", s);
    s = stub->GetRuleSet(context().get(), cds::v1::GetRuleSetRequest(), &got);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    expect(ds + "GetRuleSet", s);
  }
  {
    cds::v1::PublishRuleSetRequest publish;
    publish.set_bundle("not a bundle");
    cds::v1::PublishRuleSetResponse published;
    grpc::Status s = admin->PublishRuleSet(context().get(), publish, &published);
    EXPECT_FALSE(s.ok());
    expect(ra + "PublishRuleSet", s);
    cds::v1::SetLabelRequest label;
    label.set_name("ipex");
    label.set_label("canary");
    label.set_version("9.9.9");
    cds::v1::SetLabelResponse labelled;
    s = admin->SetLabel(context().get(), label, &labelled);
    EXPECT_FALSE(s.ok());
    expect(ra + "SetLabel", s);
    cds::v1::RetireRuleSetRequest retire;
    cds::v1::RetireRuleSetResponse retired;
    s = admin->RetireRuleSet(context().get(), retire, &retired);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    expect(ra + "RetireRuleSet", s);
  }
  {
    cds::v1::QueryAuditRequest bad;
    bad.set_pseudonym("not-hex");
    cds::v1::QueryAuditResponse response;
    grpc::Status s = audit->QueryAudit(context().get(), bad, &response);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    expect("/cds.v1.AuditService/QueryAudit", s);
  }
  cds::v1::QueryAuditRequest all;
  all.set_page_size(1000);
  cds::v1::QueryAuditResponse response;
  const grpc::Status s = audit->QueryAudit(context().get(), all, &response);
  ASSERT_TRUE(s.ok()) << s.error_message();
  std::vector<std::string> recorded;
  for (const cds::v1::AuditEntry& e : response.entries()) {
    recorded.push_back(absl::StrCat(e.method(), " ", e.status_code()));
  }
  EXPECT_EQ(recorded, expected);
}

// QueryAudit: filters, pages, pseudonyms computed by the server from a raw reference that
// it never stores, logs or echoes.
TEST_F(AuditTest, QueryAuditFiltersAndPagesWithoutKeepingTheRawReference) {
  ServerProcess server;
  std::string error;
  ASSERT_TRUE(server.Start(CDS_SERVER_BINARY, Flags(dir_), &error)) << error;
  auto channel = grpc::CreateChannel(server.address(), grpc::InsecureChannelCredentials());
  auto stub = cds::v1::DecisionSupport::NewStub(channel);
  auto audit = cds::v1::AuditService::NewStub(channel);
  const std::string kRaw = "RAW-REF-query-8d2f0b";
  for (const std::string& ref : {kRaw, std::string("other"), kRaw, kRaw, kRaw}) {
    grpc::ClientContext context;
    cds::v1::EvaluateResponse response;
    ASSERT_TRUE(stub->Evaluate(&context, Request(ref), &response).ok());
  }
  auto query = [&](const cds::v1::QueryAuditRequest& request,
                   cds::v1::QueryAuditResponse* response) {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    return audit->QueryAudit(&context, request, response);
  };
  // By raw reference, two per page: pages of 2, 2 then none left. (Up to now: the queries
  // themselves are recorded under the same pseudonym.)
  cds::v1::QueryAuditRequest request;
  request.set_patient_reference(kRaw);
  request.set_page_size(2);
  const absl::Time now = absl::Now();
  request.mutable_until()->set_seconds(absl::ToUnixSeconds(now));
  request.mutable_until()->set_nanos(static_cast<int32_t>(
      absl::ToInt64Nanoseconds(now - absl::FromUnixSeconds(absl::ToUnixSeconds(now)))));
  std::vector<std::string> pseudonyms;
  int pages = 0;
  while (true) {
    cds::v1::QueryAuditResponse response;
    const grpc::Status s = query(request, &response);
    ASSERT_TRUE(s.ok()) << s.error_message();
    ++pages;
    for (const auto& e : response.entries()) {
      pseudonyms.push_back(e.pseudonym());
      EXPECT_EQ(e.method(), "/cds.v1.DecisionSupport/Evaluate");
      EXPECT_EQ(e.rule_set(), "ipex@1.1.1");
      EXPECT_EQ(e.status_code(), 0);
      EXPECT_FALSE(e.evaluation_id().empty());
    }
    if (response.next_page_token().empty()) break;
    request.set_page_token(response.next_page_token());
    ASSERT_LT(pages, 10);
  }
  EXPECT_EQ(pages, 2);
  ASSERT_EQ(pseudonyms.size(), 4u);
  EXPECT_EQ(pseudonyms[0].size(), 64u);
  for (const std::string& p : pseudonyms) EXPECT_EQ(p, pseudonyms[0]);
  // By pseudonym, the same records; by time range and method-independent filters.
  cds::v1::QueryAuditRequest by_pseudonym;
  *by_pseudonym.mutable_until() = request.until();
  by_pseudonym.set_pseudonym(pseudonyms[0]);
  cds::v1::QueryAuditResponse response;
  ASSERT_TRUE(query(by_pseudonym, &response).ok());
  EXPECT_EQ(response.entries_size(), 4);
  cds::v1::QueryAuditRequest future;
  future.mutable_since()->set_seconds(absl::ToUnixSeconds(absl::Now()) + 3600);
  ASSERT_TRUE(query(future, &response).ok());
  EXPECT_EQ(response.entries_size(), 0);
  cds::v1::QueryAuditRequest by_version;
  *by_version.mutable_until() = request.until();
  by_version.set_rule_set("ipex@1.0.0");
  ASSERT_TRUE(query(by_version, &response).ok());
  EXPECT_EQ(response.entries_size(), 0);
  by_version.set_rule_set("ipex");
  ASSERT_TRUE(query(by_version, &response).ok());
  EXPECT_EQ(response.entries_size(), 5);
  // Malformed filters: INVALID_ARGUMENT with one field violation each, never the reference.
  struct Bad {
    std::function<void(cds::v1::QueryAuditRequest*)> mutate;
    std::string field;
  };
  const std::vector<Bad> bad = {
      {[](auto* r) { r->set_pseudonym("ABC"); }, "pseudonym"},
      {[&](auto* r) { r->set_patient_reference(kRaw + std::string(300, 'x')); },
       "patient_reference"},
      {[](auto* r) { r->set_patient_reference(""); }, "patient_reference"},
      {[](auto* r) { r->set_page_size(5000); }, "page_size"},
      {[](auto* r) { r->set_page_size(-1); }, "page_size"},
      {[](auto* r) { r->set_page_token("abc"); }, "page_token"},
      {[](auto* r) { r->set_rule_set("ipex@1@2"); }, "rule_set"},
      {[](auto* r) { r->set_rule_set("ip ex"); }, "rule_set"},
      {[](auto* r) { r->set_caller(std::string(300, 'c')); }, "caller"},
      {[](auto* r) { r->mutable_since()->set_nanos(-1); }, "since"},
      {[](auto* r) {
         r->mutable_since()->set_seconds(2000000000);
         r->mutable_until()->set_seconds(1000000000);
       },
       "until"},
  };
  for (const Bad& b : bad) {
    cds::v1::QueryAuditRequest r;
    b.mutate(&r);
    SCOPED_TRACE(b.field);
    const grpc::Status s = query(r, &response);
    ASSERT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << s.error_message();
    EXPECT_TRUE(absl::StartsWith(s.error_message(), b.field + " ")) << s.error_message();
    google::rpc::Status details;
    ASSERT_TRUE(details.ParseFromString(s.error_details()));
    ASSERT_EQ(details.details_size(), 1);
    google::rpc::BadRequest bad_request;
    ASSERT_TRUE(details.details(0).UnpackTo(&bad_request));
    ASSERT_EQ(bad_request.field_violations_size(), 1);
    EXPECT_EQ(bad_request.field_violations(0).field(), b.field);
    EXPECT_FALSE(absl::StrContains(s.error_message(), kRaw));
    EXPECT_FALSE(absl::StrContains(s.error_details(), kRaw));
  }
  // The queries are audited under the pseudonym; the raw reference is nowhere.
  cds::v1::QueryAuditRequest queries;
  queries.set_pseudonym(pseudonyms[0]);
  ASSERT_TRUE(query(queries, &response).ok());
  int query_records = 0;
  for (const auto& e : response.entries()) {
    query_records += e.method() == "/cds.v1.AuditService/QueryAudit";
  }
  EXPECT_EQ(query_records, 3);  // two pages by reference, one by pseudonym
  ASSERT_EQ(server.Stop(SIGTERM), 0);
  const std::string db = dir_.path() + "/audit.db";
  EXPECT_FALSE(absl::StrContains(server.Stderr(), kRaw));
  EXPECT_FALSE(absl::StrContains(ReadFileOrEmpty(db), kRaw));
  EXPECT_FALSE(absl::StrContains(ReadFileOrEmpty(db + "-wal"), kRaw));
}

TEST_F(AuditTest, QueryAuditWithoutAnAuditTrailIsFailedPrecondition) {
  ServerProcess server;
  std::string error;
  ASSERT_TRUE(server.Start(CDS_SERVER_BINARY,
                           {"--listen", "127.0.0.1:0", "--rules_dir", kSourceDir + "/rules",
                            "--drain", "0s", "--poll_interval", "0"},
                           &error))
      << error;
  auto channel = grpc::CreateChannel(server.address(), grpc::InsecureChannelCredentials());
  grpc::ClientContext context;
  cds::v1::QueryAuditResponse response;
  const grpc::Status status = cds::v1::AuditService::NewStub(channel)->QueryAudit(
      &context, cds::v1::QueryAuditRequest(), &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << status.error_message();
}

// Streamed patients are answered once their records are committed (several share a
// commit), in order; each answered OK is in the database.
TEST_F(AuditTest, EveryStreamedPatientAnsweredOkIsInTheDatabase) {
  ServerProcess server;
  std::string error;
  ASSERT_TRUE(server.Start(CDS_SERVER_BINARY, Flags(dir_), &error)) << error;
  auto channel = grpc::CreateChannel(server.address(), grpc::InsecureChannelCredentials());
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
  auto stream = cds::v1::DecisionSupport::NewStub(channel)->EvaluateStream(&context);
  constexpr int kPatients = 60;
  for (int i = 0; i < kPatients; ++i) {
    cds::v1::StreamEvaluateRequest request;
    request.set_correlation_id(absl::StrCat(i));
    *request.mutable_request() = Request(absl::StrCat("streamed-", i));
    if (i == 7) request.mutable_request()->mutable_patient()->set_sex(cds::v1::SEX_UNSPECIFIED);
    ASSERT_TRUE(stream->Write(request));
  }
  stream->WritesDone();
  std::vector<std::string> ids;
  cds::v1::StreamEvaluateResponse response;
  int n = 0;
  while (stream->Read(&response)) {
    EXPECT_EQ(response.correlation_id(), absl::StrCat(n));
    if (n == 7) {
      EXPECT_EQ(response.error().code(), static_cast<int>(grpc::StatusCode::INVALID_ARGUMENT));
    } else {
      EXPECT_FALSE(response.has_error()) << response.error().message();
      ids.push_back(response.response().evaluation_id());
    }
    ++n;
  }
  ASSERT_TRUE(stream->Finish().ok());
  ASSERT_EQ(n, kPatients);
  const std::vector<std::string> rows =
      Query(dir_.path() + "/audit.db",
            "SELECT evaluation_id FROM audit WHERE method = "
            "'/cds.v1.DecisionSupport/EvaluateStream' AND status_code = 0");
  const std::set<std::string> recorded(rows.begin(), rows.end());
  for (const std::string& id : ids) EXPECT_EQ(recorded.count(id), 1u) << id;
  EXPECT_EQ(Query(dir_.path() + "/audit.db",
                  "SELECT COUNT(*) FROM audit WHERE status_code = 3")[0],
            "1");
}

TEST_F(AuditTest, StreamedPatientsFailClosedWhenTheStoreCannotKeepUp) {
  ServerProcess server;
  std::string error;
  setenv("CDS_TEST_AUDIT_COMMIT_DELAY", "3s", 1);
  const bool started = server.Start(CDS_SERVER_BINARY, Flags(dir_), &error);
  unsetenv("CDS_TEST_AUDIT_COMMIT_DELAY");
  ASSERT_TRUE(started) << error;
  auto channel = grpc::CreateChannel(server.address(), grpc::InsecureChannelCredentials());
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  auto stream = cds::v1::DecisionSupport::NewStub(channel)->EvaluateStream(&context);
  for (int i = 0; i < 3; ++i) {
    cds::v1::StreamEvaluateRequest request;
    *request.mutable_request() = Request(absl::StrCat("slow-", i));
    ASSERT_TRUE(stream->Write(request));
  }
  stream->WritesDone();
  cds::v1::StreamEvaluateResponse response;
  int n = 0;
  while (stream->Read(&response)) {
    EXPECT_EQ(response.error().code(), static_cast<int>(grpc::StatusCode::UNAVAILABLE));
    EXPECT_TRUE(absl::StrContains(response.error().message(), "audit"));
    EXPECT_FALSE(response.has_response());
    ++n;
  }
  EXPECT_EQ(n, 3);
  EXPECT_TRUE(stream->Finish().ok());
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
