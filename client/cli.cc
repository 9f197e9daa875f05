#include "client/cli.h"

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <sstream>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "cds/v1/audit.grpc.pb.h"
#include "cds/v1/service.grpc.pb.h"
#include "client/format.h"
#include "client/input.h"
#include "client/phenopacket.h"
#include "client/rules_tool.h"
#include "client/screen.h"
#include "client/validation.h"
#include "google/protobuf/util/json_util.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "grpcpp/grpcpp.h"
#include "server/audit/audit_log.h"
#include "server/bundle/bundle.h"
#include "server/compiler/compiler.h"
#include "server/compiler/source_loader.h"
#include "server/engine/case_runner.h"
#include "server/engine/engine.h"

namespace cds::cli {
namespace {

constexpr char kHelp[] = R"(cdsctl - client of cds-server (IPEX clinical decision support)

Suggestions support a clinician's judgement; they are not a diagnosis.

Usage:
  cdsctl evaluate FILE [--server HOST:PORT] [--rule-set NAME] [--version V]
                       [--label L] [--json] [--deadline 5s]
  cdsctl evaluate --phenopacket FILE.json [...]
      Evaluates a patient. FILE holds a cds.v1.Patient or a cds.v1.EvaluateRequest, in
      protobuf's JSON mapping (.json) or text format (.textproto, .txtpb, .pbtxt); with
      --phenopacket, a GA4GH Phenopacket v2 JSON document (see client/README.md for the
      mapping). --rule-set, --version and --label override the file's (default rule set:
      ipex; default version: the one labelled stable, else the highest available);
      --rule-set also takes NAME@VERSION or NAME@LABEL. Prints a ranked table, or with --json the
      EvaluateResponse in protobuf's JSON mapping.
  cdsctl screen FILE.jsonl [--server HOST:PORT] [--rule-set NAME] [--version V]
                           [--label L] [--deadline 5s]
      Screens many patients on one stream (DecisionSupport.EvaluateStream). FILE holds one
      cds.v1.Patient or cds.v1.EvaluateRequest per line, in protobuf's JSON mapping. Writes
      one line of JSON per input line, in order: {"correlationId": LINE, "index": N,
      "response": {...}} or {"correlationId": LINE, "error": {"code": C, "message": M}}; a
      malformed line or refused patient gets its error and the others go on. Exit code 0
      when every patient succeeded, 3 when a line did not parse, 5 when the server refused
      a patient; --deadline applies per 100 patients.
  cdsctl validate --corpus FILE.jsonl [--rules DIR | --server HOST:PORT] [--json]
      Runs a corpus of published cases (one JSON object per line, the format of
      shared/validation/cases.jsonl) through a rule set: in-process from DIR
      (rules/<name>/<version>/), or through the server. Reports per diagnosis the
      cases, top-1 and top-3 accuracy and Brier score, and the screening hypothesis'
      sensitivity and specificity at the rule set's alert threshold.
  cdsctl rulesets [--server HOST:PORT] [--json]
      Lists the rule-set versions the server holds, their state and digest.
  cdsctl health [--server HOST:PORT] [--service NAME]
      Prints SERVING or NOT_SERVING (grpc.health.v1; default service "" = whole server).
  cdsctl audit [--server HOST:PORT | --db FILE] [--since T] [--until T] [--caller ID]
               [--rule-set NAME[@VERSION]] [--pseudonym HEX | --patient-ref REF]
               [--limit N] [--json]
      Lists audit records, oldest first: from the server (AuditService.QueryAudit, admin
      role; the default), or with --db straight from the SQLite file of cds-server
      --audit_db. T is RFC 3339 (2026-11-23T10:00:00Z) or a duration back from now (24h).
      --patient-ref finds a patient's records: the server computes the pseudonym with its
      key; with --db, give that key as --audit-key FILE. The reference is never stored.
      --limit caps the records printed (default 1000).
  cdsctl rules check DIR [--keys DIR]
      Compiles a rule-set directory (rules/<name>/<version>/) exactly as the server does,
      prints every issue (errors, and lint warnings such as unused concepts or
      implausible likelihood ratios), and checks its MANIFEST against the files (with
      --keys, also the signature against the public keys in that directory).
  cdsctl rules test DIR [--cases DIR]
      Compiles DIR and runs its embedded test cases (tests.textproto), plus the cases of
      every RuleSetTests file (*.textproto) in --cases: PASS/FAIL per case.
  cdsctl rules diff OLD_DIR NEW_DIR [--cases DIR]
      What an update changes: for each case (both versions' embedded cases, and the
      RuleSetTests files and example patients/requests in --cases), the diagnoses' ranks
      and probabilities old -> new, and actions added or removed.
  cdsctl rules keygen --out PREFIX
      Creates an Ed25519 key pair: PREFIX.key (private, mode 0600; never commit it) and
      PREFIX.pub (give it to the servers' trusted keys directory, e.g. rules/keys/).
  cdsctl rules sign DIR --key PREFIX.key [--author TEXT]
      Checks and tests DIR, then writes DIR/MANIFEST (every file's SHA-256) and, last,
      DIR/MANIFEST.sig (Ed25519 signature over MANIFEST).
  cdsctl rules publish DIR [--server HOST:PORT]
      Sends the signed bundle in DIR to the server (RuleSetAdmin.PublishRuleSet); the
      server verifies, compiles and tests it before serving it.
  cdsctl rules label NAME LABEL VERSION [--server HOST:PORT]
      Points LABEL (e.g. canary, stable) of rule set NAME at VERSION. Requests without a
      version use "stable" when set; rollback = point the label back.
  cdsctl rules retire NAME VERSION [--server HOST:PORT]
      Stops serving VERSION (refused while a label points at it).

Options:
  --server HOST:PORT   default 127.0.0.1:50051
  --tls_ca PEM         use TLS, trusting this CA for the server's certificate
  --tls_cert PEM       client certificate for mutual TLS (with --tls_key)
  --tls_key PEM        its private key
  --deadline DURATION  per call, default 5s
  --help               this text

Exit codes:
  0  success (health: SERVING)
  1  negative result: health NOT_SERVING, rules with errors or failing cases
  2  usage error
  3  input file missing, unreadable or malformed
  4  server unreachable, unavailable or too slow (UNAVAILABLE, DEADLINE_EXCEEDED)
  5  the server refused the request (e.g. NOT_FOUND for an unknown rule set,
     INVALID_ARGUMENT for a malformed patient)
)";

constexpr char kDefaultServer[] = "127.0.0.1:50051";
constexpr char kDefaultRuleSet[] = "ipex";

struct Options {
  std::vector<std::string> positional;
  std::string server = kDefaultServer;
  std::optional<std::string> rule_set;
  std::optional<std::string> version;
  std::string service;
  std::string phenopacket;
  std::string corpus;
  std::string rules_dir;
  std::optional<std::string> label;
  std::string cases_dir;
  std::string keys_dir;
  std::string key;
  std::string out_prefix;
  std::string author;
  absl::Duration deadline = absl::Seconds(5);
  bool json = false;
  bool help = false;
  // TLS: file contents (PEM) read at parse time; all empty for plaintext.
  std::string tls_ca_pem;
  // audit
  std::string audit_db;
  std::optional<absl::Time> since;
  std::optional<absl::Time> until;
  std::string caller;
  std::string pseudonym;
  std::string patient_ref;
  std::string audit_key;
  int limit = 1000;
  std::string tls_cert_pem;
  std::string tls_key_pem;
};

// The whole file into *out; false when it cannot be read or is empty.
bool ReadPem(const std::string& path, std::string* out) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return false;
  std::stringstream content;
  content << in.rdbuf();
  *out = content.str();
  return !out->empty();
}

absl::StatusOr<Options> ParseArgs(const std::vector<std::string>& args) {
  Options options;
  for (size_t i = 0; i < args.size(); ++i) {
    std::string arg = args[i];
    if (arg == "-h" || arg == "--help") {
      options.help = true;
      continue;
    }
    if (arg == "--json") {
      options.json = true;
      continue;
    }
    if (!absl::StartsWith(arg, "--")) {
      options.positional.push_back(arg);
      continue;
    }
    std::string value;
    if (size_t eq = arg.find('='); eq != std::string::npos) {
      value = arg.substr(eq + 1);
      arg = arg.substr(0, eq);
    } else if (i + 1 < args.size()) {
      value = args[++i];
    } else {
      return absl::InvalidArgumentError(absl::StrCat(arg, " needs a value"));
    }
    if (arg == "--server") {
      options.server = value;
    } else if (arg == "--rule-set") {
      options.rule_set = value;
    } else if (arg == "--version") {
      options.version = value;
    } else if (arg == "--service") {
      options.service = value;
    } else if (arg == "--phenopacket") {
      options.phenopacket = value;
    } else if (arg == "--corpus") {
      options.corpus = value;
    } else if (arg == "--rules") {
      options.rules_dir = value;
    } else if (arg == "--label") {
      options.label = value;
    } else if (arg == "--cases") {
      options.cases_dir = value;
    } else if (arg == "--keys") {
      options.keys_dir = value;
    } else if (arg == "--key") {
      options.key = value;
    } else if (arg == "--out") {
      options.out_prefix = value;
    } else if (arg == "--author") {
      options.author = value;
    } else if (arg == "--tls_ca" || arg == "--tls_cert" || arg == "--tls_key") {
      std::string* pem = arg == "--tls_ca"     ? &options.tls_ca_pem
                         : arg == "--tls_cert" ? &options.tls_cert_pem
                                               : &options.tls_key_pem;
      if (!ReadPem(value, pem)) {
        return absl::InvalidArgumentError(absl::StrCat(arg, ": cannot read ", value));
      }
    } else if (arg == "--db") {
      options.audit_db = value;
    } else if (arg == "--since" || arg == "--until") {
      absl::Time t;
      absl::Duration back;
      std::string parse_error;
      if (absl::ParseDuration(value, &back)) {
        t = absl::Now() - back;
      } else if (!absl::ParseTime(absl::RFC3339_full, value, &t, &parse_error)) {
        return absl::InvalidArgumentError(
            absl::StrCat(arg, " wants RFC 3339 time or a duration such as 24h, got '", value, "'"));
      }
      (arg == "--since" ? options.since : options.until) = t;
    } else if (arg == "--caller") {
      options.caller = value;
    } else if (arg == "--pseudonym") {
      options.pseudonym = value;
    } else if (arg == "--patient-ref") {
      options.patient_ref = value;
    } else if (arg == "--audit-key") {
      options.audit_key = value;
    } else if (arg == "--limit") {
      if (!absl::SimpleAtoi(value, &options.limit) || options.limit <= 0) {
        return absl::InvalidArgumentError(absl::StrCat("--limit wants a positive number"));
      }
    } else if (arg == "--deadline") {
      if (!absl::ParseDuration(value, &options.deadline) || options.deadline <= absl::ZeroDuration()) {
        return absl::InvalidArgumentError(
            absl::StrCat("--deadline wants a positive duration such as 5s, got '", value, "'"));
      }
    } else {
      return absl::InvalidArgumentError(absl::StrCat("unknown option ", arg));
    }
  }
  if (options.tls_cert_pem.empty() != options.tls_key_pem.empty()) {
    return absl::InvalidArgumentError("--tls_cert and --tls_key go together");
  }
  if (!options.tls_cert_pem.empty() && options.tls_ca_pem.empty()) {
    return absl::InvalidArgumentError("--tls_cert needs --tls_ca (the server's CA)");
  }
  return options;
}

std::shared_ptr<grpc::ChannelCredentials> CredentialsFor(const Options& options) {
  if (options.tls_ca_pem.empty()) return grpc::InsecureChannelCredentials();
  grpc::SslCredentialsOptions ssl;
  ssl.pem_root_certs = options.tls_ca_pem;
  ssl.pem_private_key = options.tls_key_pem;
  ssl.pem_cert_chain = options.tls_cert_pem;
  return grpc::SslCredentials(ssl);
}

// A channel and the per-call context settings shared by the RPC commands.
class Connection {
 public:
  explicit Connection(const Options& options)
      : server_(options.server),
        deadline_(options.deadline),
        channel_(grpc::CreateChannel(options.server, CredentialsFor(options))) {}

