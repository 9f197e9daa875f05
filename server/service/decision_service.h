#pragma once

// The cds.v1.DecisionSupport and cds.v1.RuleSetAdmin gRPC services, on the callback API. Each RPC is a thin
// adapter: validate, resolve the rule-set version in the store, call the engine, convert
// the status once (grpc_status.h). Thread-safe; borrows the store, which must outlive it.

#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "cds/v1/service.grpc.pb.h"
#include "cds/v1/service.pb.h"
#include "server/service/arena_allocator.h"
#include "server/service/auditor.h"
#include "server/store/rule_store.h"

namespace cds::service {

class DecisionServiceImpl final : public cds::v1::DecisionSupport::CallbackService {
 public:
  explicit DecisionServiceImpl(const store::RuleStore& store) : store_(store) {
    SetMessageAllocatorFor_Evaluate(&evaluate_allocator_);
  }
  // Every call is audited (and fails closed) when set; the auditor must outlive this.
  void set_auditor(const Auditor* auditor) { auditor_ = auditor; }

  grpc::ServerUnaryReactor* Evaluate(grpc::CallbackServerContext* context,
                                     const cds::v1::EvaluateRequest* request,
                                     cds::v1::EvaluateResponse* response) override;
  grpc::ServerUnaryReactor* ListRuleSets(grpc::CallbackServerContext* context,
                                         const cds::v1::ListRuleSetsRequest* request,
                                         cds::v1::ListRuleSetsResponse* response) override;
  grpc::ServerUnaryReactor* GetRuleSet(grpc::CallbackServerContext* context,
                                       const cds::v1::GetRuleSetRequest* request,
                                       cds::v1::GetRuleSetResponse* response) override;
  // Screening: see evaluate_stream.cc.
  grpc::ServerBidiReactor<cds::v1::StreamEvaluateRequest, cds::v1::StreamEvaluateResponse>*
  EvaluateStream(grpc::CallbackServerContext* context) override;

 private:
  const store::RuleStore& store_;
  const Auditor* auditor_ = nullptr;
  ArenaMessageAllocator<cds::v1::EvaluateRequest, cds::v1::EvaluateResponse> evaluate_allocator_;
};

// cds.v1.RuleSetAdmin: publish bundles, move labels, retire versions. Thread-safe; borrows
// the store, which must outlive it. Who may call them is the access policy's business
// (server/security/authz.h: the author and admin roles); bundles must be signed in any case.
class RuleSetAdminImpl final : public cds::v1::RuleSetAdmin::CallbackService {
 public:
  explicit RuleSetAdminImpl(store::RuleStore& store) : store_(store) {}
  // Every call is audited (and fails closed) when set; the auditor must outlive this.
  void set_auditor(const Auditor* auditor) { auditor_ = auditor; }

  grpc::ServerUnaryReactor* PublishRuleSet(grpc::CallbackServerContext* context,
                                           const cds::v1::PublishRuleSetRequest* request,
                                           cds::v1::PublishRuleSetResponse* response) override;
  grpc::ServerUnaryReactor* SetLabel(grpc::CallbackServerContext* context,
                                     const cds::v1::SetLabelRequest* request,
                                     cds::v1::SetLabelResponse* response) override;
  grpc::ServerUnaryReactor* RetireRuleSet(grpc::CallbackServerContext* context,
                                          const cds::v1::RetireRuleSetRequest* request,
                                          cds::v1::RetireRuleSetResponse* response) override;

 private:
  store::RuleStore& store_;
  const Auditor* auditor_ = nullptr;
};

// Which version a request asks for: `rule_set` may carry "name@version" or "name@label"
// (then `version` and `label` must be empty); `version` and `label` are exclusive.
struct Pin {
  std::string name;
  std::string version;
  std::string label;
};
absl::StatusOr<Pin> ParsePin(const cds::v1::EvaluateRequest& request);

// The body of Evaluate without gRPC, for reuse and tests. Fills `response` on success.
absl::Status EvaluateOnce(const store::RuleStore& store, const cds::v1::EvaluateRequest& request,
                          cds::v1::EvaluateResponse* response);

// Finishes the call with `status` once its audit record is committed (UNAVAILABLE instead
// when it cannot be), or at once when `auditor` is null. Never blocks.
grpc::ServerUnaryReactor* FinishAudited(const Auditor* auditor,
                                        grpc::CallbackServerContext* context, const char* method,
                                        absl::Time start, std::string rule_set,
                                        grpc::Status status);

// A random (version 4) UUID in its canonical 8-4-4-4-12 hex form.
std::string NewUuidV4();

}  // namespace cds::service
