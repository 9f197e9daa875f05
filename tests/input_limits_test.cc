// Input limits and rich errors through the real cds-server: each malformed request gets
// INVALID_ARGUMENT with google.rpc.Status details (grpc-status-details-bin) holding a
// google.rpc.BadRequest whose violations name the exact field, and neither the message nor
// any violation echoes the patient's data. Also: several problems at once, the cap on the
// number of violations, the maximum request size, and errors of the other RPCs.

#include <chrono>
#include <cmath>
#include <functional>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "cds/v1/service.grpc.pb.h"
#include "client/input.h"
#include "google/rpc/error_details.pb.h"
#include "google/rpc/status.pb.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "tests/test_util.h"

namespace cds {
namespace {

using ::cds::testing::ServerProcess;
using Request = cds::v1::EvaluateRequest;

const std::string kSourceDir = CDS_SOURCE_DIR;
constexpr char kReference[] = "pseudo-ref-limits-4c1d8e";

Request ValidRequest() {
  absl::StatusOr<Request> input =
      cli::ReadEvaluateInput(kSourceDir + "/client/examples/triad_boy.json");
  EXPECT_TRUE(input.ok()) << input.status();
  Request request;
  if (input.ok()) *request.mutable_patient() = input->patient();
  request.set_rule_set("ipex");
  request.mutable_patient()->set_reference(kReference);
  return request;
}

// Every code string in the request (the patient's data a message must not echo).
std::vector<std::string> PatientStrings(const Request& request) {
  std::vector<std::string> out = {kReference};
  const cds::v1::Patient& p = request.patient();
  for (const auto& f : p.findings()) out.push_back(f.term().code());
  for (const auto& m : p.measurements()) out.push_back(m.assay().code());
  for (const auto& r : p.family_history().relatives()) {
    for (const auto& c : r.conditions()) out.push_back(c.code());
  }
  std::vector<std::string> distinctive;
  for (std::string& s : out) {
    if (s.size() >= 5) distinctive.push_back(std::move(s));
  }
  return distinctive;
}

struct Details {
  bool ok = false;
  google::rpc::Status status;
  google::rpc::BadRequest bad_request;
};

Details ParseDetails(const grpc::Status& status) {
  Details d;
  if (!d.status.ParseFromString(status.error_details())) return d;
  if (d.status.details_size() != 1) return d;
  if (d.status.details(0).type_url() != "type.googleapis.com/google.rpc.BadRequest") return d;
  d.ok = d.bad_request.ParseFromString(d.status.details(0).value());
  return d;
}

class LimitsServer {
 public:
  explicit LimitsServer(std::vector<std::string> extra = {}) {
    std::vector<std::string> flags = {"--listen", "127.0.0.1:0", "--rules_dir",
                                      kSourceDir + "/rules", "--drain", "0s",
                                      "--poll_interval", "0"};
    flags.insert(flags.end(), extra.begin(), extra.end());
    std::string error;
    started_ = process_.Start(CDS_SERVER_BINARY, flags, &error);
    EXPECT_TRUE(started_) << error;
    grpc::ChannelArguments args;
    args.SetMaxSendMessageSize(64 << 20);
    channel_ = grpc::CreateCustomChannel(process_.address(), grpc::InsecureChannelCredentials(),
                                         args);
    stub_ = cds::v1::DecisionSupport::NewStub(channel_);
  }
  bool started() const { return started_; }
  cds::v1::DecisionSupport::Stub& stub() { return *stub_; }
  ServerProcess& process() { return process_; }

  grpc::Status Evaluate(const Request& request) {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(20));
    cds::v1::EvaluateResponse response;
    return stub_->Evaluate(&context, request, &response);
  }

