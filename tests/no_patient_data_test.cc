// No patient data in logs or errors (issue 6, part 5): distinctive patient references,
// codes, displays, units and values are fed through every path of the real server —
// success, each kind of error (malformed, unknown rule set, nothing loaded, deadline
// passed, too large, refused admin calls) — and none of them may appear in the server's
// stderr, in a status message or in the status details.

#include <signal.h>

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "cds/v1/audit.grpc.pb.h"
#include "cds/v1/service.grpc.pb.h"
#include "google/rpc/error_details.pb.h"
#include "google/rpc/status.pb.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "tests/test_util.h"

namespace cds {
namespace {

using ::cds::testing::ServerProcess;
using ::cds::testing::TempDir;

const std::string kSourceDir = CDS_SOURCE_DIR;

// Strings that exist only in the patients sent by this test.
const std::vector<std::string> kSecrets = {
    "PTREF-Secret-5e7a1c",  // patient reference
    "HP:9876543",           // well-formed but unknown HPO ids
    "HP:9876542",
    "98765-4",              // well-formed but unknown LOINC code
    "SecretDisplay-41b",    // display labels
    "secretunit-zq",        // unit
    "12345.678",            // lab value
    "HP:98765X3",           // malformed codes
    "LOINC-garbage-77q",
    "4242.4242",            // age in days
};

cds::v1::Patient SecretPatient() {
  cds::v1::Patient p;
  p.set_reference(kSecrets[0]);
  p.set_sex(cds::v1::MALE);
  p.mutable_age()->set_days(60);
  auto add_finding = [&](const std::string& code, cds::v1::Finding::Status status) {
    cds::v1::Finding* f = p.add_findings();
    f->mutable_term()->set_system("HPO");
    f->mutable_term()->set_code(code);
    f->mutable_term()->set_display(kSecrets[4]);
    f->set_status(status);
  };
  add_finding("HP:0002041", cds::v1::Finding::PRESENT);  // intractable diarrhea
  add_finding(kSecrets[1], cds::v1::Finding::PRESENT);
  add_finding(kSecrets[2], cds::v1::Finding::EXCLUDED);
  cds::v1::Measurement* m = p.add_measurements();
  m->mutable_assay()->set_system("LOINC");
  m->mutable_assay()->set_code(kSecrets[3]);
  m->mutable_assay()->set_display(kSecrets[4]);
  m->set_value(12345.678);
  m->set_unit(kSecrets[5]);
  cds::v1::Relative* r = p.mutable_family_history()->add_relatives();
  r->set_relationship(cds::v1::Relative::MATERNAL_UNCLE);
  cds::v1::Code* c = r->add_conditions();
  c->set_system("HPO");
  c->set_code(kSecrets[2]);
  c->set_display(kSecrets[4]);
  return p;
}

class Client {
 public:
  explicit Client(const std::string& address) {
    grpc::ChannelArguments args;
    args.SetMaxSendMessageSize(64 << 20);
    channel_ = grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), args);
    stub_ = cds::v1::DecisionSupport::NewStub(channel_);
    admin_ = cds::v1::RuleSetAdmin::NewStub(channel_);
    audit_ = cds::v1::AuditService::NewStub(channel_);
  }

