// The service layer without a network: status conversion, evaluation ids, and
// EvaluateOnce against a store loaded from the bundled rules.

#include <chrono>
#include <memory>
#include <set>
#include <thread>
#include <vector>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "grpcpp/grpcpp.h"
#include "grpcpp/support/server_interceptor.h"
#include "google/protobuf/text_format.h"
#include "gtest/gtest.h"
#include "server/service/decision_service.h"
#include "server/service/grpc_status.h"
#include "server/store/rule_store.h"
#include "tests/test_util.h"

namespace cds::service {
namespace {

TEST(GrpcStatusTest, CodesAreNumericallyEqualAndMessagesCapped) {
  EXPECT_TRUE(ToGrpcStatus(absl::OkStatus()).ok());
  for (int code = 1; code <= 16; ++code) {
    const grpc::Status status = ToGrpcStatus(absl::Status(static_cast<absl::StatusCode>(code), "m"));
    EXPECT_EQ(static_cast<int>(status.error_code()), code);
    EXPECT_EQ(status.error_message(), "m");
  }
  const grpc::Status long_status =
      ToGrpcStatus(absl::InvalidArgumentError(std::string(10000, 'x')));
  EXPECT_LE(long_status.error_message().size(), kMaxStatusMessageChars + 3);
  EXPECT_EQ(ToGrpcStatus(absl::Status(static_cast<absl::StatusCode>(99), "odd")).error_code(),
            grpc::StatusCode::UNKNOWN);
}

TEST(DecisionServiceTest, EvaluationIdsAreDistinctVersion4Uuids) {
  std::set<std::string> seen;
  for (int i = 0; i < 1000; ++i) {
    const std::string id = NewUuidV4();
    ASSERT_EQ(id.size(), 36u);
    for (size_t c = 0; c < id.size(); ++c) {
      if (c == 8 || c == 13 || c == 18 || c == 23) {
        EXPECT_EQ(id[c], '-') << id;
      } else {
        EXPECT_NE(std::string("0123456789abcdef").find(id[c]), std::string::npos) << id;
      }
    }
    EXPECT_EQ(id[14], '4') << id;
    EXPECT_NE(std::string("89ab").find(id[19]), std::string::npos) << id;
    seen.insert(id);
  }
  EXPECT_EQ(seen.size(), 1000u);
}

// The benchmarks' typical patient (30 findings, 5 labs, 3 relatives) parses within the
// handler's stack block: no heap block for the arena on every call.
TEST(DecisionServiceTest, TypicalRequestParsesWithinTheStackBlock) {
  const std::string text =
      cds::testing::ReadFileOrEmpty(std::string(CDS_SOURCE_DIR) + "/bench/typical_patient.textproto");
  ASSERT_FALSE(text.empty());
  cds::v1::EvaluateRequest typical;
  ASSERT_TRUE(google::protobuf::TextFormat::ParseFromString(text, typical.mutable_patient()));
  const std::string bytes = typical.SerializeAsString();
  grpc::Slice slice(bytes);
  const grpc::ByteBuffer buffer(&slice, 1);
  StackArenaRequest<cds::v1::EvaluateRequest> request;
  ASSERT_TRUE(request.Parse(buffer).ok());
  EXPECT_EQ(request.request().patient().findings_size(), 30);
  EXPECT_EQ(request.arena().SpaceAllocated(),
            StackArenaRequest<cds::v1::EvaluateRequest>::kFirstBlockSize);
}

class EvaluateOnceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    absl::StatusOr<int> available = store_.LoadFromDirectory(std::string(CDS_SOURCE_DIR) + "/rules");
    ASSERT_TRUE(available.ok()) << available.status();
    ASSERT_GT(*available, 0);
  }