  std::shared_ptr<grpc::Channel> channel() const { return channel_; }

  void Prepare(grpc::ClientContext* context) const {
    context->set_deadline(absl::ToChronoTime(absl::Now() + deadline_));
  }

  // Prints why a call failed and returns the exit code for it.
  int Report(const grpc::Status& status, std::ostream& err) const {
    switch (status.error_code()) {
      case grpc::StatusCode::UNAVAILABLE:
        // The server itself answers UNAVAILABLE while it has no rule set; otherwise the
        // connection failed.
        if (channel_->GetState(false) == GRPC_CHANNEL_READY) {
          err << "cdsctl: server at " << server_ << " is unavailable: " << status.error_message()
              << "\n";
        } else {
          err << "cdsctl: cannot reach server at " << server_ << " (" << status.error_message()
              << ")\n";
        }
        return kUnreachable;
      case grpc::StatusCode::DEADLINE_EXCEEDED:
        err << "cdsctl: server at " << server_ << " did not answer within "
            << absl::FormatDuration(deadline_) << "\n";
        return kUnreachable;
      default:
        err << "cdsctl: server refused the request: " << StatusCodeName(status.error_code())
            << ": " << status.error_message() << "\n";
        return kServerError;
    }
  }

 private:
  static const char* StatusCodeName(grpc::StatusCode code) {
    switch (code) {
      case grpc::StatusCode::INVALID_ARGUMENT: return "INVALID_ARGUMENT";
      case grpc::StatusCode::NOT_FOUND: return "NOT_FOUND";
      case grpc::StatusCode::FAILED_PRECONDITION: return "FAILED_PRECONDITION";
      case grpc::StatusCode::INTERNAL: return "INTERNAL";
      case grpc::StatusCode::UNIMPLEMENTED: return "UNIMPLEMENTED";
      case grpc::StatusCode::PERMISSION_DENIED: return "PERMISSION_DENIED";
      case grpc::StatusCode::UNAUTHENTICATED: return "UNAUTHENTICATED";
      case grpc::StatusCode::RESOURCE_EXHAUSTED: return "RESOURCE_EXHAUSTED";
      default: return "error";
    }
  }

