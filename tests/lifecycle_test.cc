// The rule-set lifecycle against the real cds-server binary: signed bundles published over
// cds.v1.RuleSetAdmin while concurrent clients evaluate, every kind of bad bundle, labels,
// restarts, a SIGKILL in the middle of a publish, and bundles dropped into the rules
// directory. No timed assertions: waits are for log lines or RPC completions.

#include <signal.h>
#include <stdlib.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "absl/time/clock.h"
#include "cds/v1/service.grpc.pb.h"
#include "client/input.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "server/bundle/bundle.h"
#include "tests/test_util.h"

namespace cds {
namespace {

using ::cds::testing::ServerProcess;
using ::cds::testing::TempDir;

const std::string kSourceDir = CDS_SOURCE_DIR;
const std::string kIpexDir = kSourceDir + "/rules/ipex/1.0.0";

std::chrono::system_clock::time_point Deadline(int seconds = 60) {
  return std::chrono::system_clock::now() + std::chrono::seconds(seconds);
}

// Counts occurrences of `needle` in `text`.
int Count(const std::string& text, const std::string& needle) {
  int n = 0;
  for (size_t at = text.find(needle); at != std::string::npos; at = text.find(needle, at + 1)) ++n;
  return n;
}

// A scratch deployment: rules/ with the signed ipex 1.0.0 and the ontology, rules/keys/ with
// the project key and a test author's key, and a state directory.
class Deployment {
 public:
  Deployment() : key_(bundle::PrivateKey::Generate().value()) {
    rules_ = dir_.path() + "/rules";
    state_ = dir_.path() + "/state";
    EXPECT_TRUE(testing::LinkOntologies(rules_));
    for (const char* file : {"ruleset.textproto", "tests.textproto", "MANIFEST", "MANIFEST.sig"}) {
      EXPECT_TRUE(testing::WriteFile(rules_ + "/ipex/1.0.0/" + file,
                                     testing::ReadFileOrEmpty(kIpexDir + "/" + file)));
    }
    EXPECT_TRUE(testing::WriteFile(
        rules_ + "/keys/cds-release-2025.pub",
        testing::ReadFileOrEmpty(kSourceDir + "/rules/keys/cds-release-2025.pub")));
    EXPECT_TRUE(testing::WriteFile(rules_ + "/keys/test-author.pub", key_.public_key().ToPem()));
  }

  const std::string& rules() const { return rules_; }
  const std::string& state() const { return state_; }
  const bundle::PrivateKey& key() const { return key_; }

  // The files of ipex 1.0.0 as version `version`, optionally with a text replacement.
  static std::vector<compiler::SourceFile> IpexFiles(const std::string& version,
                                                     const std::string& from = "",
                                                     const std::string& to = "") {
    std::string rules = absl::StrReplaceAll(testing::ReadFileOrEmpty(kIpexDir + "/ruleset.textproto"),
                                            {{"\"1.0.0\"", absl::StrCat("\"", version, "\"")}});
    if (!from.empty()) rules = absl::StrReplaceAll(rules, {{from, to}});
    return {{"ruleset.textproto", rules},
            {"tests.textproto", testing::ReadFileOrEmpty(kIpexDir + "/tests.textproto")}};
  }

  cds::v1::Bundle Bundle(const std::string& version, const std::string& name = "ipex") const {
    return bundle::SignFiles(name, version, IpexFiles(version), "test author", key_, absl::Now())
        .value();
  }

  std::vector<std::string> Flags(std::vector<std::string> extra = {}) const {
    std::vector<std::string> flags = {"--listen", "127.0.0.1:0", "--rules_dir", rules_,
                                      "--state_dir", state_, "--poll_interval", "0s",
                                      "--drain", "0s"};
    flags.insert(flags.end(), extra.begin(), extra.end());
    return flags;
  }

 private:
  TempDir dir_;
  std::string rules_, state_;
  bundle::PrivateKey key_;
};

// A channel and stubs to a running server.
struct Client {
  explicit Client(const std::string& address)
      : channel(grpc::CreateChannel(address, grpc::InsecureChannelCredentials())),
        service(cds::v1::DecisionSupport::NewStub(channel)),
        admin(cds::v1::RuleSetAdmin::NewStub(channel)) {}