  static cds::v1::EvaluateRequest Request() {
    cds::v1::EvaluateRequest request;
    request.set_rule_set("ipex");
    cds::v1::Patient* patient = request.mutable_patient();
    patient->set_sex(cds::v1::MALE);
    patient->mutable_age()->set_days(60);
    cds::v1::Finding* finding = patient->add_findings();
    finding->mutable_term()->set_code("HP:0002028");
    finding->set_status(cds::v1::Finding::PRESENT);
    return request;
  }

  static store::RuleStore::Options TrustTheProjectKey() {
    store::RuleStore::Options options;
    options.trusted_keys_dir = std::string(CDS_SOURCE_DIR) + "/rules/keys";
    return options;
  }

  store::RuleStore store_{TrustTheProjectKey()};
};

TEST_F(EvaluateOnceTest, FillsIdTimeAndRuleSetAndCountsTheEvaluation) {
  cds::v1::EvaluateResponse response;
  ASSERT_TRUE(EvaluateOnce(store_, Request(), &response).ok());
  EXPECT_EQ(response.rule_set().name(), "ipex");
  EXPECT_EQ(response.evaluation_id().size(), 36u);
  EXPECT_GT(response.evaluated_at().seconds(), 0);
  EXPECT_FALSE(response.suggestions().empty());
  ASSERT_TRUE(EvaluateOnce(store_, Request(), &response).ok());
  int64_t count = 0;
  for (const cds::v1::RuleSetInfo& info : store_.List("ipex")) {
    if (info.is_default()) count = info.evaluation_count();
  }
  EXPECT_EQ(count, 2);
}

TEST_F(EvaluateOnceTest, ExplanationsAreCompactUnlessTheFullTraceIsAsked) {
  auto evaluate = [&](cds::v1::Explanation explanation) {
    cds::v1::EvaluateRequest request = Request();
    request.set_explanation(explanation);
    cds::v1::EvaluateResponse response;
    EXPECT_TRUE(EvaluateOnce(store_, request, &response).ok());
    return response;
  };
  const cds::v1::EvaluateResponse unset = evaluate(cds::v1::EXPLANATION_UNSPECIFIED);
  const cds::v1::EvaluateResponse compact = evaluate(cds::v1::EXPLANATION_COMPACT);
  const cds::v1::EvaluateResponse full = evaluate(cds::v1::EXPLANATION_FULL);
  const cds::v1::EvaluateResponse none = evaluate(cds::v1::EXPLANATION_NONE);
  // The same suggestions in the same order whatever the explanation.
  for (const auto* r : {&unset, &compact, &none}) {
    ASSERT_EQ(r->suggestions_size(), full.suggestions_size());
    for (int i = 0; i < full.suggestions_size(); ++i) {
      EXPECT_EQ(r->suggestions(i).rule_id(), full.suggestions(i).rule_id());
      EXPECT_EQ(r->suggestions(i).probability(), full.suggestions(i).probability());
    }
  }
  int full_items = 0;
  int described = 0;
  for (const auto& s : full.suggestions()) {
    full_items += s.evidence_size();
    for (const auto& e : s.evidence()) described += e.description().empty() ? 0 : 1;
  }
  EXPECT_GT(full_items, 0);
  EXPECT_EQ(described, full_items);
  // Compact (also when unset): rule id, effect, source and matched codes, no description.
  int compact_items = 0;
  for (const auto* r : {&unset, &compact}) {
    compact_items = 0;
    for (const auto& s : r->suggestions()) {
      for (const auto& e : s.evidence()) {
        ++compact_items;
        EXPECT_FALSE(e.rule_id().empty());
        EXPECT_TRUE(absl::StrContains(e.source(), "ruleset.textproto:")) << e.source();
        EXPECT_NE(e.effect(), cds::v1::Evidence::EFFECT_UNSPECIFIED);
        if (s.kind() == cds::v1::DIAGNOSIS) {
          EXPECT_TRUE(e.description().empty()) << e.description();
          EXPECT_TRUE(e.has_likelihood_ratio());
        }
      }
    }
    EXPECT_GT(compact_items, 0);
  }
  EXPECT_LT(compact.ByteSizeLong(), full.ByteSizeLong());
  for (const auto& s : none.suggestions()) EXPECT_EQ(s.evidence_size(), 0);
}