 private:
  ServerProcess process_;
  bool started_ = false;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<cds::v1::DecisionSupport::Stub> stub_;
};

struct MalformedCase {
  std::string name;
  std::function<void(Request*)> mutate;
  std::string field;  // the first (here: only) field violation expected
};

cds::v1::Patient* P(Request* r) { return r->mutable_patient(); }
cds::v1::Finding* F0(Request* r) { return r->mutable_patient()->mutable_findings(0); }
cds::v1::Measurement* M0(Request* r) { return r->mutable_patient()->mutable_measurements(0); }
// Replaces the family history with one maternal uncle and returns him.
cds::v1::Relative* OnlyRelative(Request* r) {
  cds::v1::FamilyHistory* family = r->mutable_patient()->mutable_family_history();
  family->Clear();
  cds::v1::Relative* relative = family->add_relatives();
  relative->set_relationship(cds::v1::Relative::MATERNAL_UNCLE);
  relative->set_sex(cds::v1::MALE);
  return relative;
}
cds::v1::Code* Condition0(Request* r) {
  cds::v1::Code* code = OnlyRelative(r)->add_conditions();
  code->set_system("HPO");
  code->set_code("HP:0002041");
  return code;
}
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();

std::vector<MalformedCase> Cases() {
  const std::string finding = "patient.findings[0]";
  const std::string measurement = "patient.measurements[0]";
  const std::string relative = "patient.family_history.relatives[0]";
  return {
      // Which rule set.
      {"rule_set missing", [](Request* r) { r->clear_rule_set(); }, "rule_set"},
      {"rule_set too long", [](Request* r) { r->set_rule_set(std::string(1000, 'x')); },
       "rule_set"},
      {"rule_set with a space", [](Request* r) { r->set_rule_set("ip ex"); }, "rule_set"},
      {"rule_set with a slash", [](Request* r) { r->set_rule_set("../ipex"); }, "rule_set"},
      {"rule_set pin without name", [](Request* r) { r->set_rule_set("@1.0.0"); }, "rule_set"},
      {"rule_set empty pin", [](Request* r) { r->set_rule_set("ipex@"); }, "rule_set"},
      {"rule_set pin with bad characters", [](Request* r) { r->set_rule_set("ipex@1.0;0"); },
       "rule_set"},
      {"pin and version", [](Request* r) { r->set_rule_set("ipex@1.0.0"); r->set_version("1.0.0"); },
       "version"},
      {"pin and label", [](Request* r) { r->set_rule_set("ipex@canary"); r->set_label("stable"); },
       "label"},
      {"version with a slash", [](Request* r) { r->set_version("1.0/0"); }, "version"},
      {"version too long", [](Request* r) { r->set_version(std::string(200, '1')); }, "version"},
      {"label with a dollar", [](Request* r) { r->set_label("st$ble"); }, "label"},
      {"version and label", [](Request* r) { r->set_version("1.0.0"); r->set_label("stable"); },
       "label"},
      {"patient missing", [](Request* r) { r->clear_patient(); }, "patient"},
      // The patient.
      {"reference too long", [](Request* r) { P(r)->set_reference(std::string(300, 'r')); },
       "patient.reference"},
      {"sex unspecified", [](Request* r) { P(r)->set_sex(cds::v1::SEX_UNSPECIFIED); },
       "patient.sex"},
      {"sex out of range", [](Request* r) { P(r)->set_sex(static_cast<cds::v1::Sex>(99)); },
       "patient.sex"},
      {"age negative", [](Request* r) { P(r)->mutable_age()->set_days(-3); }, "patient.age"},
      {"age NaN", [](Request* r) { P(r)->mutable_age()->set_days(kNaN); }, "patient.age"},
      {"age infinite", [](Request* r) { P(r)->mutable_age()->set_days(kInf); }, "patient.age"},
      {"age over 150 years", [](Request* r) { P(r)->mutable_age()->set_days(151 * 366.0); },
       "patient.age"},
      {"age malformed ISO", [](Request* r) { P(r)->mutable_age()->set_iso8601_duration("P3Q"); },
       "patient.age"},
      {"age ISO over 150 years",
       [](Request* r) { P(r)->mutable_age()->set_iso8601_duration("P200Y"); }, "patient.age"},
      {"too many findings",
       [](Request* r) {
         while (P(r)->findings_size() <= 2000) *P(r)->add_findings() = P(r)->findings(0);
       },
       "patient.findings"},
      // A finding.
      {"finding without term", [](Request* r) { F0(r)->clear_term(); }, finding + ".term"},
      {"finding without code", [](Request* r) { F0(r)->mutable_term()->clear_code(); },
       finding + ".term.code"},
      {"HPO id in lower case", [](Request* r) { F0(r)->mutable_term()->set_code("hp:0002028"); },
       finding + ".term.code"},
      {"HPO id with 6 digits", [](Request* r) { F0(r)->mutable_term()->set_code("HP:000202"); },
       finding + ".term.code"},
      {"HPO id with 8 digits", [](Request* r) { F0(r)->mutable_term()->set_code("HP:00020281"); },
       finding + ".term.code"},
      {"HPO id with a letter", [](Request* r) { F0(r)->mutable_term()->set_code("HP:00020X8"); },
       finding + ".term.code"},
      {"HPO id without prefix", [](Request* r) { F0(r)->mutable_term()->set_code("0002028"); },
       finding + ".term.code"},
      {"HPO id with an underscore",
       [](Request* r) { F0(r)->mutable_term()->set_code("HP_0002028"); }, finding + ".term.code"},
      {"no system and no CURIE",
       [](Request* r) {
         F0(r)->mutable_term()->clear_system();
         F0(r)->mutable_term()->set_code("0002028");
       },
       finding + ".term.system"},
      {"code too long",
       [](Request* r) { F0(r)->mutable_term()->set_code("HP:" + std::string(200, '0')); },
       finding + ".term.code"},
      {"system too long",
       [](Request* r) { F0(r)->mutable_term()->set_system(std::string(200, 'S')); },
       finding + ".term.system"},
      {"display too long",
       [](Request* r) { F0(r)->mutable_term()->set_display(std::string(600, 'd')); },
       finding + ".term.display"},
      {"finding status unspecified",
       [](Request* r) { F0(r)->set_status(cds::v1::Finding::STATUS_UNSPECIFIED); },
       finding + ".status"},
      {"finding status out of range",
       [](Request* r) { F0(r)->set_status(static_cast<cds::v1::Finding::Status>(42)); },
       finding + ".status"},
      {"onset negative", [](Request* r) { F0(r)->mutable_onset()->set_days(-1); },
       finding + ".onset"},
      {"onset after the patient's age", [](Request* r) { F0(r)->mutable_onset()->set_days(400); },
       finding + ".onset"},
      {"onset ISO over 150 years",
       [](Request* r) { F0(r)->mutable_onset()->set_iso8601_duration("P1000Y"); },
       finding + ".onset"},
      // A measurement.
      {"too many measurements",
       [](Request* r) {
         while (P(r)->measurements_size() <= 1000) *P(r)->add_measurements() = P(r)->measurements(0);
       },
       "patient.measurements"},
      {"measurement without assay", [](Request* r) { M0(r)->clear_assay(); }, measurement + ".assay"},
      {"assay without code", [](Request* r) { M0(r)->mutable_assay()->clear_code(); },
       measurement + ".assay.code"},
      {"LOINC without check digit", [](Request* r) { M0(r)->mutable_assay()->set_code("19113"); },
       measurement + ".assay.code"},
      {"LOINC with two check digits",
       [](Request* r) { M0(r)->mutable_assay()->set_code("19113-00"); },
       measurement + ".assay.code"},
      {"LOINC with letters", [](Request* r) { M0(r)->mutable_assay()->set_code("ABCDE-1"); },
       measurement + ".assay.code"},
      {"LOINC with 8 digits", [](Request* r) { M0(r)->mutable_assay()->set_code("12345678-9"); },
       measurement + ".assay.code"},
      {"LOINC with no digits before the dash",
       [](Request* r) { M0(r)->mutable_assay()->set_code("-12345"); },
       measurement + ".assay.code"},
      {"lab value NaN", [](Request* r) { M0(r)->set_value(kNaN); }, measurement + ".value"},
      {"lab value infinite", [](Request* r) { M0(r)->set_value(kInf); }, measurement + ".value"},
      {"lab value negative", [](Request* r) { M0(r)->set_value(-1); }, measurement + ".value"},
      {"unit missing", [](Request* r) { M0(r)->clear_unit(); }, measurement + ".unit"},
      {"unit too long", [](Request* r) { M0(r)->set_unit(std::string(200, 'u')); },
       measurement + ".unit"},
      {"sample age negative", [](Request* r) { M0(r)->mutable_age()->set_days(-5); },
       measurement + ".age"},
      {"reference low negative",
       [](Request* r) { M0(r)->mutable_reference_range()->set_low(-1); },
       measurement + ".reference_range.low"},
      {"reference high NaN", [](Request* r) { M0(r)->mutable_reference_range()->set_high(kNaN); },
       measurement + ".reference_range.high"},
      {"reference low above high",
       [](Request* r) {
         M0(r)->mutable_reference_range()->set_low(10);
         M0(r)->mutable_reference_range()->set_high(1);
       },
       measurement + ".reference_range"},
      // Family history.
      {"consanguinity out of range",
       [](Request* r) {
         P(r)->mutable_family_history()->set_consanguinity(
             static_cast<cds::v1::FamilyHistory::Consanguinity>(7));
       },
       "patient.family_history.consanguinity"},
      {"too many relatives",
       [](Request* r) {
         OnlyRelative(r);
         auto* family = P(r)->mutable_family_history();
         while (family->relatives_size() <= 200) *family->add_relatives() = family->relatives(0);
       },
       "patient.family_history.relatives"},
      {"relationship unspecified",
       [](Request* r) { OnlyRelative(r)->set_relationship(cds::v1::Relative::RELATIONSHIP_UNSPECIFIED); },
       relative + ".relationship"},
      {"relative sex out of range",
       [](Request* r) { OnlyRelative(r)->set_sex(static_cast<cds::v1::Sex>(99)); },
       relative + ".sex"},
      {"too many conditions",
       [](Request* r) {
         Condition0(r);
         auto* rel = P(r)->mutable_family_history()->mutable_relatives(0);
         while (rel->conditions_size() <= 100) *rel->add_conditions() = rel->conditions(0);
       },
       relative + ".conditions"},
      {"condition without code", [](Request* r) { Condition0(r)->clear_code(); },
       relative + ".conditions[0].code"},
      {"condition with a bad HPO id", [](Request* r) { Condition0(r)->set_code("HP:12"); },
       relative + ".conditions[0].code"},
      {"condition with a bad OMIM number",
       [](Request* r) {
         Condition0(r)->set_system("OMIM");
         Condition0(r)->set_code("OMIM:30479");
       },
       relative + ".conditions[0].code"},
      {"condition with a bad Orphanet code",
       [](Request* r) {
         cds::v1::Code* c = Condition0(r);
         c->set_system("ORPHA");
         c->set_code("ORPHA:abc");
       },
       relative + ".conditions[0].code"},
  };
}

class InputLimitsTest : public ::testing::Test {
 protected:
  void SetUp() override { ASSERT_TRUE(server_.started()); }
  LimitsServer server_;
};

TEST_F(InputLimitsTest, ValidRequestIsAccepted) {
  const grpc::Status status = server_.Evaluate(ValidRequest());
  EXPECT_TRUE(status.ok()) << status.error_message();
}

TEST_F(InputLimitsTest, EachMalformedRequestGetsInvalidArgumentWithItsFieldViolation) {
  const std::vector<MalformedCase> cases = Cases();
  ASSERT_GE(cases.size(), 50u);
  std::vector<std::string> names;
  for (const MalformedCase& c : cases) {
    SCOPED_TRACE(c.name);
    Request request = ValidRequest();
    c.mutate(&request);
    const grpc::Status status = server_.Evaluate(request);
    ASSERT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << status.error_message();
    // A readable message naming the field first.
    EXPECT_TRUE(absl::StartsWith(status.error_message(), c.field + " "))
        << status.error_message();
    const Details details = ParseDetails(status);
    ASSERT_TRUE(details.ok) << "no google.rpc.BadRequest in the status details";
    EXPECT_EQ(details.status.code(), static_cast<int>(grpc::StatusCode::INVALID_ARGUMENT));
    EXPECT_EQ(details.status.message(), status.error_message());
    ASSERT_EQ(details.bad_request.field_violations_size(), 1)
        << details.bad_request.DebugString();
    EXPECT_EQ(details.bad_request.field_violations(0).field(), c.field);
    EXPECT_FALSE(details.bad_request.field_violations(0).description().empty());
    // No patient data, in the message or the details.
    for (const std::string& secret : PatientStrings(request)) {
      EXPECT_FALSE(absl::StrContains(status.error_message(), secret)) << secret;
      EXPECT_FALSE(absl::StrContains(details.status.DebugString(), secret)) << secret;
    }
    names.push_back(c.name);
  }
  EXPECT_GE(names.size(), 50u);
}

TEST_F(InputLimitsTest, SeveralProblemsAreReportedTogether) {
  Request request = ValidRequest();
  request.mutable_patient()->set_sex(cds::v1::SEX_UNSPECIFIED);
  request.mutable_patient()->mutable_findings(1)->mutable_term()->set_code("HP:1");
  request.mutable_patient()->mutable_measurements(2)->set_value(-4);
  const grpc::Status status = server_.Evaluate(request);
  ASSERT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_TRUE(absl::StartsWith(status.error_message(), "patient.sex "));
  EXPECT_TRUE(absl::StrContains(status.error_message(), "(and 2 more problems)"))
      << status.error_message();
  const Details details = ParseDetails(status);
  ASSERT_TRUE(details.ok);
  ASSERT_EQ(details.bad_request.field_violations_size(), 3);
  EXPECT_EQ(details.bad_request.field_violations(0).field(), "patient.sex");
  EXPECT_EQ(details.bad_request.field_violations(1).field(), "patient.findings[1].term.code");
  EXPECT_EQ(details.bad_request.field_violations(2).field(), "patient.measurements[2].value");
}

TEST_F(InputLimitsTest, ViolationsAreCappedAndTheRestCounted) {
  Request request = ValidRequest();
  for (int i = 0; i < 50; ++i) {
    cds::v1::Finding* f = request.mutable_patient()->add_findings();
    f->mutable_term()->set_system("HPO");
    f->mutable_term()->set_code("HP:bad");
    f->set_status(cds::v1::Finding::PRESENT);
  }
  const grpc::Status status = server_.Evaluate(request);
  ASSERT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_TRUE(absl::StrContains(status.error_message(), "(and 49 more problems)"))
      << status.error_message();
  const Details details = ParseDetails(status);
  ASSERT_TRUE(details.ok);
  EXPECT_EQ(details.bad_request.field_violations_size(), 20);
  EXPECT_EQ(details.bad_request.field_violations(0).field(), "patient.findings[4].term.code");
}

TEST_F(InputLimitsTest, GetRuleSetWithoutNameHasAFieldViolation) {
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  cds::v1::GetRuleSetResponse response;
  const grpc::Status status =
      server_.stub().GetRuleSet(&context, cds::v1::GetRuleSetRequest(), &response);
  ASSERT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  const Details details = ParseDetails(status);
  ASSERT_TRUE(details.ok);
  ASSERT_EQ(details.bad_request.field_violations_size(), 1);
  EXPECT_EQ(details.bad_request.field_violations(0).field(), "name");
}

TEST_F(InputLimitsTest, NotFoundCarriesNoBadRequest) {
  Request request = ValidRequest();
  request.set_rule_set("no-such-rules");
  const grpc::Status status = server_.Evaluate(request);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_TRUE(status.error_details().empty());
}

TEST(InputLimitsSizeTest, RequestsAboveTheMaximumSizeAreRefusedBeforeEvaluation) {
  LimitsServer server({"--max_request_bytes", "65536"});
  ASSERT_TRUE(server.started());
  Request small = ValidRequest();
  EXPECT_TRUE(server.Evaluate(small).ok());
  Request big = ValidRequest();
  for (int i = 0; i < 400; ++i) {
    cds::v1::Finding* f = big.mutable_patient()->add_findings();
    *f = big.patient().findings(0);
    f->mutable_term()->set_display(std::string(300, 'd'));
  }
  ASSERT_GT(big.ByteSizeLong(), 65536u);
  const grpc::Status status = server.Evaluate(big);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << status.error_message();
  // The server is unharmed.
  EXPECT_TRUE(server.Evaluate(small).ok());
}

}  // namespace
}  // namespace cds