  grpc::Status Evaluate(const cds::v1::EvaluateRequest& request,
                        std::chrono::milliseconds timeout = std::chrono::seconds(20)) {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + timeout);
    cds::v1::EvaluateResponse response;
    return Record(stub_->Evaluate(&context, request, &response));
  }
  grpc::Status Publish(const std::string& bytes) {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(20));
    cds::v1::PublishRuleSetRequest request;
    request.set_bundle(bytes);
    cds::v1::PublishRuleSetResponse response;
    return Record(admin_->PublishRuleSet(&context, request, &response));
  }
  grpc::Status SetLabel(const std::string& name, const std::string& label,
                        const std::string& version) {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(20));
    cds::v1::SetLabelRequest request;
    request.set_name(name);
    request.set_label(label);
    request.set_version(version);
    cds::v1::SetLabelResponse response;
    return Record(admin_->SetLabel(&context, request, &response));
  }
  grpc::Status Get(const std::string& name, const std::string& version) {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(20));
    cds::v1::GetRuleSetRequest request;
    request.set_name(name);
    request.set_version(version);
    cds::v1::GetRuleSetResponse response;
    return Record(stub_->GetRuleSet(&context, request, &response));
  }
  // Audit records of the patient with raw reference `reference`.
  grpc::Status QueryAudit(const std::string& reference, int* records = nullptr) {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(20));
    cds::v1::QueryAuditRequest request;
    request.set_patient_reference(reference);
    cds::v1::QueryAuditResponse response;
    const grpc::Status status = Record(audit_->QueryAudit(&context, request, &response));
    if (records != nullptr) *records = response.entries_size();
    return status;
  }
  void Disconnect() {
    stub_.reset();
    admin_.reset();
    audit_.reset();
    channel_.reset();
  }
  // Every error message and decoded details returned so far.
  const std::string& errors() const { return errors_; }

 private:
  grpc::Status Record(grpc::Status status) {
    absl::StrAppend(&errors_, status.error_message(), "\n");
    google::rpc::Status details;
    if (!status.error_details().empty() && details.ParseFromString(status.error_details())) {
      absl::StrAppend(&errors_, details.message(), "\n");
      for (const google::protobuf::Any& any : details.details()) {
        google::rpc::BadRequest bad_request;
        if (!any.UnpackTo(&bad_request)) continue;
        for (const auto& v : bad_request.field_violations()) {
          absl::StrAppend(&errors_, v.field(), " ", v.description(), "\n");
        }
      }
    }
    absl::StrAppend(&errors_, status.error_details(), "\n");
    return status;
  }

  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<cds::v1::DecisionSupport::Stub> stub_;
  std::unique_ptr<cds::v1::RuleSetAdmin::Stub> admin_;
  std::unique_ptr<cds::v1::AuditService::Stub> audit_;
  std::string errors_;
};

void ExpectNoSecrets(const std::string& text, const std::string& where) {
  for (const std::string& secret : kSecrets) {
    EXPECT_FALSE(absl::StrContains(text, secret)) << secret << " appears in " << where;
  }
}

cds::v1::EvaluateRequest Request(const std::string& rule_set) {
  cds::v1::EvaluateRequest request;
  request.set_rule_set(rule_set);
  *request.mutable_patient() = SecretPatient();
  return request;
}