  grpc::Status Publish(const cds::v1::Bundle& bundle, cds::v1::PublishRuleSetResponse* response) {
    grpc::ClientContext context;
    context.set_deadline(Deadline());
    cds::v1::PublishRuleSetRequest request;
    bundle.SerializeToString(request.mutable_bundle());
    return admin->PublishRuleSet(&context, request, response);
  }
  grpc::Status Label(const std::string& label, const std::string& version) {
    grpc::ClientContext context;
    context.set_deadline(Deadline());
    cds::v1::SetLabelRequest request;
    request.set_name("ipex");
    request.set_label(label);
    request.set_version(version);
    cds::v1::SetLabelResponse response;
    return admin->SetLabel(&context, request, &response);
  }
  grpc::Status Retire(const std::string& version, cds::v1::RetireRuleSetResponse* response) {
    grpc::ClientContext context;
    context.set_deadline(Deadline());
    cds::v1::RetireRuleSetRequest request;
    request.set_name("ipex");
    request.set_version(version);
    return admin->RetireRuleSet(&context, request, response);
  }
  grpc::Status Evaluate(const std::string& rule_set, cds::v1::EvaluateResponse* response) {
    grpc::ClientContext context;
    context.set_deadline(Deadline());
    cds::v1::EvaluateRequest request;
    request.set_rule_set(rule_set);
    *request.mutable_patient() = Patient();
    return service->Evaluate(&context, request, response);
  }
  std::map<std::string, cds::v1::RuleSetInfo> List() {
    grpc::ClientContext context;
    context.set_deadline(Deadline());
    cds::v1::ListRuleSetsResponse response;
    EXPECT_TRUE(service->ListRuleSets(&context, cds::v1::ListRuleSetsRequest(), &response).ok());
    std::map<std::string, cds::v1::RuleSetInfo> by_version;
    for (const cds::v1::RuleSetInfo& info : response.rule_sets()) {
      by_version[info.ref().version()] = info;
    }
    return by_version;
  }
  static const cds::v1::Patient& Patient() {
    static const cds::v1::Patient* patient = [] {
      auto request = cli::ReadEvaluateInput(kSourceDir + "/client/examples/triad_boy.json");
      return new cds::v1::Patient(request.ok() ? request->patient() : cds::v1::Patient());
    }();
    return *patient;
  }

