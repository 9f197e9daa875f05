// DecisionSupport.EvaluateStream and `cdsctl screen` against the real cds-server binary:
// results come back in order with their correlation ids, a malformed patient in the middle
// gets its own error while the others succeed, the stream keeps going after errors, a
// client that writes everything before reading is served in full (flow control). Also the
// --noop_baseline mode the load generator compares against.

#include <chrono>
#include <memory>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "cds/v1/service.grpc.pb.h"
#include "client/input.h"
#include "google/protobuf/util/json_util.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "tests/example_request.h"
#include "tests/test_util.h"

namespace cds {
namespace {

using ::cds::testing::ServerProcess;
using ::cds::testing::TempDir;
using StreamRequest = ::cds::v1::StreamEvaluateRequest;
using StreamResponse = ::cds::v1::StreamEvaluateResponse;

const std::string kSourceDir = CDS_SOURCE_DIR;
// Marks the patients so a test can tell whether any of them leaks into a message.
constexpr char kReference[] = "pseudo-ref-5c21e8";

cds::v1::EvaluateRequest IpexRequest(const std::string& example) {
  return cds::testing::ExampleIpexRequest(example, kReference);
}

std::string OneLineJson(const google::protobuf::Message& message) {
  std::string text;
  EXPECT_TRUE(google::protobuf::util::MessageToJsonString(message, &text).ok());
  return text;
}

class StreamTest : public ::testing::Test {
 protected:
  void SetUp() override { Start({}); }

  void Start(const std::vector<std::string>& extra) {
    std::string error;
    std::vector<std::string> flags = {"--listen", "127.0.0.1:0", "--rules_dir",
                                      kSourceDir + "/rules", "--drain", "0s"};
    flags.insert(flags.end(), extra.begin(), extra.end());
    ASSERT_TRUE(server_.Start(CDS_SERVER_BINARY, flags, &error)) << error;
    channel_ = grpc::CreateChannel(server_.address(), grpc::InsecureChannelCredentials());
    stub_ = cds::v1::DecisionSupport::NewStub(channel_);
  }

  // Writes every request (from a thread of its own, before reading anything), then reads
  // every response. Returns the stream's final status.
  grpc::Status RunStream(const std::vector<StreamRequest>& requests,
                         std::vector<StreamResponse>* responses) {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    auto stream = stub_->EvaluateStream(&context);
    std::thread writer([&] {
      for (const StreamRequest& request : requests) {
        if (!stream->Write(request)) return;
      }
      stream->WritesDone();
    });
    StreamResponse response;
    while (stream->Read(&response)) responses->push_back(response);
    writer.join();
    return stream->Finish();
  }

