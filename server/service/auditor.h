#pragma once

// Writes the audit record of a finished call (see server/audit/audit_log.h) and fails the
// call closed: when the record cannot be committed, the caller gets UNAVAILABLE instead
// of its answer. The *Async forms never wait for another writer: `finish` gets the call's
// final status once the record is committed, usually on the calling thread before they
// return (the record written to the audit journal there), else on the thread that wrote it
// or the store's own; unary handlers hand it reactor->Finish and return. Thread-safe; borrows
// the sink, which must outlive it.

#include <array>
#include <string>

#include "absl/functional/any_invocable.h"
#include "absl/strings/string_view.h"

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

  // What the record of a successful evaluation keeps of its response: for a caller that
  // sends the response without building a cds.v1.EvaluateResponse (the wire renderer). The
  // views must stay valid until EvaluatedAsync / EvaluationRecord returns.
  static constexpr int kTopSuggestions = 3;
  struct EvaluationSummary {
    absl::string_view rule_set_name;
    absl::string_view rule_set_version;
    absl::string_view digest;
    absl::string_view evaluation_id;
    // Rule ids of the first suggestions, in rank order.
    std::array<absl::string_view, kTopSuggestions> top_suggestions;
    int top_suggestion_count = 0;
  };
  static EvaluationSummary Summarize(const cds::v1::EvaluateResponse& response);

  // An evaluation: rule set, digest, pseudonym, id and top suggestions, recorded under
  // `method` (a unary Evaluate, or one patient of an EvaluateStream).
  void EvaluatedAsync(const grpc::ServerContextBase& context, absl::Time start,
                      const cds::v1::EvaluateRequest& request,
                      const cds::v1::EvaluateResponse& response, grpc::Status status,
                      const char* method, Finish finish) const;
  void EvaluatedAsync(const grpc::ServerContextBase& context, absl::Time start,
                      const cds::v1::EvaluateRequest& request, const EvaluationSummary& response,
                      grpc::Status status, const char* method, Finish finish) const;

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
  audit::AuditRecord EvaluationRecord(const cds::v1::EvaluateRequest& request,
                                      const EvaluationSummary& response,
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
