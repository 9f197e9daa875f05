// Runs the real cdsctl binary against a real cds-server (and with no server at all), and
// checks its output, exit codes and error messages.

#include <signal.h>

#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "cds/v1/service.pb.h"
#include "client/input.h"
#include "google/protobuf/text_format.h"
#include "google/protobuf/util/json_util.h"
#include "gtest/gtest.h"
#include "tests/test_util.h"

namespace cds {
namespace {

using ::cds::testing::CommandResult;
using ::cds::testing::RunCommand;
using ::cds::testing::ServerProcess;
using ::cds::testing::TempDir;

const std::string kSourceDir = CDS_SOURCE_DIR;
const std::string kBoy = kSourceDir + "/client/examples/triad_boy.json";
const std::string kIpexDir = kSourceDir + "/rules/ipex/1.0.0";

CommandResult Cdsctl(std::vector<std::string> args) {
  args.insert(args.begin(), CDSCTL_BINARY);
  return RunCommand(args);
}

std::string Describe(const CommandResult& r) {
  return absl::StrCat("exit ", r.exit_code, "\nstdout:\n", r.out, "\nstderr:\n", r.err);
}

class CliTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string error;
    ASSERT_TRUE(server_.Start(CDS_SERVER_BINARY,
                              {"--listen", "127.0.0.1:0", "--rules_dir", kSourceDir + "/rules",
                               "--drain", "0s"},
                              &error))
        << error;
  }
  void TearDown() override { EXPECT_EQ(server_.Stop(SIGTERM), 0); }

  ServerProcess server_;
};

TEST_F(CliTest, EvaluatePrintsARankedTableWithReasons) {
  const CommandResult r = Cdsctl({"evaluate", kBoy, "--server", server_.address()});
  ASSERT_EQ(r.exit_code, 0) << Describe(r);
  EXPECT_TRUE(absl::StrContains(r.out, "RANK")) << r.out;
  EXPECT_TRUE(absl::StrContains(r.out, "KIND")) << r.out;
  EXPECT_TRUE(absl::StrContains(r.out, "IPEX")) << r.out;
  EXPECT_TRUE(absl::StrContains(r.out, "DIAGNOSIS")) << r.out;
  EXPECT_TRUE(absl::StrContains(r.out, "(LR ")) << r.out;
  EXPECT_TRUE(absl::StrContains(r.out, "%")) << r.out;
  // The default version (the highest available: no "stable" label on this server).
  EXPECT_TRUE(absl::StrContains(r.out, "Rule set: ipex@1.1.1 (sha256:")) << r.out;
  EXPECT_TRUE(r.err.empty()) << r.err;
}

TEST_F(CliTest, EvaluateJsonParsesBackIntoAnEvaluateResponse) {
  const CommandResult r = Cdsctl({"evaluate", kBoy, "--server", server_.address(), "--json"});
  ASSERT_EQ(r.exit_code, 0) << Describe(r);
  cds::v1::EvaluateResponse response;
  const auto status = google::protobuf::util::JsonStringToMessage(r.out, &response);
  ASSERT_TRUE(status.ok()) << status.ToString() << "\n" << r.out;
  EXPECT_EQ(response.rule_set().name(), "ipex");
  ASSERT_FALSE(response.suggestions().empty());
  EXPECT_TRUE(absl::StrContains(r.out, "\"ruleSet\"")) << "JSON field names are lowerCamelCase";
  for (const cds::v1::Suggestion& s : response.suggestions()) {
    if (s.kind() != cds::v1::DIAGNOSIS) continue;
    EXPECT_EQ(s.rule_id(), "ipex");
    break;
  }
}

TEST_F(CliTest, EvaluateReadsATextFormatRequest) {
  absl::StatusOr<cds::v1::EvaluateRequest> boy = cli::ReadEvaluateInput(kBoy);
  ASSERT_TRUE(boy.ok()) << boy.status();
  boy->set_rule_set("ipex");
  boy->set_version("1.0.0");
  std::string text;
  ASSERT_TRUE(google::protobuf::TextFormat::PrintToString(*boy, &text));
  TempDir dir;
  const std::string path = dir.path() + "/request.textproto";
  ASSERT_TRUE(testing::WriteFile(path, text));
  const CommandResult r = Cdsctl({"evaluate", path, "--server", server_.address()});
  ASSERT_EQ(r.exit_code, 0) << Describe(r);
  EXPECT_TRUE(absl::StrContains(r.out, "ipex@1.0.0")) << r.out;
}

