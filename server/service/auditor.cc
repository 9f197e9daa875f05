#include "server/service/auditor.h"

#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "server/security/authz.h"

namespace cds::service {
namespace {

std::string CallerOf(const grpc::ServerContextBase& context) {
  const std::shared_ptr<const grpc::AuthContext> auth = context.auth_context();
  if (auth == nullptr) return "";
  for (const grpc::string_ref& value : auth->FindPropertyValues(security::kIdentityProperty)) {
    return std::string(value.data(), value.size());
  }
  return "";
}

}  // namespace

Auditor::EvaluationSummary Auditor::Summarize(const cds::v1::EvaluateResponse& response) {
  EvaluationSummary summary;
  summary.rule_set_name = response.rule_set().name();
  summary.rule_set_version = response.rule_set().version();
  summary.digest = response.rule_set().digest();
  summary.evaluation_id = response.evaluation_id();
  for (int i = 0; i < response.suggestions_size() && i < kTopSuggestions; ++i) {
    summary.top_suggestions[i] = response.suggestions(i).rule_id();
    summary.top_suggestion_count = i + 1;
  }
  return summary;
}

audit::AuditRecord Auditor::EvaluationRecord(const cds::v1::EvaluateRequest& request,
                                             const cds::v1::EvaluateResponse& response,
                                             const grpc::Status& status,
                                             const char* method) const {
  return EvaluationRecord(request, Summarize(response), status, method);
}

audit::AuditRecord Auditor::EvaluationRecord(const cds::v1::EvaluateRequest& request,
                                             const EvaluationSummary& response,
                                             const grpc::Status& status,
                                             const char* method) const {
  audit::AuditRecord record;
  record.method = method;
  record.pseudonym = pseudonymizer_.Of(request.patient().reference());
  if (status.ok()) {
    absl::StrAppend(&record.rule_set, response.rule_set_name, "@", response.rule_set_version);
    record.digest = std::string(response.digest);
    record.evaluation_id = std::string(response.evaluation_id);
    // Joined in one allocation (appending grew the string once or twice per call).
    record.top_suggestions = absl::StrJoin(
        response.top_suggestions.begin(),
        response.top_suggestions.begin() + response.top_suggestion_count, ",");
  } else {
    record.rule_set = request.rule_set();
  }
  return record;
}

void Auditor::EvaluatedAsync(const grpc::ServerContextBase& context, absl::Time start,
                             const cds::v1::EvaluateRequest& request,
                             const cds::v1::EvaluateResponse& response, grpc::Status status,
                             const char* method, Finish finish) const {
  EvaluatedAsync(context, start, request, Summarize(response), std::move(status), method,
                 std::move(finish));
}

void Auditor::EvaluatedAsync(const grpc::ServerContextBase& context, absl::Time start,
                             const cds::v1::EvaluateRequest& request,
                             const EvaluationSummary& response, grpc::Status status,
                             const char* method, Finish finish) const {
  audit::AuditRecord record = EvaluationRecord(request, response, status, method);
  Commit(context, std::move(record), start, std::move(status), std::move(finish));
}

grpc::Status Auditor::Call(const grpc::ServerContextBase& context, const char* method,
                           absl::Time start, std::string rule_set, grpc::Status status,
                           std::string pseudonym) const {
  audit::AuditRecord record;
  record.method = method;
  record.rule_set = std::move(rule_set);
  record.pseudonym = std::move(pseudonym);
  return CommitAndWait(context, std::move(record), start, std::move(status));
}

void Auditor::CallAsync(const grpc::ServerContextBase& context, const char* method,
                        absl::Time start, std::string rule_set, grpc::Status status,
                        std::string pseudonym, Finish finish) const {
  audit::AuditRecord record;
  record.method = method;
  record.rule_set = std::move(rule_set);
  record.pseudonym = std::move(pseudonym);
  Commit(context, std::move(record), start, std::move(status), std::move(finish));
}

void Auditor::Commit(const grpc::ServerContextBase& context, audit::AuditRecord record,
                     absl::Time start, grpc::Status status, Finish finish) const {
  record.time = start;
  record.caller = CallerOf(context);
  record.status_code = static_cast<int>(status.error_code());
  record.latency_us = absl::ToInt64Microseconds(absl::Now() - start);
  audit::AuditSink::Done done = [status = std::move(status), finish = std::move(finish)](
                                   absl::Status written) mutable {
    if (!written.ok()) {
      status = grpc::Status(grpc::StatusCode::UNAVAILABLE, std::string(written.message()));
    }
    std::move(finish)(std::move(status));
  };
  sink_.RecordAsync(std::move(record), std::move(done));
}

grpc::Status Auditor::CommitAndWait(const grpc::ServerContextBase& context,
                                    audit::AuditRecord record, absl::Time start,
                                    grpc::Status status) const {
  absl::Notification answered;
  grpc::Status result;
  Commit(context, std::move(record), start, std::move(status),
         [&answered, &result](grpc::Status final_status) {
           result = std::move(final_status);
           answered.Notify();
         });
  answered.WaitForNotification();
  return result;
}

}  // namespace cds::service
