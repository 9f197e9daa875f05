// Operations against the real cds-server binary (issue 7): the Prometheus endpoint is
// scraped after real calls; every log line is one JSON object and --log_level filters
// them; on SIGTERM health turns NOT_SERVING, new calls are refused with UNAVAILABLE,
// calls in flight finish within --grace_period (none is dropped), and the process exits 0.

#include <signal.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <iterator>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "cds/v1/service.grpc.pb.h"
#include "client/input.h"
#include "google/protobuf/struct.pb.h"
#include "google/protobuf/util/json_util.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "httplib.h"
#include "tests/example_request.h"
#include "tests/test_util.h"

namespace cds {
namespace {

using ::cds::testing::CommandResult;
using ::cds::testing::RunCommand;
using ::cds::testing::ServerProcess;
using ::grpc::health::v1::HealthCheckRequest;
using ::grpc::health::v1::HealthCheckResponse;

const std::string kSourceDir = CDS_SOURCE_DIR;
// Marks the patients, so a test can tell whether any of them leaks out.
constexpr char kReference[] = "ops-ref-77a1f0";

cds::v1::EvaluateRequest IpexRequest(const std::string& example) {
  return cds::testing::ExampleIpexRequest(example, kReference);
}

// The number after `series` (a full series name with labels) in a scrape, or -1.
double SeriesValue(const std::string& scrape, const std::string& series) {
  for (absl::string_view line : absl::StrSplit(scrape, '\n')) {
    if (absl::StartsWith(line, series + " ")) {
      double value = -1;
      if (absl::SimpleAtod(line.substr(series.size() + 1), &value)) return value;
    }
  }
  return -1;
}

// The port of the "metrics on http://HOST:PORT/metrics" log line, or 0.
int MetricsPort(const std::string& log) {
  const std::string marker = "metrics on http://127.0.0.1:";
  const size_t at = log.find(marker);
  if (at == std::string::npos) return 0;
  return std::atoi(log.c_str() + at + marker.size());
}

std::string Scrape(int port) {
  httplib::Client client("127.0.0.1", port);
  httplib::Result result = client.Get("/metrics");
  if (!result || result->status != 200) return "";
  EXPECT_TRUE(absl::StartsWith(result->get_header_value("Content-Type"), "text/plain"));
  return result->body;
}

class OperationsTest : public ::testing::Test {
 protected:
  void Start(const std::vector<std::string>& extra) {
    std::vector<std::string> flags = {"--listen", "127.0.0.1:0", "--rules_dir",
                                      kSourceDir + "/rules", "--poll_interval", "0"};
    flags.insert(flags.end(), extra.begin(), extra.end());
    std::string error;
    ASSERT_TRUE(server_.Start(CDS_SERVER_BINARY, flags, &error)) << error;
    channel_ = grpc::CreateChannel(server_.address(), grpc::InsecureChannelCredentials());
    stub_ = cds::v1::DecisionSupport::NewStub(channel_);
  }

  grpc::Status Evaluate(const cds::v1::EvaluateRequest& request,
                        cds::v1::DecisionSupport::Stub& stub) {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    cds::v1::EvaluateResponse response;
    return stub.Evaluate(&context, request, &response);
  }

