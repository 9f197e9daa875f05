// Roles (issue 6, part 2) against the real cds-server with mutual TLS and an access
// policy: every method x every role, plus no certificate, an unknown identity, an expired
// certificate, a certificate from another CA and development bearer tokens, each with the
// expected status. Certificates are made in the test by scripts/make-dev-certs.sh.

#include <signal.h>
#include <sqlite3.h>

#include <chrono>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "cds/v1/audit.grpc.pb.h"
#include "cds/v1/service.grpc.pb.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "server/audit/audit_log.h"
#include "tests/test_util.h"

namespace cds {
namespace {

using ::cds::testing::CommandResult;
using ::cds::testing::ReadFileOrEmpty;
using ::cds::testing::RunCommand;
using ::cds::testing::ServerProcess;
using ::cds::testing::TempDir;
using ::cds::testing::WriteFile;

const std::string kSourceDir = CDS_SOURCE_DIR;
constexpr char kDevToken[] = "dev-token-0123456789abcdef";

constexpr char kPolicy[] = R"pb(
  grants { identity: "clin" roles: CLINICAL }
  grants { identity: "cds:auth" roles: AUTHOR }  # by subject alternative name
  grants { identity: "adm" roles: ADMIN }
  grants { identity: "both" roles: [ CLINICAL, AUTHOR ] }
  grants { identity: "expired" roles: ADMIN }
  bearer_tokens { token: "dev-token-0123456789abcdef" identity: "clin" }
)pb";

// One call of each method; returns its status.
using Call = std::function<grpc::Status(const std::shared_ptr<grpc::Channel>&,
                                        grpc::ClientContext*)>;

std::map<std::string, Call> Methods() {
  std::map<std::string, Call> m;
  m["Evaluate"] = [](auto channel, auto* context) {
    cds::v1::EvaluateRequest request;
    request.set_rule_set("ipex");
    request.mutable_patient()->set_sex(cds::v1::MALE);
    cds::v1::EvaluateResponse response;
    return cds::v1::DecisionSupport::NewStub(channel)->Evaluate(context, request, &response);
  };
  m["ListRuleSets"] = [](auto channel, auto* context) {
    cds::v1::ListRuleSetsResponse response;
    return cds::v1::DecisionSupport::NewStub(channel)->ListRuleSets(
        context, cds::v1::ListRuleSetsRequest(), &response);
  };
  m["GetRuleSet"] = [](auto channel, auto* context) {
    cds::v1::GetRuleSetRequest request;
    request.set_name("ipex");
    cds::v1::GetRuleSetResponse response;
    return cds::v1::DecisionSupport::NewStub(channel)->GetRuleSet(context, request, &response);
  };
  m["PublishRuleSet"] = [](auto channel, auto* context) {
    cds::v1::PublishRuleSetResponse response;
    return cds::v1::RuleSetAdmin::NewStub(channel)->PublishRuleSet(
        context, cds::v1::PublishRuleSetRequest(), &response);
  };
  m["SetLabel"] = [](auto channel, auto* context) {
    cds::v1::SetLabelRequest request;
    request.set_name("ipex");
    request.set_label("canary");
    request.set_version("9.9.9");
    cds::v1::SetLabelResponse response;
    return cds::v1::RuleSetAdmin::NewStub(channel)->SetLabel(context, request, &response);
  };
  m["RetireRuleSet"] = [](auto channel, auto* context) {
    cds::v1::RetireRuleSetRequest request;
    request.set_name("ipex");
    request.set_version("9.9.9");
    cds::v1::RetireRuleSetResponse response;
    return cds::v1::RuleSetAdmin::NewStub(channel)->RetireRuleSet(context, request, &response);
  };
  m["EvaluateStream"] = [](auto channel, auto* context) {
    auto stub = cds::v1::DecisionSupport::NewStub(channel);
    auto stream = stub->EvaluateStream(context);
    stream->WritesDone();
    cds::v1::StreamEvaluateResponse response;
    while (stream->Read(&response)) {
    }
    return stream->Finish();
  };
  m["QueryAudit"] = [](auto channel, auto* context) {
    cds::v1::QueryAuditRequest request;
    request.set_page_size(1);
    cds::v1::QueryAuditResponse response;
    return cds::v1::AuditService::NewStub(channel)->QueryAudit(context, request, &response);
  };
  m["Health"] = [](auto channel, auto* context) {
    grpc::health::v1::HealthCheckResponse response;
    return grpc::health::v1::Health::NewStub(channel)->Check(
        context, grpc::health::v1::HealthCheckRequest(), &response);
  };
  return m;
}

// The full gRPC method name of each call of Methods().
const std::map<std::string, std::string> kPaths = {
    {"Evaluate", "/cds.v1.DecisionSupport/Evaluate"},
    {"EvaluateStream", "/cds.v1.DecisionSupport/EvaluateStream"},
    {"ListRuleSets", "/cds.v1.DecisionSupport/ListRuleSets"},
    {"GetRuleSet", "/cds.v1.DecisionSupport/GetRuleSet"},
    {"PublishRuleSet", "/cds.v1.RuleSetAdmin/PublishRuleSet"},
    {"SetLabel", "/cds.v1.RuleSetAdmin/SetLabel"},
    {"RetireRuleSet", "/cds.v1.RuleSetAdmin/RetireRuleSet"},
    {"QueryAudit", "/cds.v1.AuditService/QueryAudit"},
    {"Health", "/grpc.health.v1.Health/Check"},
};

// Which methods each role may call.
const std::map<std::string, std::vector<std::string>> kAllowed = {
    {"clin", {"Evaluate", "EvaluateStream", "ListRuleSets", "GetRuleSet", "Health"}},
    {"auth", {"PublishRuleSet", "SetLabel", "Health"}},
    {"both",
     {"Evaluate", "EvaluateStream", "ListRuleSets", "GetRuleSet", "PublishRuleSet", "SetLabel",
      "Health"}},
    {"adm",
     {"Evaluate", "EvaluateStream", "ListRuleSets", "GetRuleSet", "PublishRuleSet", "SetLabel",
      "RetireRuleSet", "QueryAudit", "Health"}},
    {"stranger", {"Health"}},
};

class AuthzTest : public ::testing::Test {
 protected:
  void SetUp() override {
    CommandResult made = RunCommand({"/usr/bin/env", "EXPIRED_CLIENTS=expired", "/bin/bash",
                                     kSourceDir + "/scripts/make-dev-certs.sh", certs_.path(),
                                     "clin", "auth", "adm", "both", "stranger"});
    ASSERT_EQ(made.exit_code, 0) << made.err;
    made = RunCommand({"/bin/bash", kSourceDir + "/scripts/make-dev-certs.sh", other_ca_.path(),
                       "adm"});
    ASSERT_EQ(made.exit_code, 0) << made.err;
    ASSERT_TRUE(WriteFile(state_.path() + "/policy.textproto", kPolicy));
    ASSERT_TRUE(WriteFile(state_.path() + "/audit.key", std::string(40, 'a')));
    std::string error;
    ASSERT_TRUE(server_.Start(
        CDS_SERVER_BINARY,
        {"--listen", "127.0.0.1:0", "--rules_dir", kSourceDir + "/rules", "--state_dir",
         state_.path() + "/state", "--drain", "0s", "--poll_interval", "0", "--tls_cert",
         certs_.path() + "/server.pem", "--tls_key", certs_.path() + "/server.key",
         "--tls_client_ca", certs_.path() + "/ca.pem", "--policy",
         state_.path() + "/policy.textproto", "--audit_db", state_.path() + "/audit.db",
         "--audit_key_file", state_.path() + "/audit.key"},
        &error))
        << error;
  }