  std::string server_;
  absl::Duration deadline_;
  std::shared_ptr<grpc::Channel> channel_;
};

int PrintJson(const google::protobuf::Message& message, std::ostream& out, std::ostream& err) {
  google::protobuf::util::JsonPrintOptions json;
  json.add_whitespace = true;
  json.always_print_primitive_fields = false;
  json.preserve_proto_field_names = false;  // lowerCamelCase, the canonical JSON mapping
  std::string text;
  const auto status = google::protobuf::util::MessageToJsonString(message, &text, json);
  if (!status.ok()) {
    err << "cdsctl: cannot print the response as JSON: " << status.message().ToString() << "\n";
    return kFailed;
  }
  out << text;
  if (!absl::EndsWith(text, "\n")) out << "\n";
  return kOk;
}

// The request `cdsctl evaluate` sends: from FILE, or mapped from --phenopacket FILE.
absl::StatusOr<cds::v1::EvaluateRequest> EvaluateInput(const Options& options,
                                                       std::ostream& err) {
  if (options.phenopacket.empty()) return ReadEvaluateInput(options.positional[1]);
  absl::StatusOr<std::string> json = ReadFile(options.phenopacket);
  if (!json.ok()) return json.status();
  std::vector<std::string> notes;
  absl::StatusOr<cds::v1::Patient> patient = PatientFromPhenopacketJson(*json, &notes);
  if (!patient.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat(options.phenopacket, ": ", patient.status().message()));
  }
  for (const std::string& note : notes) err << "cdsctl: note: " << note << "\n";
  cds::v1::EvaluateRequest request;
  *request.mutable_patient() = *std::move(patient);
  return request;
}