  std::shared_ptr<grpc::Channel> channel;
  std::unique_ptr<cds::v1::DecisionSupport::Stub> service;
  std::unique_ptr<cds::v1::RuleSetAdmin::Stub> admin;
};

// Waits until the server's log holds `needle` at least `times` times (or it exits).
bool WaitForLog(const ServerProcess& server, const std::string& needle, int times = 1) {
  for (int i = 0; i < 6000; ++i) {  // a generous bound, not an assertion on speed
    if (Count(server.Stderr(), needle) >= times) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return false;
}

// The reason name a refused call starts its message with.
std::string ReasonOf(const grpc::Status& status) {
  if (status.ok()) return "OK";
  return status.error_message().substr(0, status.error_message().find(':'));
}

TEST(LifecycleTest, ConcurrentClientsNeverFailWhileVersionsArePublishedAndLabelsMove) {
  Deployment deployment;
  ServerProcess server;
  std::string error;
  ASSERT_TRUE(server.Start(CDS_SERVER_BINARY, deployment.Flags(), &error)) << error;
  Client admin(server.address());
  ASSERT_TRUE(admin.Label("stable", "1.0.0").ok());
  ASSERT_TRUE(admin.Label("canary", "1.0.0").ok());

  // Event order is a global ticket counter: each call takes one before and one after.
  std::atomic<int64_t> tick{0};
  struct LabelSet {
    int64_t start, end;
    std::string version;
  };
  std::mutex mu;
  std::map<std::string, std::vector<LabelSet>> history = {
      {"stable", {{0, 0, "1.0.0"}}}, {"canary", {{0, 0, "1.0.0"}}}};
  std::vector<std::string> published = {"1.0.0"};  // versions clients may pin
  std::map<std::string, std::string> digests = {{"1.0.0", admin.List()["1.0.0"].ref().digest()}};

  struct Call {
    int64_t start, end;
    std::string pin;  // "", "@stable", "@canary" or "@<version>"
    bool ok;
    std::string error, version, digest, label;
  };
  std::atomic<bool> stop{false};
  std::vector<std::vector<Call>> calls(4);
  std::vector<std::thread> clients;
  for (int t = 0; t < 4; ++t) {
    clients.emplace_back([&, t] {
      Client client(server.address());
      std::mt19937 random(t);
      while (!stop.load()) {
        Call call;
        const int mode = static_cast<int>(random() % 4);
        if (mode == 1) call.pin = "@stable";
        if (mode == 2) call.pin = "@canary";
        if (mode == 3) {
          std::lock_guard<std::mutex> lock(mu);
          call.pin = "@" + published[random() % published.size()];
        }
        cds::v1::EvaluateResponse response;
        call.start = tick.fetch_add(1);
        const grpc::Status status = client.Evaluate("ipex" + call.pin, &response);
        call.end = tick.fetch_add(1);
        call.ok = status.ok();
        call.error = status.error_message();
        call.version = response.rule_set().version();
        call.digest = response.rule_set().digest();
        call.label = response.rule_set().label();
        calls[t].push_back(std::move(call));
      }
    });
  }

  // The author side: 8 publishes and 100 label moves, interleaved.
  std::mt19937 random(42);
  int changes = 0;
  for (int patch = 1; patch <= 8; ++patch) {
    const std::string version = absl::StrCat("1.0.", patch);
    cds::v1::PublishRuleSetResponse response;
    const grpc::Status status = admin.Publish(deployment.Bundle(version), &response);
    ASSERT_TRUE(status.ok()) << status.error_message();
    ++changes;
    {
      std::lock_guard<std::mutex> lock(mu);
      published.push_back(version);
      digests[version] = response.info().ref().digest();
    }
    for (int move = 0; move < 13; ++move) {
      const std::string label = move % 2 == 0 ? "canary" : "stable";
      std::string target;
      {
        std::lock_guard<std::mutex> lock(mu);
        target = published[random() % published.size()];
      }
      LabelSet set{tick.fetch_add(1), 0, target};
      ASSERT_TRUE(admin.Label(label, target).ok());
      set.end = tick.fetch_add(1);
      ++changes;
      std::lock_guard<std::mutex> lock(mu);
      history[label].push_back(set);
    }
  }
  stop.store(true);
  for (std::thread& t : clients) t.join();
  EXPECT_GE(changes, 100);

  // Could `label` have pointed at `version` at some moment within [start, end]?
  auto label_allows = [&](const std::string& label, const Call& call) {
    const std::vector<LabelSet>& sets = history[label];
    for (size_t k = 0; k < sets.size(); ++k) {
      const bool began_before_end = sets[k].start < call.end;
      const bool lasted_past_start = k + 1 == sets.size() || sets[k + 1].end > call.start;
      if (sets[k].version == call.version && began_before_end && lasted_past_start) return true;
    }
    return false;
  };
  int total = 0, failed = 0, wrong = 0;
  for (const std::vector<Call>& thread_calls : calls) {
    for (const Call& call : thread_calls) {
      ++total;
      if (!call.ok) {
        ++failed;
        ADD_FAILURE() << "call " << call.pin << " failed: " << call.error;
        continue;
      }
      bool right = digests.count(call.version) > 0 && digests[call.version] == call.digest;
      if (call.pin.empty() || call.pin == "@stable") {
        right &= label_allows("stable", call) && call.label == "stable";
      } else if (call.pin == "@canary") {
        right &= label_allows("canary", call) && call.label == "canary";
      } else {
        right &= call.pin == "@" + call.version && call.label.empty();
      }
      if (!right) {
        ++wrong;
        ADD_FAILURE() << "call " << call.pin << " [" << call.start << ", " << call.end
                      << "] answered by " << call.version << " " << call.digest;
      }
    }
  }
  EXPECT_EQ(failed, 0);
  EXPECT_EQ(wrong, 0);
  EXPECT_GT(total, 0);
  std::cerr << total << " evaluations during " << changes << " publishes and label moves\n";
}

// Issue 5, "publish under load", as a test: new versions published back to back and the
// label the default request resolves through ("stable") moved to each, while a client
// evaluates without pause; with a small --keep_versions, so that versions are unloaded
// under the client's feet too.
TEST(LifecycleTest, RuleUpdatesUnderLoadNeverFailAndMoveCallsToTheNewVersion) {
  Deployment deployment;
  ServerProcess server;
  std::string error;
  ASSERT_TRUE(server.Start(CDS_SERVER_BINARY, deployment.Flags({"--keep_versions", "2"}), &error))
      << error;
  Client admin(server.address());
  ASSERT_TRUE(admin.Label("stable", "1.0.0").ok());

  // Index of the newest version whose label move had completed (-1: none yet).
  std::atomic<int> moved{-1};
  struct Call {
    int moved_before;  // `moved` when the call started
    bool ok;
    std::string error, version, label;
  };
  std::vector<Call> calls;  // the client thread's until it is joined
  std::atomic<bool> stop{false};
  std::atomic<int> after_last{0};
  std::thread client_thread([&] {
    Client client(server.address());
    while (!stop.load()) {
      Call call;
      call.moved_before = moved.load();
      cds::v1::EvaluateResponse response;
      const grpc::Status status = client.Evaluate("ipex", &response);
      call.ok = status.ok();
      call.error = status.error_message();
      call.version = response.rule_set().version();
      call.label = response.rule_set().label();
      if (call.moved_before == 4) after_last.fetch_add(1);
      calls.push_back(std::move(call));
    }
  });

  const std::vector<std::string> versions = {"1.0.1", "1.0.2", "1.0.3", "1.0.4", "1.0.5"};
  for (size_t i = 0; i < versions.size(); ++i) {
    cds::v1::PublishRuleSetResponse published;
    const grpc::Status status = admin.Publish(deployment.Bundle(versions[i]), &published);
    ASSERT_TRUE(status.ok()) << status.error_message();
    ASSERT_TRUE(admin.Label("stable", versions[i]).ok());
    moved.store(static_cast<int>(i));
    // Read your writes: the next call names the new version.
    cds::v1::EvaluateResponse response;
    ASSERT_TRUE(admin.Evaluate("ipex", &response).ok());
    EXPECT_EQ(response.rule_set().version(), versions[i]);
    EXPECT_EQ(response.rule_set().label(), "stable");
  }
  // Let the client make a few calls after the last move (a bound, not a timed assertion).
  for (int i = 0; i < 6000 && after_last.load() < 3; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  stop.store(true);
  client_thread.join();

  int failed = 0, stale = 0;
  std::set<std::string> named;
  for (const Call& call : calls) {
    if (!call.ok) {
      ++failed;
      ADD_FAILURE() << "call failed: " << call.error;
      continue;
    }
    named.insert(call.version);
    // A call that started after the label moved to versions[k] runs on versions[k] or later.
    const std::string oldest = call.moved_before < 0 ? "1.0.0" : versions[call.moved_before];
    if (call.version < oldest || call.label != "stable") {
      ++stale;
      ADD_FAILURE() << "a call started after the label moved to " << oldest
                    << " was answered by " << call.version << " (label '" << call.label << "')";
    }
  }
  EXPECT_EQ(failed, 0);
  EXPECT_EQ(stale, 0);
  EXPECT_GT(calls.size(), versions.size());
  EXPECT_GE(named.size(), 2u);
  std::cerr << calls.size() << " evaluations naming " << named.size() << " versions during "
            << versions.size() << " publishes and label moves\n";

  // Retention: the two newest versions (the last one labelled) stay; the rest are unloaded.
  std::map<std::string, cds::v1::RuleSetInfo> list = admin.List();
  EXPECT_EQ(list["1.0.5"].state(), cds::v1::RuleSetInfo::AVAILABLE);
  EXPECT_EQ(list["1.0.4"].state(), cds::v1::RuleSetInfo::AVAILABLE);
  for (const char* version : {"1.0.0", "1.0.1", "1.0.2", "1.0.3"}) {
    EXPECT_EQ(list[version].state(), cds::v1::RuleSetInfo::UNLOADED) << version;
  }
  cds::v1::EvaluateResponse pinned;
  EXPECT_EQ(admin.Evaluate("ipex@1.0.1", &pinned).error_code(), grpc::StatusCode::NOT_FOUND);
}

// Admin calls wait for each other (a publish verifies, compiles, runs the cases and fsyncs),
// but never on gRPC's callback threads: with a publish stuck half-way and a pile of label
// moves queued behind it, evaluations are still answered.
TEST(LifecycleTest, EvaluationsGoOnWhileAdminCallsWait) {
  Deployment deployment;
  std::string error;
  setenv("CDS_TEST_PAUSE_AT", "bundle_staged", 1);
  ServerProcess server;
  const bool started = server.Start(CDS_SERVER_BINARY, deployment.Flags(), &error);
  unsetenv("CDS_TEST_PAUSE_AT");
  ASSERT_TRUE(started) << error;
  std::vector<std::thread> admin_calls;
  admin_calls.emplace_back([&] {
    Client client(server.address());
    cds::v1::PublishRuleSetResponse response;
    client.Publish(deployment.Bundle("1.0.1"), &response);  // fails once the server is killed
  });
  ASSERT_TRUE(WaitForLog(server, "test hook: paused at bundle_staged")) << server.Stderr();
  for (int i = 0; i < 16; ++i) {
    admin_calls.emplace_back([&] {
      Client client(server.address());
      client.Label("canary", "1.0.0");  // waits behind the publish
    });
  }
  // (Before the admin calls had a thread of their own, the first call here timed out.)
  Client client(server.address());
  for (int i = 0; i < 20; ++i) {
    cds::v1::EvaluateResponse response;
    const grpc::Status status = client.Evaluate("ipex", &response);
    EXPECT_TRUE(status.ok()) << status.error_code() << ": " << status.error_message();
    if (!status.ok()) break;
    EXPECT_EQ(response.rule_set().version(), "1.0.0");
  }
  EXPECT_EQ(server.Stop(SIGKILL), 128 + SIGKILL);
  for (std::thread& t : admin_calls) t.join();
}

TEST(LifecycleTest, EveryKindOfBadBundleIsRefusedWithItsReasonAndServingIsUntouched) {
  Deployment deployment;
  ServerProcess server;
  std::string error;
  ASSERT_TRUE(server.Start(CDS_SERVER_BINARY, deployment.Flags(), &error)) << error;
  Client client(server.address());
  const cds::v1::RuleSetInfo before = client.List()["1.0.0"];
  ASSERT_EQ(before.state(), cds::v1::RuleSetInfo::AVAILABLE);
  EXPECT_FALSE(before.signer().empty());

  const cds::v1::Bundle good = deployment.Bundle("1.0.1");
  cds::v1::Bundle bad_signature = good;
  std::string manifest = bad_signature.manifest();
  manifest[manifest.size() - 3] ^= 1;
  bad_signature.set_manifest(manifest);
  const bundle::PrivateKey stranger = bundle::PrivateKey::Generate().value();
  auto sign = [&](const std::vector<compiler::SourceFile>& files, const std::string& version,
                  const std::string& name = "ipex") {
    return bundle::SignFiles(name, version, files, "t", deployment.key(), absl::Now()).value();
  };
  cds::v1::Bundle unknown_key =
      bundle::SignFiles("ipex", "1.0.1", Deployment::IpexFiles("1.0.1"), "t", stranger, absl::Now())
          .value();
  cds::v1::Bundle tampered = good;
  tampered.mutable_files(0)->mutable_content()->append("\n# edited after signing\n");
  cds::v1::Bundle missing = good;
  missing.mutable_files()->RemoveLast();
  cds::v1::Bundle extra = good;
  extra.add_files()->set_path("notes.txt");
  // A dangling concept reference; an impossible case; other content under 1.0.0.
  std::vector<compiler::SourceFile> broken = Deployment::IpexFiles("1.0.1");
  broken[0].content += "\nconcepts { id: \"x\" label: \"x\" codes { system: \"HPO\" code: \"HP:0000001\" } }\nconcepts { id: \"x\" }\n";
  std::vector<compiler::SourceFile> failing = Deployment::IpexFiles("1.0.1");
  failing[1].content +=
      "\ncases {\n  name: \"impossible\"\n  patient { reference: \"case-t\" sex: MALE age { days: 30 } }\n"
      "  expect { top_diagnosis: \"ipex\" not_top_diagnosis: \"ipex\" }\n}\n";
  std::vector<compiler::SourceFile> conflicting = Deployment::IpexFiles("1.0.0");
  conflicting[0].content += "\n# a comment changes the content\n";
  cds::v1::Bundle unsigned_bundle = good;
  unsigned_bundle.clear_signature();
  unsigned_bundle.clear_manifest();

  const std::vector<std::tuple<std::string, grpc::StatusCode, cds::v1::Bundle>> cases = {
      {"BAD_SIGNATURE", grpc::StatusCode::FAILED_PRECONDITION, bad_signature},
      {"UNKNOWN_KEY", grpc::StatusCode::FAILED_PRECONDITION, unknown_key},
      {"TAMPERED_FILE", grpc::StatusCode::INVALID_ARGUMENT, tampered},
      {"MISSING_FILE", grpc::StatusCode::INVALID_ARGUMENT, missing},
      {"EXTRA_FILE", grpc::StatusCode::INVALID_ARGUMENT, extra},
      {"COMPILE_ERROR", grpc::StatusCode::INVALID_ARGUMENT, sign(broken, "1.0.1")},
      {"FAILING_TEST", grpc::StatusCode::INVALID_ARGUMENT, sign(failing, "1.0.1")},
      {"VERSION_CONFLICT", grpc::StatusCode::ALREADY_EXISTS, sign(conflicting, "1.0.0")},
      {"MANIFEST_MISMATCH", grpc::StatusCode::INVALID_ARGUMENT,
       sign(Deployment::IpexFiles("1.0.1"), "1.0.1", "other")},
      {"EMPTY_BUNDLE", grpc::StatusCode::INVALID_ARGUMENT, cds::v1::Bundle()},
      {"UNSIGNED", grpc::StatusCode::FAILED_PRECONDITION, unsigned_bundle},
  };
  for (const auto& [reason, code, bundle] : cases) {
    SCOPED_TRACE(reason);
    cds::v1::PublishRuleSetResponse response;
    const grpc::Status status = client.Publish(bundle, &response);
    EXPECT_EQ(status.error_code(), code) << status.error_message();
    EXPECT_EQ(ReasonOf(status), reason) << status.error_message();
    // Serving is untouched: same version, same digest, still the only one available.
    cds::v1::EvaluateResponse evaluated;
    ASSERT_TRUE(client.Evaluate("ipex", &evaluated).ok());
    EXPECT_EQ(evaluated.rule_set().version(), "1.0.0");
    EXPECT_EQ(evaluated.rule_set().digest(), before.ref().digest());
    EXPECT_EQ(client.Evaluate("ipex@1.0.1", &evaluated).error_code(), grpc::StatusCode::NOT_FOUND);
  }
  // The good bundle still goes through afterwards.
  cds::v1::PublishRuleSetResponse response;
  ASSERT_TRUE(client.Publish(good, &response).ok());
  EXPECT_EQ(response.info().state(), cds::v1::RuleSetInfo::AVAILABLE);
  EXPECT_FALSE(absl::StrContains(server.Stderr(), "case-t"));  // no patient data in logs
}

// Kills the server at `step` of a publish (or, for "state_staged", of a label move), restarts
// it and returns the restarted server's view.
class CrashTest : public ::testing::TestWithParam<std::string> {};

TEST_P(CrashTest, SigkillMidPublishRestartsWithTheOldOrTheNewStateNeverAMix) {
  const std::string step = GetParam();
  Deployment deployment;
  std::string error;
  {
    // First life: publish 1.0.1 and label it stable, cleanly.
    ServerProcess server;
    ASSERT_TRUE(server.Start(CDS_SERVER_BINARY, deployment.Flags(), &error)) << error;
    Client client(server.address());
    cds::v1::PublishRuleSetResponse response;
    ASSERT_TRUE(client.Publish(deployment.Bundle("1.0.1"), &response).ok());
    ASSERT_TRUE(client.Label("stable", "1.0.1").ok());
    client = Client(server.address());
    server.Stop(SIGKILL);
  }
  {
    // Second life: armed to stop at `step`, killed there.
    setenv("CDS_TEST_PAUSE_AT", step.c_str(), 1);
    ServerProcess server;
    const bool started = server.Start(CDS_SERVER_BINARY, deployment.Flags(), &error);
    unsetenv("CDS_TEST_PAUSE_AT");
    ASSERT_TRUE(started) << error;
    std::thread publisher([&] {
      Client client(server.address());
      if (step == "state_staged") {
        client.Label("stable", "1.0.0");
      } else {
        cds::v1::PublishRuleSetResponse response;
        client.Publish(deployment.Bundle("1.0.2"), &response);
      }
    });
    ASSERT_TRUE(WaitForLog(server, "test hook: paused at " + step)) << server.Stderr();
    EXPECT_EQ(server.Stop(SIGKILL), 128 + SIGKILL);
    publisher.join();  // its call fails: the server is gone
  }
  // Third life: consistent.
  ServerProcess server;
  ASSERT_TRUE(server.Start(CDS_SERVER_BINARY, deployment.Flags(), &error)) << error;
  Client client(server.address());
  std::map<std::string, cds::v1::RuleSetInfo> list = client.List();
  EXPECT_EQ(list["1.0.0"].state(), cds::v1::RuleSetInfo::AVAILABLE);
  EXPECT_EQ(list["1.0.1"].state(), cds::v1::RuleSetInfo::AVAILABLE);
  if (step == "bundle_renamed") {
    // The rename happened: the new version is there, complete and verified.
    EXPECT_EQ(list["1.0.2"].state(), cds::v1::RuleSetInfo::AVAILABLE) << server.Stderr();
  } else {
    EXPECT_EQ(list.count("1.0.2"), 0u) << server.Stderr();
  }
  // The stable label is the one from before the crash (the move never landed).
  cds::v1::EvaluateResponse response;
  ASSERT_TRUE(client.Evaluate("ipex", &response).ok());
  EXPECT_EQ(response.rule_set().version(), "1.0.1");
  EXPECT_EQ(response.rule_set().label(), "stable");
  // No temporaries survive, and publishing works again.
  EXPECT_TRUE(std::filesystem::is_empty(deployment.state() + "/tmp"));
  cds::v1::PublishRuleSetResponse published;
  ASSERT_TRUE(client.Publish(deployment.Bundle("1.0.2"), &published).ok());
  EXPECT_EQ(published.info().state(), cds::v1::RuleSetInfo::AVAILABLE);
}

INSTANTIATE_TEST_SUITE_P(Steps, CrashTest,
                         ::testing::Values("bundle_file_written", "bundle_staged",
                                           "bundle_renamed", "state_staged"));

TEST(LifecycleTest, ARestartServesTheSameVersionsAndLabels) {
  Deployment deployment;
  std::string error;
  std::map<std::string, cds::v1::RuleSetInfo> before;
  {
    ServerProcess server;
    ASSERT_TRUE(server.Start(CDS_SERVER_BINARY, deployment.Flags(), &error)) << error;
    Client client(server.address());
    cds::v1::PublishRuleSetResponse response;
    ASSERT_TRUE(client.Publish(deployment.Bundle("1.0.1"), &response).ok());
    ASSERT_TRUE(client.Publish(deployment.Bundle("1.0.2"), &response).ok());
    ASSERT_TRUE(client.Label("stable", "1.0.1").ok());
    ASSERT_TRUE(client.Label("canary", "1.0.2").ok());
    before = client.List();
    client = Client(server.address());
    EXPECT_EQ(server.Stop(SIGTERM), 0);
  }
  ServerProcess server;
  ASSERT_TRUE(server.Start(CDS_SERVER_BINARY, deployment.Flags(), &error)) << error;
  Client client(server.address());
  std::map<std::string, cds::v1::RuleSetInfo> after = client.List();
  ASSERT_EQ(after.size(), before.size());
  for (const auto& [version, info] : before) {
    EXPECT_EQ(after[version].state(), info.state()) << version;
    EXPECT_EQ(after[version].ref().digest(), info.ref().digest()) << version;
    EXPECT_EQ(after[version].signer(), info.signer()) << version;
    EXPECT_EQ(after[version].labels_size(), info.labels_size()) << version;
  }
  EXPECT_EQ(after["1.0.2"].labels(0), "canary");
  cds::v1::EvaluateResponse response;
  ASSERT_TRUE(client.Evaluate("ipex", &response).ok());
  EXPECT_EQ(response.rule_set().version(), "1.0.1");
  ASSERT_TRUE(client.Evaluate("ipex@canary", &response).ok());
  EXPECT_EQ(response.rule_set().version(), "1.0.2");
}

// With retention, a restart gates only the versions it keeps; a rollback (a label) to one
// of the others loads it from its persisted bundle, unless that bundle was damaged.
TEST(LifecycleTest, ARestartLoadsOnlyKeptVersionsAndALabelLoadsAnotherAgain) {
  Deployment deployment;
  std::string error;
  const std::vector<std::string> flags = deployment.Flags({"--keep_versions", "2"});
  {
    ServerProcess server;
    ASSERT_TRUE(server.Start(CDS_SERVER_BINARY, flags, &error)) << error;
    Client client(server.address());
    for (const char* version : {"1.0.1", "1.0.2", "1.0.3", "1.0.4", "1.0.5"}) {
      cds::v1::PublishRuleSetResponse response;
      ASSERT_TRUE(client.Publish(deployment.Bundle(version), &response).ok()) << version;
      if (std::string(version) == "1.0.2") {
        ASSERT_TRUE(client.Label("stable", version).ok());
      }
    }
    client = Client(server.address());
    EXPECT_EQ(server.Stop(SIGTERM), 0);
  }
  ServerProcess server;
  ASSERT_TRUE(server.Start(CDS_SERVER_BINARY, flags, &error)) << error;
  // 1.0.2 (stable), 1.0.5 and 1.0.4 gated; 1.0.3 and 1.0.1 only listed.
  EXPECT_TRUE(absl::StrContains(server.Stderr(), "3 gated, 2 listed without loading them"))
      << server.Stderr();
  Client client(server.address());
  std::map<std::string, cds::v1::RuleSetInfo> list = client.List();
  for (const char* version : {"1.0.2", "1.0.4", "1.0.5"}) {
    EXPECT_EQ(list[version].state(), cds::v1::RuleSetInfo::AVAILABLE) << version;
  }
  for (const char* version : {"1.0.0", "1.0.1", "1.0.3"}) {
    EXPECT_EQ(list[version].state(), cds::v1::RuleSetInfo::UNLOADED) << version;
  }
  cds::v1::EvaluateResponse response;
  ASSERT_TRUE(client.Evaluate("ipex", &response).ok());
  EXPECT_EQ(response.rule_set().version(), "1.0.2");
  EXPECT_EQ(client.Evaluate("ipex@1.0.3", &response).error_code(), grpc::StatusCode::NOT_FOUND);

  // Rollback target not among the kept ones: the label loads it.
  grpc::Status labelled = client.Label("canary", "1.0.3");
  ASSERT_TRUE(labelled.ok()) << labelled.error_message();
  ASSERT_TRUE(client.Evaluate("ipex@canary", &response).ok());
  EXPECT_EQ(response.rule_set().version(), "1.0.3");
  EXPECT_EQ(response.rule_set().digest(), list["1.0.3"].ref().digest());

  // A damaged bundle is refused, and the label stays.
  ASSERT_TRUE(testing::WriteFile(
      deployment.state() + "/bundles/ipex/1.0.1/ruleset.textproto",
      testing::ReadFileOrEmpty(deployment.state() + "/bundles/ipex/1.0.1/ruleset.textproto") +
          "\n# edited on disk\n"));
  labelled = client.Label("canary", "1.0.1");
  EXPECT_EQ(labelled.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_TRUE(absl::StrContains(labelled.error_message(), "ipex@1.0.1")) << labelled.error_message();
  EXPECT_TRUE(absl::StrContains(labelled.error_message(), "TAMPERED_FILE"))
      << labelled.error_message();
  ASSERT_TRUE(client.Evaluate("ipex@canary", &response).ok());
  EXPECT_EQ(response.rule_set().version(), "1.0.3");
  EXPECT_EQ(client.List()["1.0.1"].state(), cds::v1::RuleSetInfo::REJECTED);
  // It was published all the same: other content under ipex@1.0.1 is still refused.
  cds::v1::PublishRuleSetResponse published;
  const std::vector<compiler::SourceFile> other_content =
      Deployment::IpexFiles("1.0.1", "# IPEX rule set", "# edited: IPEX rule set");
  const grpc::Status republished = client.Publish(
      bundle::SignFiles("ipex", "1.0.1", other_content, "t", deployment.key(), absl::Now())
          .value(),
      &published);
  EXPECT_EQ(republished.error_code(), grpc::StatusCode::ALREADY_EXISTS)
      << republished.error_message();
  EXPECT_EQ(ReasonOf(republished), "VERSION_CONFLICT") << republished.error_message();
  EXPECT_EQ(client.List()["1.0.1"].state(), cds::v1::RuleSetInfo::REJECTED);

  // An unloaded version is retired like any other (without loading it).
  cds::v1::RetireRuleSetResponse retired;
  const grpc::Status retire = client.Retire("1.0.0", &retired);
  ASSERT_TRUE(retire.ok()) << retire.error_message();
  EXPECT_EQ(retired.info().state(), cds::v1::RuleSetInfo::RETIRED);
  EXPECT_EQ(client.List()["1.0.0"].state(), cds::v1::RuleSetInfo::RETIRED);
}

TEST(LifecycleTest, SighupPicksUpACompleteBundleDroppedIntoTheRulesDirectory) {
  Deployment deployment;
  std::string error;
  ServerProcess server;
  ASSERT_TRUE(server.Start(CDS_SERVER_BINARY, deployment.Flags(), &error)) << error;
  Client client(server.address());
  const cds::v1::Bundle bundle = deployment.Bundle("1.0.3");
  const std::string dir = deployment.rules() + "/ipex/1.0.3/";
  // A copy in progress whose signature arrived before the tests file: never served.
  ASSERT_TRUE(testing::WriteFile(dir + "ruleset.textproto", bundle.files(0).content()));
  ASSERT_TRUE(testing::WriteFile(dir + "MANIFEST", bundle.manifest()));
  ASSERT_TRUE(testing::WriteFile(dir + "MANIFEST.sig", bundle.signature()));
  kill(server.pid(), SIGHUP);
  ASSERT_TRUE(WaitForLog(server, "SIGHUP: rules directory scanned", 1));
  cds::v1::EvaluateResponse response;
  EXPECT_EQ(client.Evaluate("ipex@1.0.3", &response).error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(client.List()["1.0.3"].reject_reason(), cds::v1::MISSING_FILE);
  // Complete: served after the next scan.
  ASSERT_TRUE(testing::WriteFile(dir + "tests.textproto", bundle.files(1).content()));
  kill(server.pid(), SIGHUP);
  ASSERT_TRUE(WaitForLog(server, "SIGHUP: rules directory scanned", 2));
  ASSERT_TRUE(client.Evaluate("ipex@1.0.3", &response).ok());
  EXPECT_EQ(response.rule_set().version(), "1.0.3");
}

TEST(LifecycleTest, UnsignedBundlesNeedTheDevelopmentFlagAndAreLoud) {
  Deployment deployment;
  std::string error;
  cds::v1::Bundle unsigned_bundle;
  for (const compiler::SourceFile& f : Deployment::IpexFiles("1.0.4")) {
    cds::v1::BundleFile* file = unsigned_bundle.add_files();
    file->set_path(f.path);
    file->set_content(f.content);
  }
  {
    ServerProcess server;
    ASSERT_TRUE(server.Start(CDS_SERVER_BINARY, deployment.Flags(), &error)) << error;
    Client client(server.address());
    cds::v1::PublishRuleSetResponse response;
    const grpc::Status status = client.Publish(unsigned_bundle, &response);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
    EXPECT_EQ(ReasonOf(status), "UNSIGNED");
    client = Client(server.address());
    server.Stop(SIGKILL);
  }
  ServerProcess server;
  ASSERT_TRUE(server.Start(CDS_SERVER_BINARY, deployment.Flags({"--allow_unsigned"}), &error))
      << error;
  EXPECT_TRUE(absl::StrContains(server.Stderr(), "WARNING: --allow_unsigned")) << server.Stderr();
  Client client(server.address());
  cds::v1::PublishRuleSetResponse response;
  ASSERT_TRUE(client.Publish(unsigned_bundle, &response).ok());
  EXPECT_TRUE(response.info().signer().empty());
  EXPECT_TRUE(absl::StrContains(server.Stderr(), "ipex@1.0.4 is UNSIGNED")) << server.Stderr();
}

}  // namespace
}  // namespace cds