  // A channel presenting `who`'s certificate from `dir` ("" for none).
  std::shared_ptr<grpc::Channel> Channel(const std::string& who, const std::string& dir = "") {
    grpc::SslCredentialsOptions ssl;
    ssl.pem_root_certs = ReadFileOrEmpty(certs_.path() + "/ca.pem");
    if (!who.empty()) {
      const std::string from = dir.empty() ? certs_.path() : dir;
      ssl.pem_cert_chain = ReadFileOrEmpty(from + "/" + who + ".pem");
      ssl.pem_private_key = ReadFileOrEmpty(from + "/" + who + ".key");
    }
    grpc::ChannelArguments args;
    args.SetInt("grpc.use_local_subchannel_pool", 1);
    return grpc::CreateCustomChannel(server_.address(), grpc::SslCredentials(ssl), args);
  }

  static grpc::Status Invoke(const Call& call, const std::shared_ptr<grpc::Channel>& channel,
                             const std::string& token = "") {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    if (!token.empty()) context.AddMetadata("authorization", absl::StrCat("Bearer ", token));
    return call(channel, &context);
  }

  TempDir certs_;
  TempDir other_ca_;
  TempDir state_;
  ServerProcess server_;
};

bool Denied(const grpc::Status& s) {
  return s.error_code() == grpc::StatusCode::PERMISSION_DENIED ||
         s.error_code() == grpc::StatusCode::UNAUTHENTICATED;
}

// Status codes recorded in the audit trail at `path` (database and journal, read while the
// server may still write) for `method` called by `who` (its CN, or the identity "cds:CN").
std::vector<std::string> AuditedCodes(const std::string& path, const std::string& method,
                                      const std::string& who) {
  audit::AuditQuery query;
  query.limit = 100000;
  absl::StatusOr<std::vector<audit::AuditRecord>> records = audit::QuerySqliteAudit(path, query);
  EXPECT_TRUE(records.ok()) << records.status();
  std::vector<std::string> codes;
  if (!records.ok()) return codes;
  for (const audit::AuditRecord& r : *records) {
    if (r.method == method && (r.caller == who || r.caller == "cds:" + who)) {
      codes.push_back(std::to_string(r.status_code));
    }
  }
  return codes;
}

TEST_F(AuthzTest, EveryMethodTimesEveryRole) {
  const std::map<std::string, Call> methods = Methods();
  ASSERT_EQ(methods.size(), kPaths.size());
  for (const auto& [who, allowed] : kAllowed) {
    std::shared_ptr<grpc::Channel> channel = Channel(who);
    for (const auto& [name, call] : methods) {
      SCOPED_TRACE(who + " calls " + name);
      const grpc::Status status = Invoke(call, channel);
      const bool may = std::find(allowed.begin(), allowed.end(), name) != allowed.end();
      if (may) {
        EXPECT_FALSE(Denied(status)) << status.error_message();
        EXPECT_NE(status.error_code(), grpc::StatusCode::UNAVAILABLE) << status.error_message();
      } else {
        EXPECT_EQ(status.error_code(), grpc::StatusCode::PERMISSION_DENIED)
            << status.error_message();
      }
      // Every call but the open health check left exactly one audit record, with the
      // caller (its CN when denied, the granted identity, CN or SAN, when allowed) and the
      // status the client saw.
      if (name == "Health") continue;
      const std::vector<std::string> rows =
          AuditedCodes(state_.path() + "/audit.db", kPaths.at(name), who);
      EXPECT_EQ(rows, std::vector<std::string>{std::to_string(status.error_code())});
    }
  }
}

TEST_F(AuthzTest, NoCertificateIsUnauthenticatedExceptForHealth) {
  std::shared_ptr<grpc::Channel> channel = Channel("");
  for (const auto& [name, call] : Methods()) {
    SCOPED_TRACE(name);
    const grpc::Status status = Invoke(call, channel);
    if (name == "Health") {
      EXPECT_TRUE(status.ok()) << status.error_message();
    } else {
      EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAUTHENTICATED) << status.error_message();
    }
  }
}

