#pragma once

// Writes the audit record of a finished call (see server/audit/audit_log.h) and fails the
// call closed: when the record cannot be committed, the caller gets UNAVAILABLE instead
// of its answer. The *Async forms never block: `finish` gets the call's final status once
// the record is committed (on the audit store's thread), so unary handlers hand it
// reactor->Finish and return. Thread-safe; borrows the sink, which must outlive it.

#include <string>

#include "absl/functional/any_invocable.h"

#include "absl/time/time.h"
#include "cds/v1/service.pb.h"
#include "grpcpp/grpcpp.h"
#include "server/audit/audit_log.h"

namespace cds::service {

class Auditor {
 public:
  // Receives the call's final status: the handler's, or UNAVAILABLE when unaudited.
  using Finish = absl::AnyInvocable<void(grpc::Status) &&>;

  Auditor(audit::AuditSink& sink, audit::Pseudonymizer pseudonymizer)
      : sink_(sink), pseudonymizer_(std::move(pseudonymizer)) {}

  // An evaluation: rule set, digest, pseudonym, id and top suggestions, recorded under
  // `method` (a unary Evaluate, or one patient of an EvaluateStream).
  void EvaluatedAsync(const grpc::ServerContextBase& context, absl::Time start,
                      const cds::v1::EvaluateRequest& request,
                      const cds::v1::EvaluateResponse& response, grpc::Status status,
                      const char* method, Finish finish) const;

  static constexpr char kEvaluateMethod[] = "/cds.v1.DecisionSupport/Evaluate";
  static constexpr char kEvaluateStreamMethod[] = "/cds.v1.DecisionSupport/EvaluateStream";
  // Any other call (lifecycle, rule-set reads, audit queries, an empty stream) on
  // `rule_set` ("name@version", "name" or ""), about the patient of `pseudonym` if any.
  // Call blocks until the record is committed (for the rare callers that may block).
  grpc::Status Call(const grpc::ServerContextBase& context, const char* method,
                    absl::Time start, std::string rule_set, grpc::Status status,
                    std::string pseudonym = "") const;
  void CallAsync(const grpc::ServerContextBase& context, const char* method, absl::Time start,
                 std::string rule_set, grpc::Status status, std::string pseudonym,
                 Finish finish) const;

  audit::AuditSink& sink() const { return sink_; }
  const audit::Pseudonymizer& pseudonymizer() const { return pseudonymizer_; }

  // The two halves of EvaluatedAsync, for a caller that must build the record while it
  // holds its request (under a lock) and commit it after letting go.
  audit::AuditRecord EvaluationRecord(const cds::v1::EvaluateRequest& request,
                                      const cds::v1::EvaluateResponse& response,
                                      const grpc::Status& status, const char* method) const;
  void Commit(const grpc::ServerContextBase& context, audit::AuditRecord record,
              absl::Time start, grpc::Status status, Finish finish) const;

 private:
  grpc::Status CommitAndWait(const grpc::ServerContextBase& context, audit::AuditRecord record,
                             absl::Time start, grpc::Status status) const;

  audit::AuditSink& sink_;
  const audit::Pseudonymizer pseudonymizer_;
};

}  // namespace cds::service