  ServerProcess server_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<cds::v1::DecisionSupport::Stub> stub_;
};

StreamRequest Wrap(const cds::v1::EvaluateRequest& request, const std::string& id) {
  StreamRequest message;
  message.set_correlation_id(id);
  *message.mutable_request() = request;
  return message;
}

TEST_F(StreamTest, MalformedPatientInTheMiddleGetsItsOwnErrorAndTheRestSucceed) {
  const cds::v1::EvaluateRequest boy = IpexRequest("triad_boy.json");
  cds::v1::EvaluateRequest malformed = boy;
  malformed.mutable_patient()->set_sex(cds::v1::SEX_UNSPECIFIED);
  cds::v1::EvaluateRequest unknown_rule_set = boy;
  unknown_rule_set.set_rule_set("no-such-rule-set");
  const std::vector<StreamRequest> requests = {
      Wrap(boy, "a"), Wrap(IpexRequest("triad_girl.json"), "b"), Wrap(malformed, "c"),
      Wrap(unknown_rule_set, "d"), StreamRequest(), Wrap(boy, "f")};

  std::vector<StreamResponse> responses;
  const grpc::Status status = RunStream(requests, &responses);
  ASSERT_TRUE(status.ok()) << status.error_message();
  ASSERT_EQ(responses.size(), requests.size());
  for (size_t i = 0; i < responses.size(); ++i) {
    EXPECT_EQ(responses[i].index(), static_cast<int64_t>(i));
    EXPECT_EQ(responses[i].correlation_id(), requests[i].correlation_id());
  }
  for (size_t i : {0, 1, 5}) {
    ASSERT_TRUE(responses[i].has_response()) << i << ": " << responses[i].error().message();
    EXPECT_EQ(responses[i].response().rule_set().name(), "ipex");
    EXPECT_GT(responses[i].response().suggestions_size(), 0);
    EXPECT_FALSE(responses[i].response().evaluation_id().empty());
  }
  // The same patient gives the same suggestions on a stream as on its own.
  grpc::ClientContext context;
  cds::v1::EvaluateResponse unary;
  ASSERT_TRUE(stub_->Evaluate(&context, boy, &unary).ok());
  ASSERT_EQ(unary.suggestions_size(), responses[0].response().suggestions_size());
  for (int i = 0; i < unary.suggestions_size(); ++i) {
    EXPECT_EQ(unary.suggestions(i).rule_id(), responses[0].response().suggestions(i).rule_id());
  }

  ASSERT_TRUE(responses[2].has_error());
  EXPECT_EQ(responses[2].error().code(), static_cast<int>(grpc::StatusCode::INVALID_ARGUMENT));
  EXPECT_TRUE(absl::StrContains(responses[2].error().message(), "sex"))
      << responses[2].error().message();
  ASSERT_TRUE(responses[3].has_error());
  EXPECT_EQ(responses[3].error().code(), static_cast<int>(grpc::StatusCode::NOT_FOUND));
  ASSERT_TRUE(responses[4].has_error());
  EXPECT_EQ(responses[4].error().code(), static_cast<int>(grpc::StatusCode::INVALID_ARGUMENT));
  for (const StreamResponse& r : responses) {
    EXPECT_FALSE(absl::StrContains(r.error().message(), kReference));
  }
  EXPECT_FALSE(absl::StrContains(server_.Stderr(), kReference));
}

// The stream renders its responses itself (as the unary Evaluate does): for the same
// patients, each response is the unary one in every field but the evaluation's id and time,
// and each error is the unary call's status.
TEST_F(StreamTest, StreamedResponsesAreTheUnaryOnes) {
  std::vector<cds::v1::EvaluateRequest> patients;
  for (const char* example :
       {"triad_boy.json", "triad_girl.json", "little_data.json", "maternal_uncle_boy.json",
        "neonatal_diabetes_boy.json", "wiskott_aldrich_boy.json"}) {
    patients.push_back(IpexRequest(example));
  }
  cds::v1::EvaluateRequest full = patients[0];
  full.set_explanation(cds::v1::EXPLANATION_FULL);
  cds::v1::EvaluateRequest none = patients[1];
  none.set_explanation(cds::v1::EXPLANATION_NONE);
  cds::v1::EvaluateRequest malformed = patients[0];
  malformed.mutable_patient()->set_sex(cds::v1::SEX_UNSPECIFIED);
  cds::v1::EvaluateRequest unknown_rule_set = patients[0];
  unknown_rule_set.set_rule_set("no-such-rule-set");
  patients.insert(patients.end(), {full, none, malformed, unknown_rule_set});

  std::vector<StreamRequest> requests;
  for (size_t i = 0; i < patients.size(); ++i) {
    // The first has no correlation id (an empty string is left out of the bytes).
    requests.push_back(Wrap(patients[i], i == 0 ? "" : absl::StrCat("patient-", i)));
  }
  std::vector<StreamResponse> responses;
  const grpc::Status status = RunStream(requests, &responses);
  ASSERT_TRUE(status.ok()) << status.error_message();
  ASSERT_EQ(responses.size(), patients.size());
  for (size_t i = 0; i < patients.size(); ++i) {
    SCOPED_TRACE(i);
    grpc::ClientContext context;
    cds::v1::EvaluateResponse unary;
    const grpc::Status unary_status = stub_->Evaluate(&context, patients[i], &unary);
    StreamResponse expected;
    expected.set_correlation_id(requests[i].correlation_id());
    expected.set_index(static_cast<int64_t>(i));
    StreamResponse streamed = responses[i];
    if (unary_status.ok()) {
      ASSERT_TRUE(streamed.has_response()) << streamed.error().message();
      EXPECT_FALSE(streamed.response().evaluation_id().empty());
      EXPECT_TRUE(streamed.response().has_evaluated_at());
      EXPECT_NE(streamed.response().evaluation_id(), unary.evaluation_id());
      for (cds::v1::EvaluateResponse* response : {&unary, streamed.mutable_response()}) {
        response->clear_evaluation_id();
        response->clear_evaluated_at();
      }
      *expected.mutable_response() = unary;
    } else {
      expected.mutable_error()->set_code(static_cast<int32_t>(unary_status.error_code()));
      expected.mutable_error()->set_message(unary_status.error_message());
    }
    EXPECT_TRUE(streamed.GetReflection()->GetUnknownFields(streamed).empty());
    EXPECT_EQ(streamed.SerializeAsString(), expected.SerializeAsString())
        << "streamed: " << OneLineJson(streamed) << "\nunary: " << OneLineJson(expected);
  }
}

TEST_F(StreamTest, ClientThatWritesEverythingFirstGetsEveryResultInOrder) {
  // Far more than the server reads ahead: it must stop reading, let HTTP/2 flow control
  // hold the writer back, and resume as the responses drain.
  const cds::v1::EvaluateRequest boy = IpexRequest("triad_boy.json");
  std::vector<StreamRequest> requests;
  for (int i = 0; i < 500; ++i) requests.push_back(Wrap(boy, absl::StrCat("p", i)));
  std::vector<StreamResponse> responses;
  const grpc::Status status = RunStream(requests, &responses);
  ASSERT_TRUE(status.ok()) << status.error_message();
  ASSERT_EQ(responses.size(), requests.size());
  for (size_t i = 0; i < responses.size(); ++i) {
    EXPECT_EQ(responses[i].correlation_id(), absl::StrCat("p", i));
    EXPECT_TRUE(responses[i].has_response());
  }
}

TEST_F(StreamTest, PatientsEvaluatedConcurrentlyAreAnsweredInRequestOrder) {
  // The server evaluates several patients of a stream at once on a pool. Every fifth
  // patient here is slow (a long record), every seventh malformed: the fast ones after a
  // slow one finish first, yet each response must come back at its request's position,
  // with its own result or error.
  const cds::v1::EvaluateRequest boy = IpexRequest("triad_boy.json");
  const cds::v1::EvaluateRequest girl = IpexRequest("triad_girl.json");
  cds::v1::EvaluateRequest slow = boy;
  while (slow.patient().findings_size() < 1500) {
    *slow.mutable_patient()->add_findings() = boy.patient().findings(
        slow.patient().findings_size() % boy.patient().findings_size());
  }
  cds::v1::EvaluateRequest malformed = girl;
  malformed.mutable_patient()->set_sex(cds::v1::SEX_UNSPECIFIED);
  // What each kind of patient gets on its own.
  std::vector<StreamResponse> alone;
  ASSERT_TRUE(RunStream({Wrap(boy, "boy"), Wrap(girl, "girl"), Wrap(slow, "slow")}, &alone).ok());
  ASSERT_EQ(alone.size(), 3u);
  ASSERT_TRUE(alone[0].has_response() && alone[1].has_response() && alone[2].has_response());
  // The result without its per-call id and time.
  auto top = [](const StreamResponse& r) {
    if (!r.has_response()) return std::string("none");
    cds::v1::EvaluateResponse result = r.response();
    result.clear_evaluation_id();
    result.clear_evaluated_at();
    return result.SerializeAsString();
  };

  std::vector<StreamRequest> requests;
  std::vector<std::string> expected_top;
  for (int i = 0; i < 300; ++i) {
    const std::string id = absl::StrCat("p", i);
    if (i % 7 == 3) {
      requests.push_back(Wrap(malformed, id));
      expected_top.push_back("error");
    } else if (i % 5 == 0) {
      requests.push_back(Wrap(slow, id));
      expected_top.push_back(top(alone[2]));
    } else if (i % 2 == 0) {
      requests.push_back(Wrap(boy, id));
      expected_top.push_back(top(alone[0]));
    } else {
      requests.push_back(Wrap(girl, id));
      expected_top.push_back(top(alone[1]));
    }
  }
  std::vector<StreamResponse> responses;
  const grpc::Status status = RunStream(requests, &responses);
  ASSERT_TRUE(status.ok()) << status.error_message();
  ASSERT_EQ(responses.size(), requests.size());
  for (size_t i = 0; i < responses.size(); ++i) {
    EXPECT_EQ(responses[i].index(), static_cast<int64_t>(i));
    EXPECT_EQ(responses[i].correlation_id(), absl::StrCat("p", i));
    if (expected_top[i] == "error") {
      EXPECT_EQ(responses[i].error().code(), grpc::StatusCode::INVALID_ARGUMENT) << i;
    } else {
      EXPECT_TRUE(top(responses[i]) == expected_top[i]) << "patient " << i;
    }
  }
}

TEST_F(StreamTest, EmptyStreamEndsOk) {
  std::vector<StreamResponse> responses;
  EXPECT_TRUE(RunStream({}, &responses).ok());
  EXPECT_TRUE(responses.empty());
}

TEST_F(StreamTest, ClientCancellingMidStreamLeavesTheServerServing) {
  {
    grpc::ClientContext context;
    auto stream = stub_->EvaluateStream(&context);
    const StreamRequest request = Wrap(IpexRequest("triad_boy.json"), "x");
    for (int i = 0; i < 20; ++i) ASSERT_TRUE(stream->Write(request));
    StreamResponse response;
    ASSERT_TRUE(stream->Read(&response));
    context.TryCancel();
    EXPECT_EQ(stream->Finish().error_code(), grpc::StatusCode::CANCELLED);
  }
  std::vector<StreamResponse> responses;
  ASSERT_TRUE(RunStream({Wrap(IpexRequest("triad_boy.json"), "y")}, &responses).ok());
  ASSERT_EQ(responses.size(), 1u);
  EXPECT_TRUE(responses[0].has_response());
}

TEST_F(StreamTest, ScreenWritesOneResultPerLineInOrder) {
  TempDir dir;
  cds::v1::EvaluateRequest malformed = IpexRequest("triad_boy.json");
  malformed.mutable_patient()->set_sex(cds::v1::SEX_UNSPECIFIED);
  const std::string file = dir.path() + "/unit.jsonl";
  const std::string content = absl::StrCat(
      OneLineJson(IpexRequest("triad_boy.json").patient()), "\n",  // line 1: a Patient
      OneLineJson(malformed), "\n",                                 // line 2: refused
      "{\"patient\": {\"sex\": \"MALE\", \"findings\": [\n",         // line 3: bad JSON
      "\n",                                                         // line 4: skipped
      OneLineJson(IpexRequest("triad_girl.json")), "\n");           // line 5: a request
  ASSERT_TRUE(testing::WriteFile(file, content));

  const testing::CommandResult result = testing::RunCommand(
      {CDSCTL_BINARY, "screen", file, "--server", server_.address()});
  // A line that does not parse outranks a refused patient in the exit code.
  EXPECT_EQ(result.exit_code, 3) << result.err;
  std::vector<std::string> lines = absl::StrSplit(result.out, '\n', absl::SkipEmpty());
  ASSERT_EQ(lines.size(), 4u) << result.out;
  std::vector<StreamResponse> parsed(lines.size());
  for (size_t i = 0; i < lines.size(); ++i) {
    ASSERT_TRUE(google::protobuf::util::JsonStringToMessage(lines[i], &parsed[i]).ok())
        << lines[i];
  }
  EXPECT_EQ(parsed[0].correlation_id(), "1");
  EXPECT_TRUE(parsed[0].has_response());
  EXPECT_EQ(parsed[1].correlation_id(), "2");
  EXPECT_EQ(parsed[1].error().code(), static_cast<int>(grpc::StatusCode::INVALID_ARGUMENT));
  EXPECT_EQ(parsed[2].correlation_id(), "3");
  EXPECT_EQ(parsed[2].error().code(), static_cast<int>(grpc::StatusCode::INVALID_ARGUMENT));
  EXPECT_EQ(parsed[3].correlation_id(), "5");
  EXPECT_TRUE(parsed[3].has_response());
  for (size_t i : {1, 2}) EXPECT_FALSE(absl::StrContains(parsed[i].error().message(), kReference));
  EXPECT_FALSE(absl::StrContains(result.err, kReference));
  EXPECT_TRUE(absl::StrContains(result.err, "2 ok, 1 refused by the server, 1 malformed"))
      << result.err;
}

TEST_F(StreamTest, ScreenOfGoodPatientsExitsZero) {
  TempDir dir;
  const std::string file = dir.path() + "/unit.jsonl";
  std::string content;
  for (int i = 0; i < 30; ++i) {
    absl::StrAppend(&content, OneLineJson(IpexRequest("triad_boy.json").patient()), "\n");
  }
  ASSERT_TRUE(testing::WriteFile(file, content));
  const testing::CommandResult result = testing::RunCommand(
      {CDSCTL_BINARY, "screen", file, "--server", server_.address(), "--rule-set", "ipex@1.1.0"});
  EXPECT_EQ(result.exit_code, 0) << result.err;
  std::vector<std::string> lines = absl::StrSplit(result.out, '\n', absl::SkipEmpty());
  ASSERT_EQ(lines.size(), 30u);
  StreamResponse last;
  ASSERT_TRUE(google::protobuf::util::JsonStringToMessage(lines.back(), &last).ok());
  EXPECT_EQ(last.response().rule_set().version(), "1.1.0");
}

// `cdsctl screen` reads its file as it screens it: a file four times larger (large lines
// that do not parse, between patients that do) takes no more memory, and every line still
// gets its result in order. (It used to read the whole file and parse every line first:
// ~4 KB of memory per patient and the file itself.)
TEST_F(StreamTest, ScreenReadsItsFileAsItGoes) {
  TempDir dir;
  const std::string patient = OneLineJson(IpexRequest("triad_boy.json").patient());
  // Valid JSON, but not a Patient (findings is not a list): answered locally, never sent.
  const std::string large = absl::StrCat("{\"patient\": {\"reference\": \"",
                                         std::string(10000, 'x'), "\", \"findings\": 7}}");
  auto screen = [&](int large_lines, const std::string& name) {
    const std::string file = dir.path() + "/" + name;
    {
      // Written line by line: the peak memory a forked child reports counts this process'
      // pages until its exec.
      std::ofstream out(file, std::ios::binary);
      out << patient << "\n";
      for (int i = 0; i < large_lines; ++i) out << large << "\n";
      out << patient << "\n";
      EXPECT_TRUE(static_cast<bool>(out));
    }
    return testing::RunCommand({CDSCTL_BINARY, "screen", file, "--server", server_.address()});
  };
  const testing::CommandResult small = screen(1000, "small.jsonl");  // 10 MB
  const testing::CommandResult big = screen(4000, "big.jsonl");      // 40 MB
  for (const testing::CommandResult* result : {&small, &big}) {
    EXPECT_EQ(result->exit_code, 3) << result->err;  // lines that do not parse
    std::vector<std::string> lines = absl::StrSplit(result->out, '\n', absl::SkipEmpty());
    ASSERT_GE(lines.size(), 2u);
    StreamResponse first, last;
    ASSERT_TRUE(google::protobuf::util::JsonStringToMessage(lines.front(), &first).ok());
    ASSERT_TRUE(google::protobuf::util::JsonStringToMessage(lines.back(), &last).ok());
    EXPECT_EQ(first.correlation_id(), "1");
    EXPECT_TRUE(first.has_response());
    EXPECT_EQ(last.correlation_id(), std::to_string(lines.size()));
    EXPECT_TRUE(last.has_response());
  }
  EXPECT_TRUE(absl::StrContains(big.err, "2 ok, 0 refused by the server, 4000 malformed"))
      << big.err;
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
  // Sanitizers keep freed memory aside (ASan's quarantine) and shadow it: resident memory
  // says nothing about the program there.
  GTEST_SKIP() << "resident memory not compared under sanitizers";
#endif
  // 30 MB more input; reading it whole would add at least that.
  EXPECT_LT(big.max_rss_kib - small.max_rss_kib, 12 * 1024)
      << "small " << small.max_rss_kib << " KiB, big " << big.max_rss_kib << " KiB";
}

TEST(NoopBaselineTest, AnswersEveryCallWithTheFirstResponseWithoutEvaluating) {
  ServerProcess server;
  std::string error;
  ASSERT_TRUE(server.Start(CDS_SERVER_BINARY,
                           {"--listen", "127.0.0.1:0", "--rules_dir", kSourceDir + "/rules",
                            "--drain", "0s", "--noop_baseline"},
                           &error))
      << error;
  EXPECT_TRUE(absl::StrContains(server.Stderr(), "--noop_baseline"));
  auto stub = cds::v1::DecisionSupport::NewStub(
      grpc::CreateChannel(server.address(), grpc::InsecureChannelCredentials()));
  auto call = [&](const cds::v1::EvaluateRequest& request, cds::v1::EvaluateResponse* response) {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    return stub->Evaluate(&context, request, response);
  };
  cds::v1::EvaluateResponse first, second, third;
  ASSERT_TRUE(call(IpexRequest("triad_boy.json"), &first).ok());
  EXPECT_GT(first.suggestions_size(), 0);
  // Another patient, even a malformed one, gets the very same bytes: nothing is evaluated.
  ASSERT_TRUE(call(IpexRequest("triad_girl.json"), &second).ok());
  cds::v1::EvaluateRequest malformed = IpexRequest("triad_girl.json");
  malformed.mutable_patient()->set_sex(cds::v1::SEX_UNSPECIFIED);
  ASSERT_TRUE(call(malformed, &third).ok());
  EXPECT_EQ(second.SerializeAsString(), first.SerializeAsString());
  EXPECT_EQ(third.SerializeAsString(), first.SerializeAsString());
}

TEST(StreamAuditTest, EveryStreamedPatientIsAuditedWithoutItsReference) {
  TempDir dir;
  ASSERT_TRUE(testing::WriteFile(dir.path() + "/audit.key", std::string(48, 'k') + "secret"));
  ServerProcess server;
  std::string error;
  ASSERT_TRUE(server.Start(CDS_SERVER_BINARY,
                           {"--listen", "127.0.0.1:0", "--rules_dir", kSourceDir + "/rules",
                            "--drain", "0s", "--audit_db", dir.path() + "/audit.db",
                            "--audit_key_file", dir.path() + "/audit.key"},
                           &error))
      << error;
  auto stub = cds::v1::DecisionSupport::NewStub(
      grpc::CreateChannel(server.address(), grpc::InsecureChannelCredentials()));
  cds::v1::EvaluateRequest malformed = IpexRequest("triad_boy.json");
  malformed.mutable_patient()->set_sex(cds::v1::SEX_UNSPECIFIED);
  {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    auto stream = stub->EvaluateStream(&context);
    ASSERT_TRUE(stream->Write(Wrap(IpexRequest("triad_boy.json"), "1")));
    ASSERT_TRUE(stream->Write(Wrap(malformed, "2")));
    ASSERT_TRUE(stream->Write(Wrap(IpexRequest("triad_girl.json"), "3")));
    ASSERT_TRUE(stream->WritesDone());
    StreamResponse response;
    int ok = 0;
    while (stream->Read(&response)) ok += response.has_response() ? 1 : 0;
    ASSERT_TRUE(stream->Finish().ok());
    EXPECT_EQ(ok, 2);
  }
  const testing::CommandResult audit =
      testing::RunCommand({CDSCTL_BINARY, "audit", "--db", dir.path() + "/audit.db", "--json"});
  ASSERT_EQ(audit.exit_code, 0) << audit.err;
  std::vector<std::string> records = absl::StrSplit(audit.out, '\n', absl::SkipEmpty());
  EXPECT_EQ(records.size(), 3u) << audit.out;
  for (const std::string& record : records) {
    EXPECT_TRUE(absl::StrContains(record, "/cds.v1.DecisionSupport/EvaluateStream")) << record;
  }
  EXPECT_FALSE(absl::StrContains(audit.out, kReference));
}

}  // namespace
}  // namespace cds
