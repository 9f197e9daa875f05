#pragma once

// The no-op baseline for load tests (`cds-server --noop_baseline`): cds.v1.DecisionSupport
// with the same proto, whose Evaluate evaluates only the first successful call and answers
// every later call with the serialized bytes of that response, whatever the request. Like
// the real service's Evaluate it takes and sends raw bytes, parsing each request into an
// arena; its response costs no rendering, only gRPC's sending of a shared slice. So a load
// generator sending one patient gets responses of exactly the real size at the cost of
// gRPC and request parsing alone, and the real server's figures can be given as ratios
// against it (bench/load_generator.cc). Never for clinical use. Thread-safe; borrows the
// store, which must outlive it.

#include <optional>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "cds/v1/service.grpc.pb.h"
#include "cds/v1/service.pb.h"
#include "grpcpp/support/slice.h"
#include "server/service/decision_service.h"
#include "server/store/rule_store.h"

namespace cds::service {

class NoopDecisionService final : public RawEvaluateDecisionSupport {
 public:
  explicit NoopDecisionService(const store::RuleStore& store) : store_(store) {}

  grpc::ServerUnaryReactor* Evaluate(grpc::CallbackServerContext* context,
                                     const grpc::ByteBuffer* request,
                                     grpc::ByteBuffer* response) override
      ABSL_LOCKS_EXCLUDED(mu_);

 private:
  const store::RuleStore& store_;
  absl::Mutex mu_;
  // The first successful response, serialized; unset until then.
  std::optional<grpc::Slice> canned_ ABSL_GUARDED_BY(mu_);
};

}  // namespace cds::service