TEST_F(CliTest, EvaluateMapsAPhenopacket) {
  const CommandResult r =
      Cdsctl({"evaluate", "--phenopacket", kSourceDir + "/client/examples/phenopacket_triad_boy.json",
              "--server", server_.address(), "--json"});
  ASSERT_EQ(r.exit_code, 0) << Describe(r);
  cds::v1::EvaluateResponse response;
  ASSERT_TRUE(google::protobuf::util::JsonStringToMessage(r.out, &response).ok()) << r.out;
  bool found = false;
  for (const cds::v1::Suggestion& s : response.suggestions()) {
    if (s.kind() != cds::v1::DIAGNOSIS) continue;
    EXPECT_EQ(s.rule_id(), "ipex");
    EXPECT_EQ(s.code().code(), "OMIM:304790");
    found = true;
    break;
  }
  EXPECT_TRUE(found);
  EXPECT_TRUE(absl::StrContains(r.out, "\"OMIM:304790\"")) << r.out;
}

TEST_F(CliTest, ValidateRunsACorpusThroughTheServer) {
  TempDir dir;
  const std::string corpus = dir.path() + "/corpus.jsonl";
  ASSERT_TRUE(cds::testing::WriteFile(corpus,
      R"({"id": "c1", "diagnosis": "IPEX", "disease_id": "OMIM:304790", "sex": "MALE", "observed": [{"hpo": "HP:0002041", "label": "Intractable diarrhea", "onset_days": 10}, {"hpo": "HP:0000857", "label": "Neonatal insulin-dependent diabetes mellitus", "onset_days": 20}, {"hpo": "HP:0000964", "label": "Eczematoid dermatitis", "onset_days": 30}], "excluded": [], "measurements": []})"
      "\n"
      R"({"id": "c2", "diagnosis": "Other", "disease_id": "OMIM:999999", "sex": "FEMALE", "observed": [{"hpo": "HP:0000964", "label": "Eczematoid dermatitis"}], "excluded": [], "measurements": []})"
      "\n"));
  const CommandResult remote = Cdsctl({"validate", "--corpus", corpus, "--server", server_.address(), "--json"});
  ASSERT_EQ(remote.exit_code, 0) << Describe(remote);
  EXPECT_TRUE(absl::StrContains(remote.out, "\"cases\": 2")) << remote.out;
  const CommandResult local = Cdsctl({"validate", "--corpus", corpus, "--rules", kIpexDir});
  ASSERT_EQ(local.exit_code, 0) << Describe(local);
  EXPECT_TRUE(absl::StrContains(local.out, "ipex@1.0.0")) << local.out;
  EXPECT_TRUE(absl::StrContains(local.out, "top-1")) << local.out;
  EXPECT_TRUE(absl::StrContains(local.out, "Screening for ipex") ||
              absl::StrContains(local.out, "Multi-class Brier")) << local.out;
}

TEST_F(CliTest, RuleSetsListsTheLoadedVersions) {
  const CommandResult r = Cdsctl({"rulesets", "--server", server_.address()});
  ASSERT_EQ(r.exit_code, 0) << Describe(r);
  EXPECT_TRUE(absl::StrContains(r.out, "NAME")) << r.out;
  EXPECT_TRUE(absl::StrContains(r.out, "ipex")) << r.out;
  EXPECT_TRUE(absl::StrContains(r.out, "1.0.0")) << r.out;
  EXPECT_TRUE(absl::StrContains(r.out, "AVAILABLE")) << r.out;
  EXPECT_TRUE(absl::StrContains(r.out, "sha256:")) << r.out;
}

TEST_F(CliTest, HealthReportsServing) {
  CommandResult r = Cdsctl({"health", "--server", server_.address()});
  EXPECT_EQ(r.exit_code, 0) << Describe(r);
  EXPECT_EQ(r.out, "SERVING\n");
  r = Cdsctl({"health", "--server", server_.address(), "--service", "cds.v1.DecisionSupport"});
  EXPECT_EQ(r.exit_code, 0) << Describe(r);
  r = Cdsctl({"health", "--server", server_.address(), "--service", "no.such.Service"});
  EXPECT_EQ(r.exit_code, 1) << Describe(r);
}