int Evaluate(const Options& options, std::ostream& out, std::ostream& err) {
  if (options.positional.size() != (options.phenopacket.empty() ? 2u : 1u)) {
    err << "cdsctl: usage: cdsctl evaluate FILE | --phenopacket FILE [--server HOST:PORT] "
           "[--json]\n";
    return kUsage;
  }
  absl::StatusOr<cds::v1::EvaluateRequest> request = EvaluateInput(options, err);
  if (!request.ok()) {
    err << "cdsctl: " << request.status().message() << "\n";
    return kBadInput;
  }
  if (options.rule_set.has_value()) request->set_rule_set(*options.rule_set);
  if (request->rule_set().empty()) request->set_rule_set(kDefaultRuleSet);
  if (options.version.has_value()) request->set_version(*options.version);
  if (options.label.has_value()) request->set_label(*options.label);
  // The report shows the text of every reason: the full trace, unless the input chose.
  if (request->explanation() == cds::v1::EXPLANATION_UNSPECIFIED) {
    request->set_explanation(cds::v1::EXPLANATION_FULL);
  }

  Connection connection(options);
  auto stub = cds::v1::DecisionSupport::NewStub(connection.channel());
  grpc::ClientContext context;
  connection.Prepare(&context);
  cds::v1::EvaluateResponse response;
  const grpc::Status status = stub->Evaluate(&context, *request, &response);
  if (!status.ok()) return connection.Report(status, err);
  if (options.json) return PrintJson(response, out, err);
  out << FormatEvaluateResponse(response);
  return kOk;
}

