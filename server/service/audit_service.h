#pragma once

// cds.v1.AuditService: the audit trail read through the server (issue 6, part 3), for the
// admin role only (server/security/authz.cc). Reads go through audit::AuditSink::Query,
// never raw SQL here. A query may name the patient by its raw reference: the server
// computes the pseudonym with its own key (clients never hold it); the reference is never
// stored, logged or echoed, and the record of the query keeps only the pseudonym. Every
// query is itself audited and fails closed like any other call. Thread-safe; borrows the
// auditor, which must outlive it.

#include "absl/status/statusor.h"
#include "cds/v1/audit.grpc.pb.h"
#include "cds/v1/audit.pb.h"
#include "server/audit/audit_log.h"
#include "server/service/auditor.h"

namespace cds::service {

inline constexpr int kDefaultAuditPageSize = 100;
inline constexpr int kMaxAuditPageSize = 1000;

class AuditServiceImpl final : public cds::v1::AuditService::CallbackService {
 public:
  // A null `auditor` (no --audit_db): every query is FAILED_PRECONDITION.
  explicit AuditServiceImpl(const Auditor* auditor) : auditor_(auditor) {}

  grpc::ServerUnaryReactor* QueryAudit(grpc::CallbackServerContext* context,
                                       const cds::v1::QueryAuditRequest* request,
                                       cds::v1::QueryAuditResponse* response) override;

 private:
  const Auditor* const auditor_;
};

// The store query a request asks for (the page size plus one, to see whether another page
// follows), or INVALID_ARGUMENT with a BadRequest field violation per problem. The
// pseudonym of a patient_reference is computed with `pseudonymizer`.
absl::StatusOr<audit::AuditQuery> ToAuditQuery(const cds::v1::QueryAuditRequest& request,
                                               const audit::Pseudonymizer& pseudonymizer);

}  // namespace cds::service