TEST_F(AuthzTest, DevelopmentBearerTokensStandForTheirIdentity) {
  std::shared_ptr<grpc::Channel> channel = Channel("");
  const std::map<std::string, Call> methods = Methods();
  // The token stands for "clin".
  EXPECT_TRUE(Invoke(methods.at("ListRuleSets"), channel, kDevToken).ok());
  EXPECT_EQ(Invoke(methods.at("SetLabel"), channel, kDevToken).error_code(),
            grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_EQ(Invoke(methods.at("ListRuleSets"), channel, "not-a-known-token-0000").error_code(),
            grpc::StatusCode::UNAUTHENTICATED);
}

TEST_F(AuthzTest, ExpiredOrForeignCertificatesNeverGetIn) {
  // The TLS handshake refuses them: the client sees UNAVAILABLE, no identity is ever
  // established, and no method runs.
  for (const auto& [name, call] : Methods()) {
    SCOPED_TRACE(name);
    EXPECT_EQ(Invoke(call, Channel("expired")).error_code(), grpc::StatusCode::UNAVAILABLE);
    EXPECT_EQ(Invoke(call, Channel("adm", other_ca_.path())).error_code(),
              grpc::StatusCode::UNAVAILABLE);
  }
}

TEST_F(AuthzTest, DeniedCallsAreLoggedAndAudited) {
  const std::map<std::string, Call> methods = Methods();
  EXPECT_EQ(Invoke(methods.at("RetireRuleSet"), Channel("clin")).error_code(),
            grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_EQ(Invoke(methods.at("Evaluate"), Channel("")).error_code(),
            grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_TRUE(Invoke(methods.at("ListRuleSets"), Channel("clin")).ok());
  EXPECT_TRUE(Invoke(methods.at("Evaluate"), Channel("clin")).ok());
  server_.Stop(SIGTERM);
  const std::string log = server_.Stderr();
  EXPECT_TRUE(absl::StrContains(log, "denied /cds.v1.RuleSetAdmin/RetireRuleSet to clin"))
      << log;
  // The audit trail has both denials and the evaluation, with the caller's identity.
  sqlite3* db = nullptr;
  ASSERT_EQ(sqlite3_open_v2((state_.path() + "/audit.db").c_str(), &db, SQLITE_OPEN_READONLY,
                            nullptr),
            SQLITE_OK);
  sqlite3_stmt* stmt = nullptr;
  ASSERT_EQ(sqlite3_prepare_v2(db,
                               "SELECT caller || ' ' || method || ' ' || status_code FROM audit "
                               "ORDER BY id",
                               -1, &stmt, nullptr),
            SQLITE_OK);
  std::vector<std::string> rows;
  while (sqlite3_step(stmt) == SQLITE_ROW) {
    rows.emplace_back(reinterpret_cast<const char*>(sqlite3_column_text(stmt, 0)));
  }
  sqlite3_finalize(stmt);
  sqlite3_close(db);
  const std::vector<std::string> expected = {
      "clin /cds.v1.RuleSetAdmin/RetireRuleSet 7",
      " /cds.v1.DecisionSupport/Evaluate 16",
      "clin /cds.v1.DecisionSupport/ListRuleSets 0",
      "clin /cds.v1.DecisionSupport/Evaluate 0",
  };
  EXPECT_EQ(rows, expected);
}

TEST_F(AuthzTest, AdminsQueryTheAuditTrailThroughTheServerWithCdsctl) {
  const std::map<std::string, Call> methods = Methods();
  EXPECT_TRUE(Invoke(methods.at("Evaluate"), Channel("clin")).ok());
  EXPECT_EQ(Invoke(methods.at("RetireRuleSet"), Channel("clin")).error_code(),
            grpc::StatusCode::PERMISSION_DENIED);
  auto cdsctl = [&](const std::string& who, std::vector<std::string> args) {
    std::vector<std::string> argv = {CDSCTL_BINARY, "audit", "--server", server_.address(),
                                     "--tls_ca",
                                     certs_.path() + "/ca.pem", "--tls_cert",
                                     certs_.path() + "/" + who + ".pem", "--tls_key",
                                     certs_.path() + "/" + who + ".key"};
    argv.insert(argv.end(), args.begin(), args.end());
    return RunCommand(argv);
  };
  CommandResult r = cdsctl("adm", {"--caller", "clin", "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(absl::StrContains(r.out, "\"method\":\"/cds.v1.DecisionSupport/Evaluate\"")) << r.out;
  EXPECT_TRUE(absl::StrContains(r.out, "\"method\":\"/cds.v1.RuleSetAdmin/RetireRuleSet\""))
      << r.out;
  r = cdsctl("adm", {"--since", "1h", "--rule-set", "ipex@1.1.1"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(absl::StrContains(r.out, "clin  /cds.v1.DecisionSupport/Evaluate  ipex@1.1.1"))
      << r.out;
  // Only admins: a clinician is refused (exit code 5, PERMISSION_DENIED).
  r = cdsctl("clin", {});
  EXPECT_EQ(r.exit_code, 5) << r.out;
  EXPECT_TRUE(absl::StrContains(r.err, "PERMISSION_DENIED")) << r.err;
  // The admin's queries and the clinician's attempt are themselves audited.
  r = cdsctl("adm", {"--caller", "adm"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(absl::StrContains(r.out, "adm  /cds.v1.AuditService/QueryAudit")) << r.out;
  r = cdsctl("adm", {"--caller", "clin", "--json"});
  EXPECT_TRUE(absl::StrContains(
      r.out, "\"method\":\"/cds.v1.AuditService/QueryAudit\",\"ruleSet\":\"\",\"digest\":\"\","
             "\"pseudonym\":\"\",\"evaluationId\":\"\",\"topSuggestions\":\"\",\"statusCode\":7"))
      << r.out;
}

TEST(AuthzStartupTest, PolicyNeedsTlsAndMustParse) {
  TempDir dir;
  ASSERT_TRUE(WriteFile(dir.path() + "/bad.textproto", "grants { identity: \"x\" roles: 0 }"));
  ASSERT_TRUE(WriteFile(dir.path() + "/good.textproto", kPolicy));
  CommandResult result = RunCommand({CDS_SERVER_BINARY, "--listen", "127.0.0.1:0",
                                     "--rules_dir", kSourceDir + "/rules", "--insecure_dev",
                                     "--policy", dir.path() + "/good.textproto"});
  EXPECT_EQ(result.exit_code, 2);
  EXPECT_TRUE(absl::StrContains(result.err, "--policy needs TLS")) << result.err;
  ASSERT_EQ(RunCommand({"/bin/bash", kSourceDir + "/scripts/make-dev-certs.sh", dir.path()})
                .exit_code,
            0);
  result = RunCommand({CDS_SERVER_BINARY, "--listen", "127.0.0.1:0", "--rules_dir",
                       kSourceDir + "/rules", "--tls_cert", dir.path() + "/server.pem",
                       "--tls_key", dir.path() + "/server.key", "--policy",
                       dir.path() + "/bad.textproto"});
  EXPECT_EQ(result.exit_code, 2);
  EXPECT_TRUE(absl::StrContains(result.err, "not a known role")) << result.err;
}

}  // namespace
}  // namespace cds