int ScreenCommand(const Options& options, std::ostream& out, std::ostream& err) {
  if (options.positional.size() != 2) {
    err << "cdsctl: usage: cdsctl screen FILE.jsonl [--server HOST:PORT] [--rule-set NAME]\n";
    return kUsage;
  }
  // Read as it is screened (the file can hold a whole unit's patients); counted first, for
  // the call's deadline.
  const std::string& path = options.positional[1];
  std::error_code dir_error;
  if (std::filesystem::is_directory(path, dir_error)) {
    err << "cdsctl: cannot read " << path << ": is a directory\n";
    return kBadInput;
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    err << "cdsctl: cannot read " << path << ": " << std::strerror(errno) << "\n";
    return kBadInput;
  }
  const int64_t lines = CountScreenLines(in);
  in.clear();
  in.seekg(0);
  ScreenDefaults defaults;
  defaults.rule_set = kDefaultRuleSet;
  defaults.rule_set_override = options.rule_set;
  defaults.version = options.version;
  defaults.label = options.label;

  Connection connection(options);
  auto stub = cds::v1::DecisionSupport::NewStub(connection.channel());
  grpc::ClientContext context;
  context.set_deadline(absl::ToChronoTime(
      absl::Now() + options.deadline * static_cast<double>(1 + lines / 100)));
  ScreenSummary summary;
  const grpc::Status status = Screen(*stub, &context, in, defaults, out, &summary);
  if (!status.ok()) return connection.Report(status, err);
  err << "cdsctl: screened " << summary.lines << " line(s): " << summary.ok << " ok, "
      << summary.patient_errors << " refused by the server, " << summary.bad_lines
      << " malformed\n";
  if (summary.bad_lines > 0) return kBadInput;
  if (summary.patient_errors > 0) return kServerError;
  return kOk;
}

int RuleSets(const Options& options, std::ostream& out, std::ostream& err) {
  Connection connection(options);
  auto stub = cds::v1::DecisionSupport::NewStub(connection.channel());
  grpc::ClientContext context;
  connection.Prepare(&context);
  cds::v1::ListRuleSetsRequest request;
  if (options.rule_set.has_value()) request.set_name(*options.rule_set);
  cds::v1::ListRuleSetsResponse response;
  const grpc::Status status = stub->ListRuleSets(&context, request, &response);
  if (!status.ok()) return connection.Report(status, err);
  if (options.json) return PrintJson(response, out, err);
  out << FormatRuleSets(response);
  return kOk;
}

void PrintAuditRecord(const audit::AuditRecord& r, bool json, std::ostream& out) {
  const std::string time = absl::FormatTime(absl::RFC3339_full, r.time, absl::UTCTimeZone());
  if (json) {
    out << "{\"time\":\"" << time << "\",\"caller\":\"" << absl::CEscape(r.caller)
        << "\",\"method\":\"" << absl::CEscape(r.method) << "\",\"ruleSet\":\""
        << absl::CEscape(r.rule_set) << "\",\"digest\":\"" << absl::CEscape(r.digest)
        << "\",\"pseudonym\":\"" << absl::CEscape(r.pseudonym) << "\",\"evaluationId\":\""
        << absl::CEscape(r.evaluation_id) << "\",\"topSuggestions\":\""
        << absl::CEscape(r.top_suggestions) << "\",\"statusCode\":" << r.status_code
        << ",\"latencyUs\":" << r.latency_us << "}\n";
  } else {
    out << time << "  " << (r.caller.empty() ? "-" : r.caller) << "  " << r.method << "  "
        << (r.rule_set.empty() ? "-" : r.rule_set) << "  status=" << r.status_code << "  "
        << r.latency_us << "us  " << (r.pseudonym.empty() ? "-" : r.pseudonym.substr(0, 16))
        << "  " << (r.evaluation_id.empty() ? "-" : r.evaluation_id) << "  "
        << r.top_suggestions << "\n";
  }
}

void SetTimestamp(absl::Time t, google::protobuf::Timestamp* out) {
  const int64_t seconds = absl::ToUnixSeconds(t);
  out->set_seconds(seconds);
  out->set_nanos(static_cast<int32_t>(absl::ToInt64Nanoseconds(t - absl::FromUnixSeconds(seconds))));
}