TEST_F(CliTest, UnknownRuleSetIsAClearError) {
  const CommandResult r =
      Cdsctl({"evaluate", kBoy, "--server", server_.address(), "--rule-set", "nosuch"});
  EXPECT_EQ(r.exit_code, 5) << Describe(r);
  EXPECT_TRUE(absl::StrContains(r.err, "NOT_FOUND")) << r.err;
  EXPECT_TRUE(absl::StrContains(r.err, "nosuch")) << r.err;
  EXPECT_TRUE(r.out.empty());
}

TEST_F(CliTest, InvalidPatientIsAClearError) {
  TempDir dir;
  const std::string path = dir.path() + "/no_sex.json";
  ASSERT_TRUE(testing::WriteFile(
      path, R"({"age": {"days": 10}, "findings": [{"term": {"code": "HP:0002028"}}]})"));
  const CommandResult r = Cdsctl({"evaluate", path, "--server", server_.address()});
  EXPECT_EQ(r.exit_code, 5) << Describe(r);
  EXPECT_TRUE(absl::StrContains(r.err, "INVALID_ARGUMENT")) << r.err;
}

TEST(CliOfflineTest, ServerDownIsAClearError) {
  const std::string address = absl::StrCat("127.0.0.1:", testing::UnusedPort());
  CommandResult r = Cdsctl({"evaluate", kBoy, "--server", address, "--deadline", "3s"});
  EXPECT_EQ(r.exit_code, 4) << Describe(r);
  EXPECT_TRUE(absl::StrContains(r.err, "cannot reach server at " + address)) << r.err;
  r = Cdsctl({"rulesets", "--server", address});
  EXPECT_EQ(r.exit_code, 4) << Describe(r);
  r = Cdsctl({"health", "--server", address});
  EXPECT_NE(r.exit_code, 0) << Describe(r);
  EXPECT_TRUE(absl::StrContains(r.err, "cannot reach server")) << r.err;
}

TEST(CliOfflineTest, MissingOrMalformedInputFileIsAClearError) {
  TempDir dir;
  // Input errors are reported before any connection is attempted.
  const std::string unused = absl::StrCat("127.0.0.1:", testing::UnusedPort());
  CommandResult r = Cdsctl({"evaluate", dir.path() + "/absent.json", "--server", unused});
  EXPECT_EQ(r.exit_code, 3) << Describe(r);
  EXPECT_TRUE(absl::StrContains(r.err, "absent.json")) << r.err;

  const std::string bad_json = dir.path() + "/bad.json";
  ASSERT_TRUE(testing::WriteFile(bad_json, "{ \"sex\": \"MALE\", "));
  r = Cdsctl({"evaluate", bad_json, "--server", unused});
  EXPECT_EQ(r.exit_code, 3) << Describe(r);
  EXPECT_TRUE(absl::StrContains(r.err, "bad.json")) << r.err;

  const std::string typo = dir.path() + "/typo.json";
  ASSERT_TRUE(testing::WriteFile(typo, R"({"sex": "MALE", "findingz": []})"));
  r = Cdsctl({"evaluate", typo, "--server", unused});
  EXPECT_EQ(r.exit_code, 3) << Describe(r);
  EXPECT_TRUE(absl::StrContains(r.err, "findingz")) << r.err;

  const std::string bad_text = dir.path() + "/bad.textproto";
  ASSERT_TRUE(testing::WriteFile(bad_text, "sex: MALE\nfindings { term { code: 12 \n"));
  r = Cdsctl({"evaluate", bad_text, "--server", unused});
  EXPECT_EQ(r.exit_code, 3) << Describe(r);
  EXPECT_TRUE(absl::StrContains(r.err, "bad.textproto")) << r.err;

  const std::string other = dir.path() + "/patient.xml";
  ASSERT_TRUE(testing::WriteFile(other, "<patient/>"));
  r = Cdsctl({"evaluate", other, "--server", unused});
  EXPECT_EQ(r.exit_code, 3) << Describe(r);
}

