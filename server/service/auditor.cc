#include "server/service/auditor.h"

#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "server/security/authz.h"

namespace cds::service {
namespace {

constexpr int kTopSuggestions = 3;

std::string CallerOf(const grpc::ServerContextBase& context) {
  const std::shared_ptr<const grpc::AuthContext> auth = context.auth_context();
  if (auth == nullptr) return "";
  for (const grpc::string_ref& value : auth->FindPropertyValues(security::kIdentityProperty)) {
    return std::string(value.data(), value.size());
  }
  return "";
}

}  // namespace

grpc::Status Auditor::Evaluated(const grpc::ServerContextBase& context, absl::Time start,
                                const cds::v1::EvaluateRequest& request,
                                const cds::v1::EvaluateResponse& response,
                                grpc::Status status, const char* method) const {
  audit::AuditRecord record;
  record.method = method;
  record.pseudonym = pseudonymizer_.Of(request.patient().reference());
  if (status.ok()) {
    record.rule_set = absl::StrCat(response.rule_set().name(), "@", response.rule_set().version());
    record.digest = response.rule_set().digest();
    record.evaluation_id = response.evaluation_id();
    for (int i = 0; i < response.suggestions_size() && i < kTopSuggestions; ++i) {
      absl::StrAppend(&record.top_suggestions, i > 0 ? "," : "", response.suggestions(i).rule_id());
    }
  } else {
    record.rule_set = request.rule_set();
  }
  return Commit(context, std::move(record), start, std::move(status));
}

grpc::Status Auditor::Call(const grpc::ServerContextBase& context, const char* method,
                           absl::Time start, std::string rule_set, grpc::Status status,
                           std::string pseudonym) const {
  audit::AuditRecord record;
  record.method = method;
  record.rule_set = std::move(rule_set);
  record.pseudonym = std::move(pseudonym);
  return Commit(context, std::move(record), start, std::move(status));
}

grpc::Status Auditor::Commit(const grpc::ServerContextBase& context, audit::AuditRecord record,
                             absl::Time start, grpc::Status status) const {
  record.time = start;
  record.caller = CallerOf(context);
  record.status_code = static_cast<int>(status.error_code());
  record.latency_us = absl::ToInt64Microseconds(absl::Now() - start);
  const absl::Status written = sink_.Record(std::move(record));
  if (!written.ok()) {
    return grpc::Status(grpc::StatusCode::UNAVAILABLE, std::string(written.message()));
  }
  return status;
}

}  // namespace cds::service