// `cdsctl audit` through the server: pages of AuditService.QueryAudit until --limit.
int AuditFromServer(const Options& options, std::ostream& out, std::ostream& err) {
  if (!options.audit_key.empty()) {
    err << "cdsctl: --audit-key goes with --db only (the server pseudonymises --patient-ref "
           "with its own key)\n";
    return kUsage;
  }
  cds::v1::QueryAuditRequest request;
  if (options.since) SetTimestamp(*options.since, request.mutable_since());
  if (options.until) SetTimestamp(*options.until, request.mutable_until());
  request.set_caller(options.caller);
  request.set_rule_set(options.rule_set.value_or(""));
  if (!options.pseudonym.empty()) request.set_pseudonym(options.pseudonym);
  if (!options.patient_ref.empty()) request.set_patient_reference(options.patient_ref);
  Connection connection(options);
  auto stub = cds::v1::AuditService::NewStub(connection.channel());
  int printed = 0;
  while (printed < options.limit) {
    request.set_page_size(std::min(options.limit - printed, 1000));
    grpc::ClientContext context;
    connection.Prepare(&context);
    cds::v1::QueryAuditResponse response;
    const grpc::Status status = stub->QueryAudit(&context, request, &response);
    if (!status.ok()) return connection.Report(status, err);
    for (const cds::v1::AuditEntry& e : response.entries()) {
      audit::AuditRecord r;
      r.time = absl::FromUnixSeconds(e.time().seconds()) + absl::Nanoseconds(e.time().nanos());
      r.caller = e.caller();
      r.method = e.method();
      r.rule_set = e.rule_set();
      r.digest = e.digest();
      r.pseudonym = e.pseudonym();
      r.evaluation_id = e.evaluation_id();
      r.top_suggestions = e.top_suggestions();
      r.status_code = e.status_code();
      r.latency_us = e.latency_us();
      PrintAuditRecord(r, options.json, out);
      ++printed;
    }
    if (response.next_page_token().empty()) break;
    request.set_page_token(response.next_page_token());
  }
  return kOk;
}

int Audit(const Options& options, std::ostream& out, std::ostream& err) {
  if (options.positional.size() != 1) {
    err << "cdsctl: usage: cdsctl audit [--server HOST:PORT | --db FILE] [--since T] [--until T] "
           "[--caller ID] [--rule-set NAME[@VERSION]] [--pseudonym HEX | --patient-ref REF]\n";
    return kUsage;
  }
  if (!options.patient_ref.empty() && !options.pseudonym.empty()) {
    err << "cdsctl: --patient-ref and --pseudonym are exclusive\n";
    return kUsage;
  }
  if (options.audit_db.empty()) return AuditFromServer(options, out, err);
  audit::AuditQuery query;
  if (options.since) query.since = *options.since;
  if (options.until) query.until = *options.until;
  query.caller = options.caller;
  query.rule_set = options.rule_set.value_or("");
  query.pseudonym = options.pseudonym;
  query.limit = options.limit;
  if (!options.patient_ref.empty()) {
    if (options.audit_key.empty()) {
      err << "cdsctl: with --db, --patient-ref needs --audit-key (the server's key file)\n";
      return kUsage;
    }
    absl::StatusOr<audit::Pseudonymizer> pseudonymizer =
        audit::Pseudonymizer::FromKeyFile(options.audit_key);
    if (!pseudonymizer.ok()) {
      err << "cdsctl: " << pseudonymizer.status().message() << "\n";
      return kBadInput;
    }
    query.pseudonym = pseudonymizer->Of(options.patient_ref);
  }
  absl::StatusOr<std::vector<audit::AuditRecord>> records =
      audit::QuerySqliteAudit(options.audit_db, query);
  if (!records.ok()) {
    err << "cdsctl: " << records.status().message() << "\n";
    return kBadInput;
  }
  for (const audit::AuditRecord& r : *records) PrintAuditRecord(r, options.json, out);
  return kOk;
}

int Health(const Options& options, std::ostream& out, std::ostream& err) {
  Connection connection(options);
  auto stub = grpc::health::v1::Health::NewStub(connection.channel());
  grpc::ClientContext context;
  connection.Prepare(&context);
  grpc::health::v1::HealthCheckRequest request;
  request.set_service(options.service);
  grpc::health::v1::HealthCheckResponse response;
  const grpc::Status status = stub->Check(&context, request, &response);
  if (status.error_code() == grpc::StatusCode::NOT_FOUND) {
    // The health service answers NOT_FOUND for a service name it does not know.
    out << "SERVICE_UNKNOWN\n";
    return kFailed;
  }
  if (!status.ok()) return connection.Report(status, err);
  out << grpc::health::v1::HealthCheckResponse::ServingStatus_Name(response.status()) << "\n";
  return response.status() == grpc::health::v1::HealthCheckResponse::SERVING ? kOk : kFailed;
}