  ServerProcess server_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<cds::v1::DecisionSupport::Stub> stub_;
};

TEST_F(OperationsTest, ScrapeCountsCallsByMethodAndStatusAndEvaluationsByVersion) {
  Start({"--metrics_listen", "127.0.0.1:0", "--grace_period", "0s"});
  const int metrics_port = MetricsPort(server_.Stderr());
  ASSERT_GT(metrics_port, 0) << server_.Stderr();

  const cds::v1::EvaluateRequest boy = IpexRequest("triad_boy.json");
  ASSERT_TRUE(Evaluate(boy, *stub_).ok());
  ASSERT_TRUE(Evaluate(boy, *stub_).ok());
  cds::v1::EvaluateRequest malformed = boy;
  malformed.mutable_patient()->set_sex(cds::v1::SEX_UNSPECIFIED);
  EXPECT_EQ(Evaluate(malformed, *stub_).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  cds::v1::EvaluateRequest missing = boy;
  missing.set_version("9.9.9");
  EXPECT_EQ(Evaluate(missing, *stub_).error_code(), grpc::StatusCode::NOT_FOUND);
  {
    grpc::ClientContext context;
    cds::v1::ListRuleSetsResponse list;
    ASSERT_TRUE(stub_->ListRuleSets(&context, cds::v1::ListRuleSetsRequest(), &list).ok());
  }

  const std::string scrape = Scrape(metrics_port);
  ASSERT_FALSE(scrape.empty());
  const std::string evaluate =
      "grpc_service=\"cds.v1.DecisionSupport\",grpc_method=\"Evaluate\",grpc_code=";
  EXPECT_EQ(SeriesValue(scrape, "grpc_server_handled_total{" + evaluate + "\"OK\"}"), 2)
      << scrape;
  EXPECT_EQ(SeriesValue(scrape, "grpc_server_handled_total{" + evaluate + "\"INVALID_ARGUMENT\"}"),
            1);
  EXPECT_EQ(SeriesValue(scrape, "grpc_server_handled_total{" + evaluate + "\"NOT_FOUND\"}"), 1);
  EXPECT_EQ(SeriesValue(scrape, "grpc_server_handling_seconds_count{" + evaluate + "\"OK\"}"), 2);
  EXPECT_EQ(SeriesValue(scrape, "grpc_server_handling_seconds_bucket{" + evaluate +
                                    "\"OK\",le=\"+Inf\"}"),
            2);
  EXPECT_EQ(SeriesValue(scrape,
                        "grpc_server_handled_total{grpc_service=\"cds.v1.DecisionSupport\","
                        "grpc_method=\"ListRuleSets\",grpc_code=\"OK\"}"),
            1);
  // The default version (1.1.1) ranks IPEX first for the triad boy.
  EXPECT_EQ(SeriesValue(scrape, "cds_evaluations_total{rule_set=\"ipex\",version=\"1.1.1\","
                                "top_diagnosis=\"ipex\"}"),
            2)
      << scrape;
  // Every bundled ipex version is available.
  const auto bundled = std::distance(std::filesystem::directory_iterator(kSourceDir + "/rules/ipex"),
                                     std::filesystem::directory_iterator());
  EXPECT_EQ(SeriesValue(scrape, "cds_rule_set_versions{rule_set=\"ipex\",state=\"AVAILABLE\"}"),
            static_cast<double>(bundled));
  EXPECT_EQ(SeriesValue(scrape, "cds_audit_queue_depth"), 0);
  EXPECT_GT(SeriesValue(scrape, "process_resident_memory_bytes"), 1 << 20);
  EXPECT_GT(SeriesValue(scrape, "process_open_fds"), 2);
  EXPECT_FALSE(absl::StrContains(scrape, kReference));
  EXPECT_EQ(server_.Stop(SIGTERM), 0);
}

TEST_F(OperationsTest, EveryLogLineIsOneJsonObjectWithoutPatientData) {
  Start({"--grace_period", "0s", "--log_level", "debug"});
  cds::v1::EvaluateRequest malformed = IpexRequest("triad_boy.json");
  malformed.mutable_patient()->set_sex(cds::v1::SEX_UNSPECIFIED);
  EXPECT_FALSE(Evaluate(malformed, *stub_).ok());
  EXPECT_TRUE(Evaluate(IpexRequest("triad_boy.json"), *stub_).ok());
  ASSERT_EQ(server_.Stop(SIGTERM), 0);
  const std::string log = server_.Stderr();
  int lines = 0;
  for (absl::string_view line : absl::StrSplit(log, '\n', absl::SkipEmpty())) {
    google::protobuf::Struct object;
    ASSERT_TRUE(google::protobuf::util::JsonStringToMessage(std::string(line), &object).ok())
        << line;
    EXPECT_TRUE(object.fields().contains("time")) << line;
    EXPECT_TRUE(object.fields().contains("level")) << line;
    EXPECT_TRUE(object.fields().contains("message")) << line;
    ++lines;
  }
  EXPECT_GE(lines, 5);
  EXPECT_FALSE(absl::StrContains(log, kReference));
}

TEST_F(OperationsTest, LogLevelDropsLinesBelowIt) {
  const std::vector<std::string> args = {CDS_SERVER_BINARY, "--listen", "127.0.0.1:0",
                                         "--insecure_dev", "--rules_dir", "/nonexistent-rules"};
  std::vector<std::string> quiet = args;
  quiet.push_back("--log_level=error");
  const CommandResult info = RunCommand(args);
  const CommandResult errors_only = RunCommand(quiet);
  EXPECT_NE(info.exit_code, 0);
  EXPECT_NE(errors_only.exit_code, 0);
  EXPECT_TRUE(absl::StrContains(info.err, "\"level\":\"WARNING\"")) << info.err;
  EXPECT_FALSE(absl::StrContains(errors_only.err, "\"level\":\"WARNING\"")) << errors_only.err;
  EXPECT_TRUE(absl::StrContains(errors_only.err, "\"level\":\"ERROR\"")) << errors_only.err;

  std::vector<std::string> bad = args;
  bad.push_back("--log_level=chatty");
  const CommandResult refused = RunCommand(bad);
  EXPECT_EQ(refused.exit_code, 2);
  EXPECT_TRUE(absl::StrContains(refused.err, "--log_level")) << refused.err;
}

TEST_F(OperationsTest, SigtermFinishesCallsInFlightRefusesNewOnesAndExitsZero) {
  Start({"--grace_period", "30s"});
  auto health = grpc::health::v1::Health::NewStub(channel_);

  {  // Names it does not serve are NOT_FOUND, as the health protocol says.
    grpc::ClientContext context;
    HealthCheckRequest request;
    request.set_service("no.such.Service");
    HealthCheckResponse response;
    EXPECT_EQ(health->Check(&context, request, &response).error_code(),
              grpc::StatusCode::NOT_FOUND);
  }

  // A health watcher and a screening stream, both open before the signal.
  grpc::ClientContext watch_context;
  HealthCheckRequest watched;
  watched.set_service("cds.v1.DecisionSupport");
  auto watch = health->Watch(&watch_context, watched);
  HealthCheckResponse status;
  ASSERT_TRUE(watch->Read(&status));
  EXPECT_EQ(status.status(), HealthCheckResponse::SERVING);

  grpc::ClientContext stream_context;
  stream_context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
  auto stream = stub_->EvaluateStream(&stream_context);
  cds::v1::StreamEvaluateRequest item;
  *item.mutable_request() = IpexRequest("triad_boy.json");
  cds::v1::StreamEvaluateResponse result;
  ASSERT_TRUE(stream->Write(item));
  ASSERT_TRUE(stream->Read(&result));
  ASSERT_TRUE(result.has_response());

  const auto signalled = std::chrono::steady_clock::now();
  ASSERT_EQ(kill(server_.pid(), SIGTERM), 0);

  // Health turns NOT_SERVING at once for the watcher.
  ASSERT_TRUE(watch->Read(&status));
  EXPECT_EQ(status.status(), HealthCheckResponse::NOT_SERVING);

  // Soon new calls, on a new channel, are refused with UNAVAILABLE. (Until the signal is
  // handled they are served; a call that reaches the listener while gRPC closes it is
  // cancelled by gRPC's transport: keep trying until the listener is gone.)
  grpc::StatusCode refused = grpc::StatusCode::OK;
  for (int i = 0; i < 100 && refused != grpc::StatusCode::UNAVAILABLE; ++i) {
    auto fresh = cds::v1::DecisionSupport::NewStub(
        grpc::CreateChannel(server_.address(), grpc::InsecureChannelCredentials()));
    refused = Evaluate(IpexRequest("triad_boy.json"), *fresh).error_code();
    EXPECT_TRUE(refused == grpc::StatusCode::OK || refused == grpc::StatusCode::CANCELLED ||
                refused == grpc::StatusCode::UNAVAILABLE)
        << refused;
    if (refused != grpc::StatusCode::UNAVAILABLE) {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  }
  EXPECT_EQ(refused, grpc::StatusCode::UNAVAILABLE);

  // The stream that was in flight goes on being served for a while, in full.
  for (int i = 1; i <= 20; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    item.set_correlation_id(absl::StrCat(i));
    ASSERT_TRUE(stream->Write(item)) << "write " << i;
    ASSERT_TRUE(stream->Read(&result)) << "read " << i;
    EXPECT_EQ(result.index(), i);
    EXPECT_TRUE(result.has_response()) << result.error().message();
  }
  ASSERT_TRUE(stream->WritesDone());
  EXPECT_FALSE(stream->Read(&result));
  const grpc::Status finished = stream->Finish();
  EXPECT_TRUE(finished.ok()) << finished.error_code() << " " << finished.error_message();
  watch_context.TryCancel();
  watch->Finish().IgnoreError();

  // It exits 0 as soon as nothing is in flight, well before the grace period ends.
  EXPECT_EQ(server_.WaitForExit(20), 0) << server_.Stderr();
  EXPECT_LT(std::chrono::steady_clock::now() - signalled, std::chrono::seconds(20));
}

TEST_F(OperationsTest, CallsStillRunningAfterTheGracePeriodAreCancelledAndExitIsZero) {
  Start({"--grace_period", "1s"});
  grpc::ClientContext stream_context;
  stream_context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
  auto stream = stub_->EvaluateStream(&stream_context);
  cds::v1::StreamEvaluateRequest item;
  *item.mutable_request() = IpexRequest("triad_boy.json");
  cds::v1::StreamEvaluateResponse result;
  ASSERT_TRUE(stream->Write(item));
  ASSERT_TRUE(stream->Read(&result));

  const auto signalled = std::chrono::steady_clock::now();
  ASSERT_EQ(kill(server_.pid(), SIGTERM), 0);
  // The client never ends its stream: the server cancels it after the grace period.
  EXPECT_FALSE(stream->Read(&result));
  const grpc::Status finished = stream->Finish();
  EXPECT_FALSE(finished.ok());
  EXPECT_EQ(server_.WaitForExit(20), 0) << server_.Stderr();
  const auto took = std::chrono::steady_clock::now() - signalled;
  EXPECT_GE(took, std::chrono::milliseconds(900));
  EXPECT_LT(took, std::chrono::seconds(15));
}

// Callers that keep calling through the shutdown get answers or refusals, nothing else:
// UNAVAILABLE, or CANCELLED for a call that reached the listener just as gRPC closed it
// (gRPC's transport cancels those before any handler sees them).
TEST_F(OperationsTest, UnaryCallersDuringShutdownAreAnsweredOrRefused) {
  Start({"--grace_period", "10s"});
  std::atomic<bool> stop{false};
  std::atomic<int> ok{0}, refused{0}, other{0};
  std::mutex mu;
  std::string others;
  std::vector<std::thread> callers;
  for (int t = 0; t < 4; ++t) {
    callers.emplace_back([&] {
      auto stub = cds::v1::DecisionSupport::NewStub(
          grpc::CreateChannel(server_.address(), grpc::InsecureChannelCredentials()));
      const cds::v1::EvaluateRequest request = IpexRequest("triad_boy.json");
      while (!stop.load()) {
        const grpc::Status status = Evaluate(request, *stub);
        if (status.ok()) ++ok;
        else if (status.error_code() == grpc::StatusCode::UNAVAILABLE ||
                 status.error_code() == grpc::StatusCode::CANCELLED) {
          ++refused;
        } else {
          ++other;
          std::lock_guard<std::mutex> lock(mu);
          absl::StrAppend(&others, status.error_code(), " ", status.error_message(), "\n");
        }
      }
    });
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  ASSERT_EQ(kill(server_.pid(), SIGTERM), 0);
  const int exit_code = server_.WaitForExit(20);
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  stop.store(true);
  for (std::thread& t : callers) t.join();
  EXPECT_EQ(exit_code, 0) << server_.Stderr();
  EXPECT_GT(ok.load(), 0);
  EXPECT_GT(refused.load(), 0);
  EXPECT_EQ(other.load(), 0) << others;
}

}  // namespace
}  // namespace cds
