#include "server/service/audit_service.h"

#include <string>
#include <utility>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "server/engine/patient_check.h"
#include "server/service/grpc_status.h"
#include "server/service/request_validation.h"

namespace cds::service {
namespace {

constexpr char kQueryAuditMethod[] = "/cds.v1.AuditService/QueryAudit";
constexpr size_t kPseudonymChars = 64;
constexpr size_t kMaxCallerChars = 256;

// google.protobuf.Timestamp's valid range: 0001-01-01 to 9999-12-31.
constexpr int64_t kMinTimestampSeconds = -62135596800;
constexpr int64_t kMaxTimestampSeconds = 253402300799;

bool ToTime(const google::protobuf::Timestamp& t, absl::Time* out) {
  if (t.seconds() < kMinTimestampSeconds || t.seconds() > kMaxTimestampSeconds ||
      t.nanos() < 0 || t.nanos() > 999999999) {
    return false;
  }
  *out = absl::FromUnixSeconds(t.seconds()) + absl::Nanoseconds(t.nanos());
  return true;
}

void SetTimestamp(absl::Time t, google::protobuf::Timestamp* out) {
  const int64_t micros = absl::ToUnixMicros(t);
  int64_t seconds = micros / 1000000;
  int64_t rest = micros % 1000000;
  if (rest < 0) {
    rest += 1000000;
    --seconds;
  }
  out->set_seconds(seconds);
  out->set_nanos(static_cast<int32_t>(rest * 1000));
}

bool IsLowerHex(const std::string& s) {
  for (char c : s) {
    if (!absl::ascii_isdigit(static_cast<unsigned char>(c)) && (c < 'a' || c > 'f')) return false;
  }
  return true;
}

// Rule-set names and versions: letters, digits, '.', '_' and '-', one optional '@'.
bool IsRuleSetFilter(const std::string& s) {
  int ats = 0;
  for (char c : s) {
    if (c == '@') {
      ++ats;
      continue;
    }
    if (!absl::ascii_isalnum(static_cast<unsigned char>(c)) && c != '.' && c != '_' && c != '-') {
      return false;
    }
  }
  return ats <= 1 && s.front() != '@' && s.back() != '@';
}

void ToEntry(const audit::AuditRecord& r, cds::v1::AuditEntry* out) {
  SetTimestamp(r.time, out->mutable_time());
  out->set_caller(r.caller);
  out->set_method(r.method);
  out->set_rule_set(r.rule_set);
  out->set_digest(r.digest);
  out->set_pseudonym(r.pseudonym);
  out->set_evaluation_id(r.evaluation_id);
  out->set_top_suggestions(r.top_suggestions);
  out->set_status_code(r.status_code);
  out->set_latency_us(r.latency_us);
}

}  // namespace

absl::StatusOr<audit::AuditQuery> ToAuditQuery(const cds::v1::QueryAuditRequest& request,
                                               const audit::Pseudonymizer& pseudonymizer) {
  engine::Violations out(kMaxViolations);
  audit::AuditQuery query;
  if (request.has_since() && !ToTime(request.since(), &query.since)) {
    out.Add("since", "is not a valid timestamp");
  }
  if (request.has_until() && !ToTime(request.until(), &query.until)) {
    out.Add("until", "is not a valid timestamp");
  }
  if (out.empty() && query.until < query.since) out.Add("until", "is before since");
  if (request.caller().size() > kMaxCallerChars) {
    out.Add("caller", absl::StrCat("is longer than ", kMaxCallerChars, " characters"));
  }
  query.caller = request.caller();
  if (!request.rule_set().empty()) {
    if (request.rule_set().size() > 2 * engine::kMaxNameChars + 1) {
      out.Add("rule_set",
              absl::StrCat("is longer than ", 2 * engine::kMaxNameChars + 1, " characters"));
    } else if (!IsRuleSetFilter(request.rule_set())) {
      out.Add("rule_set", "must be NAME or NAME@VERSION (letters, digits, '.', '_', '-')");
    }
    query.rule_set = request.rule_set();
  }
  switch (request.patient_case()) {
    case cds::v1::QueryAuditRequest::kPseudonym:
      if (request.pseudonym().size() != kPseudonymChars || !IsLowerHex(request.pseudonym())) {
        out.Add("pseudonym", "is not 64 lower-case hex digits (HMAC-SHA256)");
      }
      query.pseudonym = request.pseudonym();
      break;
    case cds::v1::QueryAuditRequest::kPatientReference:
      // Never echoed: the descriptions name the rule only.
      if (request.patient_reference().empty()) {
        out.Add("patient_reference", "is empty");
      } else if (request.patient_reference().size() > engine::kMaxReferenceChars) {
        out.Add("patient_reference",
                absl::StrCat("is longer than ", engine::kMaxReferenceChars, " characters"));
      } else {
        query.pseudonym = pseudonymizer.Of(request.patient_reference());
      }
      break;
    case cds::v1::QueryAuditRequest::PATIENT_NOT_SET:
      break;
  }
  if (request.page_size() < 0 || request.page_size() > kMaxAuditPageSize) {
    out.Add("page_size", absl::StrCat("must be 0 (default ", kDefaultAuditPageSize, ") to ",
                                      kMaxAuditPageSize));
  }
  const int page_size = request.page_size() > 0 ? request.page_size() : kDefaultAuditPageSize;
  query.limit = page_size + 1;
  if (!request.page_token().empty() &&
      (!absl::SimpleAtoi(request.page_token(), &query.after_id) || query.after_id <= 0)) {
    out.Add("page_token", "is not a next_page_token of this server");
  }
  if (!out.empty()) return InvalidArgument(out.kept(), out.total());
  return query;
}

grpc::ServerUnaryReactor* AuditServiceImpl::QueryAudit(grpc::CallbackServerContext* context,
                                                       const cds::v1::QueryAuditRequest* request,
                                                       cds::v1::QueryAuditResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  if (auditor_ == nullptr) {
    reactor->Finish(grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                                 "this server keeps no audit trail (start it with --audit_db)"));
    return reactor;
  }
  const absl::Time start = absl::Now();
  absl::StatusOr<audit::AuditQuery> query = ToAuditQuery(*request, auditor_->pseudonymizer());
  absl::Status status = query.status();
  std::string pseudonym;
  std::string rule_set;
  if (query.ok()) {
    pseudonym = query->pseudonym;
    rule_set = query->rule_set;
    absl::StatusOr<std::vector<audit::AuditRecord>> records = auditor_->sink().Query(*query);
    status = records.status();
    if (records.ok()) {
      const size_t page_size = static_cast<size_t>(query->limit - 1);
      const bool more = records->size() > page_size;
      if (more) records->resize(page_size);
      for (const audit::AuditRecord& r : *records) ToEntry(r, response->add_entries());
      if (more && !records->empty()) {
        response->set_next_page_token(absl::StrCat(records->back().id));
      }
    }
  }
  // The record of the query names the patient asked about by pseudonym only.
  auditor_->CallAsync(*context, kQueryAuditMethod, start, std::move(rule_set),
                      ToGrpcStatus(status), std::move(pseudonym),
                      [reactor](grpc::Status audited) { reactor->Finish(audited); });
  return reactor;
}

}  // namespace cds::service