TEST_F(EvaluateOnceTest, ValidatesBeforeResolving) {
  cds::v1::EvaluateResponse response;
  cds::v1::EvaluateRequest request = Request();
  request.clear_rule_set();
  absl::Status status = EvaluateOnce(store_, request, &response);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(status.message(), "rule_set is required");

  request = Request();
  request.clear_patient();
  status = EvaluateOnce(store_, request, &response);
  EXPECT_EQ(status.message(), "patient is required");

  // A malformed patient is INVALID_ARGUMENT even for an unknown rule set.
  request = Request();
  request.set_rule_set("unknown");
  request.mutable_patient()->set_sex(cds::v1::SEX_UNSPECIFIED);
  EXPECT_EQ(EvaluateOnce(store_, request, &response).code(), absl::StatusCode::kInvalidArgument);
  request.mutable_patient()->set_sex(cds::v1::MALE);
  EXPECT_EQ(EvaluateOnce(store_, request, &response).code(), absl::StatusCode::kNotFound);
}

// Holds every call after its request arrives for longer than the client will wait.
class SlowInterceptor : public grpc::experimental::Interceptor {
 public:
  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    if (methods->QueryInterceptionHookPoint(
            grpc::experimental::InterceptionHookPoints::POST_RECV_MESSAGE)) {
      std::this_thread::sleep_for(std::chrono::milliseconds(400));
    }
    methods->Proceed();
  }
};
class SlowInterceptorFactory : public grpc::experimental::ServerInterceptorFactoryInterface {
 public:
  grpc::experimental::Interceptor* CreateServerInterceptor(
      grpc::experimental::ServerRpcInfo* /*info*/) override {
    return new SlowInterceptor;
  }
};

TEST_F(EvaluateOnceTest, CallPastItsDeadlineIsNotEvaluated) {
  DecisionServiceImpl service(store_);
  grpc::ServerBuilder builder;
  builder.RegisterService(&service);
  std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>> creators;
  creators.push_back(std::make_unique<SlowInterceptorFactory>());
  builder.experimental().SetInterceptorCreators(std::move(creators));
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  ASSERT_NE(server, nullptr);
  auto stub = cds::v1::DecisionSupport::NewStub(server->InProcessChannel(grpc::ChannelArguments()));
  auto evaluations = [&] {
    int64_t count = 0;
    for (const cds::v1::RuleSetInfo& info : store_.List("ipex")) count += info.evaluation_count();
    return count;
  };

  grpc::ClientContext late;
  late.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(100));
  cds::v1::EvaluateResponse response;
  EXPECT_EQ(stub->Evaluate(&late, Request(), &response).error_code(),
            grpc::StatusCode::DEADLINE_EXCEEDED);
  // The same call with time to spare is evaluated (after the first has been handled).
  grpc::ClientContext in_time;
  in_time.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(20));
  const grpc::Status status = stub->Evaluate(&in_time, Request(), &response);
  EXPECT_TRUE(status.ok()) << status.error_message();
  server->Shutdown();
  EXPECT_EQ(evaluations(), 1);
}

TEST(EvaluateOnceEmptyStoreTest, IsUnavailable) {
  store::RuleStore empty;
  cds::v1::EvaluateRequest request;
  request.set_rule_set("ipex");
  request.mutable_patient()->set_sex(cds::v1::MALE);
  request.mutable_patient()->mutable_age()->set_days(10);
  cds::v1::EvaluateResponse response;
  EXPECT_EQ(EvaluateOnce(empty, request, &response).code(), absl::StatusCode::kUnavailable);
}

}  // namespace
}  // namespace cds::service