TEST(NoPatientDataTest, NoneInLogsOrErrorsOnAnyPath) {
  TempDir state;
  ASSERT_TRUE(testing::WriteFile(state.path() + "/audit.key", std::string(40, 'k')));
  ServerProcess server;
  std::string error;
  ASSERT_TRUE(server.Start(CDS_SERVER_BINARY,
                           {"--listen", "127.0.0.1:0", "--rules_dir", kSourceDir + "/rules",
                            "--state_dir", state.path(), "--drain", "0s", "--poll_interval", "0",
                            "--max_request_bytes", "100000", "--audit_db",
                            state.path() + "/audit.db", "--audit_key_file",
                            state.path() + "/audit.key"},
                           &error))
      << error;
  Client client(server.address());

  // Success (with unknown codes, which produce warnings naming only field paths).
  ASSERT_TRUE(client.Evaluate(Request("ipex")).ok()) << client.errors();
  ASSERT_TRUE(client.Evaluate(Request("ipex@1.0.0")).ok()) << client.errors();
  // Malformed: a bad code, a negative value, a bad age, several at once.
  {
    cds::v1::EvaluateRequest r = Request("ipex");
    r.mutable_patient()->mutable_findings(1)->mutable_term()->set_code(kSecrets[7]);
    EXPECT_EQ(client.Evaluate(r).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    r.mutable_patient()->mutable_measurements(0)->mutable_assay()->set_code(kSecrets[8]);
    r.mutable_patient()->mutable_measurements(0)->set_value(-12345.678);
    r.mutable_patient()->mutable_age()->set_days(-4242.4242);
    r.mutable_patient()->set_sex(cds::v1::SEX_UNSPECIFIED);
    EXPECT_EQ(client.Evaluate(r).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    r = Request("ipex");
    r.mutable_patient()->set_reference(kSecrets[0] + std::string(300, 'x'));
    EXPECT_EQ(client.Evaluate(r).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  }
  // Unknown rule set and version.
  EXPECT_EQ(client.Evaluate(Request("nosuchrules")).error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(client.Evaluate(Request("ipex@9.9.9")).error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(client.Get("ipex", "9.9.9").error_code(), grpc::StatusCode::NOT_FOUND);
  // A deadline that has (nearly) passed: DEADLINE_EXCEEDED from gRPC or the server, or
  // just in time; whichever, nothing may be logged.
  client.Evaluate(Request("ipex"), std::chrono::milliseconds(0));
  client.Evaluate(Request("ipex"), std::chrono::milliseconds(1));
  // Too large.
  {
    cds::v1::EvaluateRequest r = Request("ipex");
    for (int i = 0; i < 4000; ++i) *r.mutable_patient()->add_findings() = r.patient().findings(1);
    EXPECT_EQ(client.Evaluate(r).error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  }
  // Admin calls refused: garbage bundles carrying patient data, labels on unknown versions.
  EXPECT_FALSE(client.Publish(absl::StrCat(kSecrets[0], kSecrets[1], kSecrets[4])).ok());
  EXPECT_FALSE(client.Publish("").ok());
  EXPECT_FALSE(client.SetLabel("ipex", "stable", "9.9.9").ok());
  // Audit queries by raw patient reference: found, and refused when malformed.
  int records = 0;
  EXPECT_TRUE(client.QueryAudit(kSecrets[0], &records).ok()) << client.errors();
  EXPECT_GE(records, 2);
  EXPECT_EQ(client.QueryAudit(kSecrets[0] + std::string(300, 'x')).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);

  // The journal holds the records not imported into the database yet (emptied on shutdown).
  ExpectNoSecrets(testing::ReadFileOrEmpty(state.path() + "/audit.db.journal"),
                  "the audit journal");
  client.Disconnect();
  ASSERT_EQ(server.Stop(SIGTERM), 0);
  ExpectNoSecrets(server.Stderr(), "the server's stderr");
  ExpectNoSecrets(client.errors(), "an error message or its details");
  // The audit trail keeps pseudonyms only.
  ExpectNoSecrets(testing::ReadFileOrEmpty(state.path() + "/audit.db"), "the audit database");
  ExpectNoSecrets(testing::ReadFileOrEmpty(state.path() + "/audit.db-wal"), "the audit WAL");
}

TEST(NoPatientDataTest, NoneInLogsOrErrorsWhenNothingIsLoaded) {
  TempDir rules;  // empty: nothing to serve, Evaluate is UNAVAILABLE
  ServerProcess server;
  std::string error;
  ASSERT_TRUE(server.Start(CDS_SERVER_BINARY,
                           {"--listen", "127.0.0.1:0", "--rules_dir", rules.path(), "--drain",
                            "0s", "--poll_interval", "0"},
                           &error))
      << error;
  Client client(server.address());
  EXPECT_EQ(client.Evaluate(Request("ipex")).error_code(), grpc::StatusCode::UNAVAILABLE)
      << client.errors();
  // Admin calls without --state_dir are refused.
  EXPECT_FALSE(client.Publish(kSecrets[0]).ok());
  client.Disconnect();
  ASSERT_EQ(server.Stop(SIGTERM), 0);
  ExpectNoSecrets(server.Stderr(), "the server's stderr");
  ExpectNoSecrets(client.errors(), "an error message or its details");
}

}  // namespace
}  // namespace cds
