#pragma once

// The no-op baseline for load tests (`cds-server --noop_baseline`): cds.v1.DecisionSupport
// with the same proto, whose Evaluate evaluates only the first successful call and answers
// every later call with a copy of that response, whatever the request. So a load generator
// sending one patient gets responses of exactly the real size at the cost of gRPC, protobuf
// and a message copy alone, and the real server's figures can be given as ratios against it
// (bench/load_generator.cc). Never for clinical use. Thread-safe; borrows the store, which
// must outlive it.

#include <memory>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "cds/v1/service.grpc.pb.h"
#include "cds/v1/service.pb.h"
#include "server/service/arena_allocator.h"
#include "server/store/rule_store.h"

namespace cds::service {

class NoopDecisionService final : public cds::v1::DecisionSupport::CallbackService {
 public:
  // Same per-call arenas as DecisionServiceImpl, so that only the evaluation differs.
  explicit NoopDecisionService(const store::RuleStore& store) : store_(store) {
    SetMessageAllocatorFor_Evaluate(&evaluate_allocator_);
  }

  grpc::ServerUnaryReactor* Evaluate(grpc::CallbackServerContext* context,
                                     const cds::v1::EvaluateRequest* request,
                                     cds::v1::EvaluateResponse* response) override
      ABSL_LOCKS_EXCLUDED(mu_);

 private:
  const store::RuleStore& store_;
  ArenaMessageAllocator<cds::v1::EvaluateRequest, cds::v1::EvaluateResponse> evaluate_allocator_;
  absl::Mutex mu_;
  // The first successful response; null until then.
  std::shared_ptr<const cds::v1::EvaluateResponse> canned_ ABSL_GUARDED_BY(mu_);
};

}  // namespace cds::service