TEST(CliOfflineTest, ValidateAndPhenopacketInputErrors) {
  TempDir dir;
  const std::string bad = dir.path() + "/bad.jsonl";
  ASSERT_TRUE(cds::testing::WriteFile(bad, "{\"id\": \"x\"}\n{oops\n"));
  CommandResult r = Cdsctl({"validate", "--corpus", bad, "--rules", kIpexDir});
  EXPECT_EQ(r.exit_code, 3) << Describe(r);
  EXPECT_TRUE(absl::StrContains(r.err, "line 2")) << r.err;
  r = Cdsctl({"validate", "--corpus", dir.path() + "/missing.jsonl", "--rules", kIpexDir});
  EXPECT_EQ(r.exit_code, 3) << Describe(r);
  r = Cdsctl({"validate"});
  EXPECT_EQ(r.exit_code, 2) << Describe(r);
  r = Cdsctl({"evaluate", "--phenopacket", bad});
  EXPECT_EQ(r.exit_code, 3) << Describe(r);
  EXPECT_TRUE(absl::StrContains(r.err, "Phenopacket")) << r.err;
}

TEST(CliOfflineTest, UsageErrorsAndHelp) {
  CommandResult r = Cdsctl({});
  EXPECT_EQ(r.exit_code, 2);
  r = Cdsctl({"frobnicate"});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_TRUE(absl::StrContains(r.err, "frobnicate")) << r.err;
  r = Cdsctl({"evaluate", kBoy, "--bogus"});
  EXPECT_EQ(r.exit_code, 2);
  r = Cdsctl({"evaluate", kBoy, "--deadline", "soon"});
  EXPECT_EQ(r.exit_code, 2);
  r = Cdsctl({"--help"});
  EXPECT_EQ(r.exit_code, 0);
  EXPECT_TRUE(absl::StrContains(r.out, "Exit codes")) << r.out;
}

TEST(CliOfflineTest, RulesCheckAndTestPassOnTheBundledRuleSet) {
  CommandResult r = Cdsctl({"rules", "check", kIpexDir});
  EXPECT_EQ(r.exit_code, 0) << Describe(r);
  EXPECT_TRUE(absl::StrContains(r.out, "OK ipex@1.0.0 sha256:")) << r.out;
  r = Cdsctl({"rules", "test", kIpexDir});
  EXPECT_EQ(r.exit_code, 0) << Describe(r);
  EXPECT_TRUE(absl::StrContains(r.out, "PASS ")) << r.out;
  EXPECT_FALSE(absl::StrContains(r.out, "FAIL ")) << r.out;
  EXPECT_TRUE(absl::StrContains(r.out, " 0 failed")) << r.out;
}

TEST(CliOfflineTest, RulesCheckReportsEveryErrorWithItsLine) {
  TempDir dir;
  const std::string rule_dir = dir.path() + "/broken/1.0.0";
  ASSERT_TRUE(testing::WriteFile(rule_dir + "/ruleset.textproto",
                                 "metadata { name: \"broken\" version: \"1.0.0\" }\n"
                                 "hypotheses { id: \"h\" pretest_probability: 7 }\n"
                                 "hypotheses { id: \"h\" pretest_probability: 0.1 }\n"));
  CommandResult r = Cdsctl({"rules", "check", rule_dir});
  EXPECT_EQ(r.exit_code, 1) << Describe(r);
  EXPECT_TRUE(absl::StrContains(r.out, "ruleset.textproto:2")) << r.out;
  EXPECT_TRUE(absl::StrContains(r.out, "ruleset.textproto:3")) << r.out;
  r = Cdsctl({"rules", "test", rule_dir});
  EXPECT_EQ(r.exit_code, 1) << Describe(r);
  r = Cdsctl({"rules", "check", dir.path() + "/nothing/1.0.0"});
  EXPECT_EQ(r.exit_code, 3) << Describe(r);
}