// Shared by `rules check` and `rules test`: loads and compiles DIR, printing every issue.
// Returns null (and sets *exit_code) when it cannot go on.
std::shared_ptr<const compiler::CompiledRuleSet> LoadAndCompile(const std::string& dir,
                                                                std::ostream& out,
                                                                std::ostream& err,
                                                                int* exit_code) {
  absl::StatusOr<compiler::RuleSetSource> source = compiler::LoadRuleSetDir(dir);
  if (!source.ok()) {
    err << "cdsctl: " << source.status().message() << "\n";
    *exit_code = kBadInput;
    return nullptr;
  }
  bundle::RemoveBundleFiles(&source->files);  // as the server: MANIFEST is not rule text
  const compiler::CompileResult result = compiler::Compile(*source);
  int errors = 0, warnings = 0;
  for (const compiler::Issue& issue : result.issues) {
    (issue.severity == compiler::Issue::Severity::kError ? errors : warnings)++;
    out << issue.ToString() << "\n";
  }
  if (!result.ok()) {
    out << dir << ": " << errors << " error(s), " << warnings << " warning(s): not servable\n";
    *exit_code = kFailed;
    return nullptr;
  }
  out << "OK " << result.rule_set->name << "@" << result.rule_set->version << " "
      << result.rule_set->digest << ": " << result.rule_set->hypotheses.size()
      << " hypotheses, " << result.rule_set->actions.size() << " actions, "
      << result.rule_set->tests.cases_size() << " test cases, " << warnings << " warning(s)\n";
  *exit_code = kOk;
  return result.rule_set;
}

// `rules publish|label|retire`: the RuleSetAdmin RPCs.
int RulesAdmin(const Options& options, std::ostream& out, std::ostream& err) {
  const std::vector<std::string>& p = options.positional;
  const std::string& verb = p[1];
  Connection connection(options);
  auto stub = cds::v1::RuleSetAdmin::NewStub(connection.channel());
  grpc::ClientContext context;
  connection.Prepare(&context);
  if (verb == "publish") {
    absl::StatusOr<cds::v1::Bundle> bundle = bundle::ReadBundleDir(p[2]);
    if (!bundle.ok()) {
      err << "cdsctl: " << bundle.status().message() << "\n";
      return kBadInput;
    }
    cds::v1::PublishRuleSetRequest request;
    bundle->SerializeToString(request.mutable_bundle());
    cds::v1::PublishRuleSetResponse response;
    const grpc::Status status = stub->PublishRuleSet(&context, request, &response);
    if (!status.ok()) return connection.Report(status, err);
    const cds::v1::RuleSetInfo& info = response.info();
    out << (response.created() ? "published " : "already published (same content) ")
        << info.ref().name() << "@" << info.ref().version() << " " << info.ref().digest()
        << " signer " << (info.signer().empty() ? "UNSIGNED" : info.signer()) << ": "
        << cds::v1::RuleSetInfo::State_Name(info.state()) << "\n";
    return kOk;
  }
  if (verb == "label") {
    cds::v1::SetLabelRequest request;
    request.set_name(p[2]);
    request.set_label(p[3]);
    request.set_version(p[4]);
    cds::v1::SetLabelResponse response;
    const grpc::Status status = stub->SetLabel(&context, request, &response);
    if (!status.ok()) return connection.Report(status, err);
    out << p[2] << "@" << p[3] << " -> " << p[4];
    if (!response.previous_version().empty() && response.previous_version() != p[4]) {
      out << " (was " << response.previous_version() << ")";
    }
    out << "\n";
    return kOk;
  }
  cds::v1::RetireRuleSetRequest request;
  request.set_name(p[2]);
  request.set_version(p[3]);
  cds::v1::RetireRuleSetResponse response;
  const grpc::Status status = stub->RetireRuleSet(&context, request, &response);
  if (!status.ok()) return connection.Report(status, err);
  out << "retired " << p[2] << "@" << p[3] << "\n";
  return kOk;
}

int Rules(const Options& options, std::ostream& out, std::ostream& err) {
  const std::vector<std::string>& p = options.positional;
  const std::string verb = p.size() > 1 ? p[1] : "";
  const std::map<std::string, size_t> arity = {
      {"check", 3}, {"test", 3}, {"diff", 4},  {"keygen", 2}, {"sign", 3},
      {"publish", 3}, {"label", 5}, {"retire", 4}};
  auto it = arity.find(verb);
  if (it == arity.end() || p.size() != it->second || (verb == "keygen" && options.out_prefix.empty()) ||
      (verb == "sign" && options.key.empty())) {
    err << "cdsctl: usage: cdsctl rules check DIR | test DIR [--cases DIR] | diff OLD NEW "
           "[--cases DIR] | keygen --out PREFIX | sign DIR --key KEY | publish DIR | "
           "label NAME LABEL VERSION | retire NAME VERSION (see cdsctl --help)\n";
    return kUsage;
  }
  if (verb == "check") return RulesCheck(p[2], options.keys_dir, out, err);
  if (verb == "test") return RulesTest(p[2], options.cases_dir, out, err);
  if (verb == "diff") return RulesDiff(p[2], p[3], options.cases_dir, out, err);
  if (verb == "keygen") return RulesKeygen(options.out_prefix, out, err);
  if (verb == "sign") return RulesSign(p[2], options.key, options.author, out, err);
  return RulesAdmin(options, out, err);
}

