// Starts the real cds-server binary on an ephemeral port and calls it through a real
// gRPC channel: health, Evaluate on the example patients, rule-set listing, every kind of
// malformed request, broken rule sets, and shutdown on SIGTERM.

#include <signal.h>

#include <cmath>
#include <functional>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "cds/v1/service.grpc.pb.h"
#include "client/input.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "tests/test_util.h"

namespace cds {
namespace {

using ::cds::testing::ServerProcess;
using ::cds::testing::TempDir;
using ::grpc::health::v1::HealthCheckRequest;
using ::grpc::health::v1::HealthCheckResponse;

const std::string kSourceDir = CDS_SOURCE_DIR;
const std::string kRulesDir = kSourceDir + "/rules";
// Marks the request's patient so a test can tell whether any of it leaks into a message.
constexpr char kReference[] = "pseudo-ref-7f3a91";

cds::v1::Patient LoadPatient(const std::string& example) {
  absl::StatusOr<cds::v1::EvaluateRequest> input =
      cli::ReadEvaluateInput(kSourceDir + "/client/examples/" + example);
  EXPECT_TRUE(input.ok()) << input.status();
  return input.ok() ? input->patient() : cds::v1::Patient();
}

// A running server on the given rules directory and a channel to it.
class Server {
 public:
  explicit Server(const std::string& rules_dir, std::vector<std::string> extra_flags = {}) {
    std::string error;
    std::vector<std::string> flags = {"--listen", "127.0.0.1:0", "--rules_dir", rules_dir,
                                      "--drain", "0s"};
    flags.insert(flags.end(), extra_flags.begin(), extra_flags.end());
    started_ = process_.Start(CDS_SERVER_BINARY, flags, &error);
    EXPECT_TRUE(started_) << error;
    channel_ = grpc::CreateChannel(process_.address(), grpc::InsecureChannelCredentials());
    stub_ = cds::v1::DecisionSupport::NewStub(channel_);
    health_ = grpc::health::v1::Health::NewStub(channel_);
  }

  bool started() const { return started_; }
  // Drops the client's connection: gRPC's graceful shutdown otherwise waits a few seconds
  // for an idle client to acknowledge its GOAWAY.
  void Disconnect() {
    stub_.reset();
    health_.reset();
    channel_.reset();
  }
  ServerProcess& process() { return process_; }
  cds::v1::DecisionSupport::Stub& stub() { return *stub_; }

  HealthCheckResponse::ServingStatus Health(const std::string& service) {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    HealthCheckRequest request;
    request.set_service(service);
    HealthCheckResponse response;
    const grpc::Status status = health_->Check(&context, request, &response);
    EXPECT_TRUE(status.ok()) << status.error_message();
    return response.status();
  }

  grpc::Status Evaluate(const cds::v1::EvaluateRequest& request,
                        cds::v1::EvaluateResponse* response) {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    return stub_->Evaluate(&context, request, response);
  }

  cds::v1::ListRuleSetsResponse List() {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    cds::v1::ListRuleSetsResponse response;
    const grpc::Status status =
        stub_->ListRuleSets(&context, cds::v1::ListRuleSetsRequest(), &response);
    EXPECT_TRUE(status.ok()) << status.error_message();
    return response;
  }

  grpc::Status Get(const std::string& name, const std::string& version,
                   cds::v1::GetRuleSetResponse* response) {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    cds::v1::GetRuleSetRequest request;
    request.set_name(name);
    request.set_version(version);
    return stub_->GetRuleSet(&context, request, response);
  }