TEST(CliOfflineTest, RulesCheckVerifiesTheManifestAndSignature) {
  CommandResult r = Cdsctl({"rules", "check", kIpexDir, "--keys", kSourceDir + "/rules/keys"});
  EXPECT_EQ(r.exit_code, 0) << Describe(r);
  EXPECT_TRUE(absl::StrContains(r.out, "MANIFEST: 2 files match, key 1c3fd966ea0b8a0a, signature valid"))
      << r.out;
  // A file edited after signing: the server would refuse it, and check says why.
  TempDir dir;
  const std::string copy = dir.path() + "/ipex/1.0.0";
  ASSERT_TRUE(testing::LinkOntologies(dir.path()));
  for (const char* file : {"ruleset.textproto", "tests.textproto", "MANIFEST", "MANIFEST.sig"}) {
    ASSERT_TRUE(testing::WriteFile(copy + "/" + file,
                                   testing::ReadFileOrEmpty(kIpexDir + "/" + file)));
  }
  ASSERT_TRUE(testing::WriteFile(copy + "/tests.textproto",
                                 testing::ReadFileOrEmpty(kIpexDir + "/tests.textproto") + "\n"));
  r = Cdsctl({"rules", "check", copy});
  EXPECT_EQ(r.exit_code, 1) << Describe(r);
  EXPECT_TRUE(absl::StrContains(r.out, "MANIFEST: TAMPERED_FILE")) << r.out;
}

TEST(CliOfflineTest, RulesTestRunsExtraCasesAndSignRefusesAFailingVersion) {
  TempDir dir;
  ASSERT_TRUE(testing::WriteFile(dir.path() + "/cases/extra.textproto",
                                 "cases {\n  name: \"extra_impossible\"\n"
                                 "  patient { reference: \"t\" sex: MALE age { days: 30 } }\n"
                                 "  expect { top_diagnosis: \"ipex\" not_top_diagnosis: \"ipex\" }\n}\n"));
  CommandResult r = Cdsctl({"rules", "test", kIpexDir, "--cases", dir.path() + "/cases"});
  EXPECT_EQ(r.exit_code, 1) << Describe(r);
  EXPECT_TRUE(absl::StrContains(r.out, "FAIL extra_impossible")) << r.out;
  EXPECT_TRUE(absl::StrContains(r.out, "PASS ")) << r.out;  // the embedded ones still pass

  r = Cdsctl({"rules", "keygen", "--out", dir.path() + "/keys/me"});
  ASSERT_EQ(r.exit_code, 0) << Describe(r);
  r = Cdsctl({"rules", "keygen", "--out", dir.path() + "/keys/me"});
  EXPECT_EQ(r.exit_code, 2) << Describe(r);  // never overwrites a key
  r = Cdsctl({"rules", "sign", dir.path() + "/nothing/1.0.0", "--key", dir.path() + "/keys/me.key"});
  EXPECT_EQ(r.exit_code, 3) << Describe(r);
  r = Cdsctl({"rules", "sign", kIpexDir});
  EXPECT_EQ(r.exit_code, 2) << Describe(r);  // --key is required
  r = Cdsctl({"rules", "diff", kIpexDir, kIpexDir});
  EXPECT_EQ(r.exit_code, 0) << Describe(r);
  EXPECT_TRUE(absl::StrContains(r.out, " 0 changed")) << r.out;
}

TEST(CliOfflineTest, RulesTestFailsWhenACaseFails) {
  TempDir dir;
  const std::string rule_dir = dir.path() + "/ipex/1.0.0";
  ASSERT_TRUE(testing::LinkOntologies(dir.path()));
  ASSERT_TRUE(testing::WriteFile(rule_dir + "/ruleset.textproto",
                                 testing::ReadFileOrEmpty(kIpexDir + "/ruleset.textproto")));
  // A case no rule set can pass: IPEX must both rank first and not rank first.
  ASSERT_TRUE(testing::WriteFile(rule_dir + "/tests.textproto",
                                 "cases {\n  name: \"impossible\"\n"
                                 "  patient { reference: \"t\" sex: MALE age { days: 30 } }\n"
                                 "  expect { top_diagnosis: \"ipex\" "
                                 "not_top_diagnosis: \"ipex\" }\n}\n"));
  const CommandResult r = Cdsctl({"rules", "test", rule_dir});
  EXPECT_EQ(r.exit_code, 1) << Describe(r);
  EXPECT_TRUE(absl::StrContains(r.out, "FAIL impossible")) << r.out;
}

}  // namespace
}  // namespace cds