int Validate(const Options& options, std::ostream& out, std::ostream& err) {
  if (options.positional.size() != 1 || options.corpus.empty()) {
    err << "cdsctl: usage: cdsctl validate --corpus FILE.jsonl [--rules DIR | --server "
           "HOST:PORT] [--json]\n";
    return kUsage;
  }
  absl::StatusOr<std::string> text = ReadFile(options.corpus);
  if (!text.ok()) {
    err << "cdsctl: " << text.status().message() << "\n";
    return kBadInput;
  }
  absl::StatusOr<std::vector<CorpusEntry>> corpus = ParseCorpus(*text);
  if (!corpus.ok()) {
    err << "cdsctl: " << options.corpus << ": " << corpus.status().message() << "\n";
    return kBadInput;
  }
  cds::interop::ValidationReport report;
  if (!options.rules_dir.empty()) {
    // In-process: exactly what the server would run, without one.
    std::ostringstream issues;
    int exit_code = kOk;
    std::shared_ptr<const compiler::CompiledRuleSet> rule_set =
        LoadAndCompile(options.rules_dir, issues, err, &exit_code);
    if (rule_set == nullptr) {
      err << issues.str();
      return exit_code;
    }
    report = cli::Validate(*corpus, rule_set->definition, [&](const cds::v1::Patient& patient)
                                                              -> absl::StatusOr<cds::v1::EvaluateResponse> {
      cds::v1::EvaluateResponse response;
      absl::Status status = engine::Evaluate(*rule_set, patient, engine::EvaluateOptions{}, &response);
      if (!status.ok()) return status;
      return response;
    });
  } else {
    Connection connection(options);
    auto stub = cds::v1::DecisionSupport::NewStub(connection.channel());
    cds::v1::GetRuleSetRequest get;
    get.set_name(options.rule_set.value_or(kDefaultRuleSet));
    get.set_version(options.version.value_or(""));
    cds::v1::GetRuleSetResponse rule_set;
    grpc::ClientContext context;
    connection.Prepare(&context);
    const grpc::Status status = stub->GetRuleSet(&context, get, &rule_set);
    if (!status.ok()) return connection.Report(status, err);
    // Pin the exact version, so every case is judged by the same rules.
    get.set_version(rule_set.info().ref().version());
    report = cli::Validate(*corpus, rule_set.definition(), [&](const cds::v1::Patient& patient)
                                                               -> absl::StatusOr<cds::v1::EvaluateResponse> {
      cds::v1::EvaluateRequest request;
      request.set_rule_set(get.name());
      request.set_version(get.version());
      *request.mutable_patient() = patient;
      grpc::ClientContext call;
      connection.Prepare(&call);
      cds::v1::EvaluateResponse response;
      const grpc::Status s = stub->Evaluate(&call, request, &response);
      if (!s.ok()) {
        return absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
      }
      return response;
    });
  }
  report.set_corpus(options.corpus);
  if (options.json) return PrintJson(report, out, err);
  out << FormatReport(report);
  return kOk;
}

}  // namespace

int Run(const std::vector<std::string>& args, std::ostream& out, std::ostream& err) {
  absl::StatusOr<Options> options = ParseArgs(args);
  if (!options.ok()) {
    err << "cdsctl: " << options.status().message() << "\n(see cdsctl --help)\n";
    return kUsage;
  }
  if (options->help || (!options->positional.empty() && options->positional[0] == "help")) {
    out << kHelp;
    return kOk;
  }
  if (options->positional.empty()) {
    err << kHelp;
    return kUsage;
  }
  const std::string& command = options->positional[0];
  if (command == "evaluate") return Evaluate(*options, out, err);
  if (command == "rulesets") return RuleSets(*options, out, err);
  if (command == "screen") return ScreenCommand(*options, out, err);
  if (command == "health") return Health(*options, out, err);
  if (command == "audit") return Audit(*options, out, err);
  if (command == "rules") return Rules(*options, out, err);
  if (command == "validate") return Validate(*options, out, err);
  err << "cdsctl: unknown command '" << command << "' (see cdsctl --help)\n";
  return kUsage;
}

}  // namespace cds::cli