 private:
  ServerProcess process_;
  bool started_ = false;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<cds::v1::DecisionSupport::Stub> stub_;
  std::unique_ptr<grpc::health::v1::Health::Stub> health_;
};

cds::v1::EvaluateRequest IpexRequest(const cds::v1::Patient& patient) {
  cds::v1::EvaluateRequest request;
  request.set_rule_set("ipex");
  *request.mutable_patient() = patient;
  request.mutable_patient()->set_reference(kReference);
  return request;
}

const cds::v1::Suggestion* TopDiagnosis(const cds::v1::EvaluateResponse& response) {
  for (const cds::v1::Suggestion& s : response.suggestions()) {
    if (s.kind() == cds::v1::DIAGNOSIS) return &s;
  }
  return nullptr;
}

bool IsUuidV4(const std::string& id) {
  if (id.size() != 36 || id[14] != '4') return false;
  for (size_t i = 0; i < id.size(); ++i) {
    const bool dash = i == 8 || i == 13 || i == 18 || i == 23;
    if (dash != (id[i] == '-')) return false;
    if (!dash && !std::isxdigit(static_cast<unsigned char>(id[i]))) return false;
  }
  return std::string("89ab").find(id[19]) != std::string::npos;
}

class ServerIntegrationTest : public ::testing::Test {
 protected:
  void SetUp() override { ASSERT_TRUE(server_.started()); }
  Server server_{kRulesDir};
};

TEST_F(ServerIntegrationTest, HealthIsServingOnceRuleSetsAreLoaded) {
  EXPECT_EQ(server_.Health(""), HealthCheckResponse::SERVING);
  EXPECT_EQ(server_.Health("cds.v1.DecisionSupport"), HealthCheckResponse::SERVING);
}

TEST_F(ServerIntegrationTest, TriadBoyGetsIpexFirstWithFoxp3SequencingAndReasons) {
  cds::v1::EvaluateResponse response;
  const grpc::Status status = server_.Evaluate(IpexRequest(LoadPatient("triad_boy.json")), &response);
  ASSERT_TRUE(status.ok()) << status.error_message();

  const cds::v1::Suggestion* top = TopDiagnosis(response);
  ASSERT_NE(top, nullptr);
  EXPECT_EQ(top->rule_id(), "ipex");
  EXPECT_TRUE(top->has_probability());

  // FOXP3 sequencing among the first three tests / referrals / treatments.
  int actions_seen = 0;
  bool foxp3_early = false;
  for (const cds::v1::Suggestion& s : response.suggestions()) {
    if (s.kind() != cds::v1::TEST && s.kind() != cds::v1::REFERRAL &&
        s.kind() != cds::v1::TREATMENT) {
      continue;
    }
    if (++actions_seen > 3) break;
    foxp3_early |= s.kind() == cds::v1::TEST && absl::StrContains(s.code().code(), "FOXP3");
  }
  EXPECT_TRUE(foxp3_early) << response.DebugString();

  for (int i = 0; i < response.suggestions_size(); ++i) {
    const cds::v1::Suggestion& s = response.suggestions(i);
    EXPECT_EQ(s.rank(), i + 1);
    EXPECT_FALSE(s.evidence().empty()) << "suggestion " << s.rule_id() << " says no why";
  }
  EXPECT_EQ(response.rule_set().name(), "ipex");
  EXPECT_EQ(response.rule_set().version(), "1.1.1");  // the default: highest available
  EXPECT_TRUE(absl::StartsWith(response.rule_set().digest(), "sha256:"));
  EXPECT_EQ(response.rule_set().digest().size(), 7u + 64u);
  EXPECT_TRUE(IsUuidV4(response.evaluation_id())) << response.evaluation_id();
  EXPECT_GT(response.evaluated_at().seconds(), 0);
  EXPECT_FALSE(response.disclaimer().empty());
}

TEST_F(ServerIntegrationTest, TriadGirlDoesNotGetIpexFirst) {
  cds::v1::EvaluateResponse response;
  const grpc::Status status =
      server_.Evaluate(IpexRequest(LoadPatient("triad_girl.json")), &response);
  ASSERT_TRUE(status.ok()) << status.error_message();
  const cds::v1::Suggestion* top = TopDiagnosis(response);
  if (top != nullptr) {
    EXPECT_NE(top->rule_id(), "ipex");
  }
}

TEST_F(ServerIntegrationTest, EachEvaluationHasItsOwnId) {
  const cds::v1::EvaluateRequest request = IpexRequest(LoadPatient("triad_boy.json"));
  cds::v1::EvaluateResponse first, second;
  ASSERT_TRUE(server_.Evaluate(request, &first).ok());
  ASSERT_TRUE(server_.Evaluate(request, &second).ok());
  EXPECT_NE(first.evaluation_id(), second.evaluation_id());
  // Same input, same rule set: the same ranking.
  ASSERT_EQ(first.suggestions_size(), second.suggestions_size());
  for (int i = 0; i < first.suggestions_size(); ++i) {
    EXPECT_EQ(first.suggestions(i).rule_id(), second.suggestions(i).rule_id());
  }
}

TEST_F(ServerIntegrationTest, PinnedVersionIsServed) {
  cds::v1::EvaluateRequest request = IpexRequest(LoadPatient("triad_boy.json"));
  request.set_version("1.0.0");
  cds::v1::EvaluateResponse response;
  const grpc::Status status = server_.Evaluate(request, &response);
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(response.rule_set().version(), "1.0.0");
}

TEST_F(ServerIntegrationTest, ListAndGetRuleSets) {
  cds::v1::EvaluateResponse ignored;
  ASSERT_TRUE(server_.Evaluate(IpexRequest(LoadPatient("triad_boy.json")), &ignored).ok());

  const cds::v1::ListRuleSetsResponse list = server_.List();
  const cds::v1::RuleSetInfo* ipex = nullptr;
  for (const cds::v1::RuleSetInfo& info : list.rule_sets()) {
    if (info.ref().name() == "ipex" && info.is_default()) ipex = &info;
  }
  ASSERT_NE(ipex, nullptr) << list.DebugString();
  EXPECT_EQ(ipex->state(), cds::v1::RuleSetInfo::AVAILABLE);
  // The default is the highest available version (no "stable" label on this server).
  EXPECT_EQ(ipex->ref().version(), "1.1.1");
  EXPECT_EQ(ipex->signer(), "1c3fd966ea0b8a0a");  // the project release key
  EXPECT_TRUE(absl::StartsWith(ipex->ref().digest(), "sha256:"));
  EXPECT_GT(ipex->hypothesis_count(), 4);  // IPEX, IPEX-like and at least three others
  EXPECT_GT(ipex->action_count(), 0);
  EXPECT_EQ(ipex->evaluation_count(), 1);
  EXPECT_GT(ipex->loaded_at().seconds(), 0);

  cds::v1::GetRuleSetResponse get;
  const grpc::Status status = server_.Get("ipex", "", &get);
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(get.info().ref().version(), ipex->ref().version());
  EXPECT_EQ(get.definition().metadata().name(), "ipex");
  EXPECT_EQ(get.definition().hypotheses_size(), ipex->hypothesis_count());
}

TEST_F(ServerIntegrationTest, UnknownRuleSetOrVersionIsNotFound) {
  cds::v1::EvaluateRequest request = IpexRequest(LoadPatient("triad_boy.json"));
  request.set_rule_set("no-such-rules");
  cds::v1::EvaluateResponse response;
  grpc::Status status = server_.Evaluate(request, &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_TRUE(absl::StrContains(status.error_message(), "no-such-rules"))
      << status.error_message();

  request.set_rule_set("ipex");
  request.set_version("0.0.9");
  status = server_.Evaluate(request, &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_TRUE(absl::StrContains(status.error_message(), "0.0.9")) << status.error_message();

  // An absurdly long name is refused as malformed and not echoed back.
  request.set_rule_set(std::string(100000, 'x'));
  request.clear_version();
  status = server_.Evaluate(request, &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_LT(status.error_message().size(), 600u);

  cds::v1::GetRuleSetResponse get;
  EXPECT_EQ(server_.Get("no-such-rules", "", &get).error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(server_.Get("ipex", "7.7.7", &get).error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(server_.Get("", "", &get).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
}

struct MalformedCase {
  std::string name;
  std::function<void(cds::v1::EvaluateRequest*)> mutate;
  // Every one of these must appear in the error message (the field it names).
  std::vector<std::string> mentions;
};

TEST_F(ServerIntegrationTest, MalformedRequestsAreInvalidArgumentNamingTheField) {
  const cds::v1::EvaluateRequest valid = IpexRequest(LoadPatient("triad_boy.json"));
  ASSERT_GT(valid.patient().findings_size(), 0);
  ASSERT_GT(valid.patient().measurements_size(), 0);
  const std::string first_code = valid.patient().findings(0).term().code();
  const std::string first_assay = valid.patient().measurements(0).assay().code();

  auto with_relative = [](cds::v1::EvaluateRequest* r) {
    return r->mutable_patient()->mutable_family_history()->add_relatives();
  };
  const std::vector<MalformedCase> cases = {
      {"missing rule_set", [](auto* r) { r->clear_rule_set(); }, {"rule_set"}},
      {"missing patient", [](auto* r) { r->clear_patient(); }, {"patient"}},
      {"finding without code",
       [](auto* r) { r->mutable_patient()->mutable_findings(0)->mutable_term()->clear_code(); },
       {"findings[0]"}},
      {"finding status unspecified",
       [](auto* r) {
         r->mutable_patient()->mutable_findings(0)->set_status(
             cds::v1::Finding::STATUS_UNSPECIFIED);
       },
       {"findings[0]", "status"}},
      {"sex unspecified",
       [](auto* r) { r->mutable_patient()->set_sex(cds::v1::SEX_UNSPECIFIED); },
       {"sex"}},
      {"negative age", [](auto* r) { r->mutable_patient()->mutable_age()->set_days(-3); },
       {"age"}},
      {"malformed ISO age",
       [](auto* r) { r->mutable_patient()->mutable_age()->set_iso8601_duration("P3Q"); },
       {"age"}},
      {"NaN lab value",
       [](auto* r) {
         r->mutable_patient()->mutable_measurements(0)->set_value(
             std::numeric_limits<double>::quiet_NaN());
       },
       {"measurements[0]", "value"}},
      {"infinite lab value",
       [](auto* r) {
         r->mutable_patient()->mutable_measurements(0)->set_value(
             std::numeric_limits<double>::infinity());
       },
       {"measurements[0]", "value"}},
      {"measurement without assay code",
       [](auto* r) { r->mutable_patient()->mutable_measurements(0)->mutable_assay()->clear_code(); },
       {"measurements[0]"}},
      {"negative onset age",
       [](auto* r) {
         r->mutable_patient()->mutable_findings(0)->mutable_onset()->set_days(-1);
       },
       {"findings[0]", "onset"}},
      {"relative without relationship",
       [&](auto* r) { with_relative(r)->set_sex(cds::v1::MALE); },
       {"relatives", "relationship"}},
  };
  for (const MalformedCase& c : cases) {
    SCOPED_TRACE(c.name);
    cds::v1::EvaluateRequest request = valid;
    c.mutate(&request);
    cds::v1::EvaluateResponse response;
    const grpc::Status status = server_.Evaluate(request, &response);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << status.error_message();
    for (const std::string& mention : c.mentions) {
      EXPECT_TRUE(absl::StrContains(status.error_message(), mention))
          << "'" << status.error_message() << "' does not name " << mention;
    }
    // No patient data in the message.
    EXPECT_FALSE(absl::StrContains(status.error_message(), kReference));
    EXPECT_FALSE(absl::StrContains(status.error_message(), first_code));
    if (!first_assay.empty()) {
      EXPECT_FALSE(absl::StrContains(status.error_message(), first_assay));
    }
    EXPECT_FALSE(absl::StrContains(status.error_message(), "-3"));
    EXPECT_FALSE(absl::StrContains(status.error_message(), "P3Q"));
  }
  // The server is still healthy after all that.
  EXPECT_EQ(server_.Health(""), HealthCheckResponse::SERVING);
}

TEST_F(ServerIntegrationTest, SigtermDrainsAndExitsZero) {
  EXPECT_EQ(server_.process().Stop(SIGTERM), 0) << server_.process().Stderr();
  EXPECT_TRUE(absl::StrContains(server_.process().Stderr(), "refusing new calls"));
}

TEST_F(ServerIntegrationTest, SigintExitsZero) {
  EXPECT_EQ(server_.process().Stop(SIGINT), 0) << server_.process().Stderr();
}

TEST_F(ServerIntegrationTest, LogsNoPatientData) {
  cds::v1::EvaluateResponse response;
  cds::v1::EvaluateRequest request = IpexRequest(LoadPatient("triad_boy.json"));
  ASSERT_TRUE(server_.Evaluate(request, &response).ok());
  request.mutable_patient()->set_sex(cds::v1::SEX_UNSPECIFIED);
  EXPECT_FALSE(server_.Evaluate(request, &response).ok());
  server_.Disconnect();
  ASSERT_EQ(server_.process().Stop(SIGTERM), 0);
  const std::string log = server_.process().Stderr();
  EXPECT_FALSE(absl::StrContains(log, kReference));
  for (const cds::v1::Finding& finding : request.patient().findings()) {
    EXPECT_FALSE(absl::StrContains(log, finding.term().code())) << finding.term().code();
  }
}

// --- Rules directories with broken versions -------------------------------------------

// Copies rules/ipex/1.0.0 to <root>/ipex/1.0.0 and adds <root>/ipex/9.9.9 that cannot
// compile (a hypothesis with an out-of-range pretest probability and a dangling concept).
void MakeRulesWithBrokenVersion(const std::string& root, bool include_good) {
  const std::string good = kRulesDir + "/ipex/1.0.0/";
  const std::string rules = testing::ReadFileOrEmpty(good + "ruleset.textproto");
  const std::string tests = testing::ReadFileOrEmpty(good + "tests.textproto");
  ASSERT_FALSE(rules.empty());
  // Rule sets name an ontology release, read from <root>/ontology/.
  ASSERT_TRUE(testing::LinkOntologies(root));
  if (include_good) {
    ASSERT_TRUE(testing::WriteFile(root + "/ipex/1.0.0/ruleset.textproto", rules));
    ASSERT_TRUE(testing::WriteFile(root + "/ipex/1.0.0/tests.textproto", tests));
  }
  std::string broken = absl::StrReplaceAll(rules, {{"\"1.0.0\"", "\"9.9.9\""}});
  absl::StrAppend(&broken,
                  "\nhypotheses {\n  id: \"broken\"\n  title: \"Broken\"\n"
                  "  pretest_probability: 1.5\n"
                  "  pretest_provenance { assumption: true note: \"test\" }\n"
                  "  evidence {\n    id: \"dangling\"\n    description: \"x\"\n"
                  "    when { finding { concept: \"no_such_concept\" } }\n"
                  "    likelihood_ratios { positive: 2 }\n"
                  "    provenance { assumption: true note: \"test\" }\n  }\n}\n");
  ASSERT_TRUE(testing::WriteFile(root + "/ipex/9.9.9/ruleset.textproto", broken));
  ASSERT_TRUE(testing::WriteFile(root + "/ipex/9.9.9/tests.textproto", tests));
}

TEST(ServerRulesDirTest, ServesTheGoodVersionAndReportsTheBrokenOneRejected) {
  TempDir dir;
  MakeRulesWithBrokenVersion(dir.path(), /*include_good=*/true);
  // Plain (unsigned) copies of the files: development mode.
  Server server(dir.path(), {"--allow_unsigned"});
  ASSERT_TRUE(server.started());
  EXPECT_EQ(server.Health(""), HealthCheckResponse::SERVING);

  const cds::v1::ListRuleSetsResponse list = server.List();
  ASSERT_EQ(list.rule_sets_size(), 2) << list.DebugString();
  EXPECT_EQ(list.rule_sets(0).ref().version(), "1.0.0");
  EXPECT_EQ(list.rule_sets(0).state(), cds::v1::RuleSetInfo::AVAILABLE);
  EXPECT_TRUE(list.rule_sets(0).is_default());
  EXPECT_EQ(list.rule_sets(1).ref().version(), "9.9.9");
  EXPECT_EQ(list.rule_sets(1).state(), cds::v1::RuleSetInfo::REJECTED);
  EXPECT_FALSE(list.rule_sets(1).is_default());
  EXPECT_TRUE(absl::StrContains(list.rule_sets(1).reason(), "no_such_concept"))
      << list.rule_sets(1).reason();

  // The default is the highest AVAILABLE version, not the highest number.
  cds::v1::EvaluateResponse response;
  cds::v1::EvaluateRequest request = IpexRequest(LoadPatient("triad_boy.json"));
  ASSERT_TRUE(server.Evaluate(request, &response).ok());
  EXPECT_EQ(response.rule_set().version(), "1.0.0");
  request.set_version("9.9.9");
  EXPECT_EQ(server.Evaluate(request, &response).error_code(), grpc::StatusCode::NOT_FOUND);

  // A clear log line for the rejected version.
  EXPECT_TRUE(absl::StrContains(server.process().Stderr(), "ipex@9.9.9 REJECTED"))
      << server.process().Stderr();
}

TEST(ServerRulesDirTest, NothingServableMeansNotServingAndUnavailable) {
  TempDir dir;
  MakeRulesWithBrokenVersion(dir.path(), /*include_good=*/false);
  Server server(dir.path(), {"--allow_unsigned"});
  ASSERT_TRUE(server.started());
  EXPECT_EQ(server.Health(""), HealthCheckResponse::NOT_SERVING);
  EXPECT_EQ(server.Health("cds.v1.DecisionSupport"), HealthCheckResponse::NOT_SERVING);
  cds::v1::EvaluateResponse response;
  EXPECT_EQ(server.Evaluate(IpexRequest(LoadPatient("triad_boy.json")), &response).error_code(),
            grpc::StatusCode::UNAVAILABLE);
}

TEST(ServerRulesDirTest, MissingRulesDirectoryIsAStartupError) {
  ServerProcess process;
  std::string error;
  EXPECT_FALSE(process.Start(CDS_SERVER_BINARY,
                             {"--listen", "127.0.0.1:0", "--rules_dir", "/nonexistent/rules"},
                             &error, 30));
  EXPECT_TRUE(absl::StrContains(error, "/nonexistent/rules")) << error;
}

}  // namespace
}  // namespace cds
