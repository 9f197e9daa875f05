#pragma once

// The service's metrics: every gRPC call by method and status (count and latency, taken
// by a server interceptor so that no handler has to remember), evaluations by rule-set
// version and top diagnosis, calls the access policy denied, and gauges read at scrape
// time (rule-set versions by state, audit queue depth, process memory and descriptors).
// Labels carry method names, status codes, rule-set ids and rule ids only: never patient
// data. Thread-safe; borrows the registry, which must outlive it.

#include <functional>
#include <memory>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/synchronization/mutex.h"
#include "grpcpp/support/byte_buffer.h"
#include "grpcpp/support/server_interceptor.h"
#include "grpcpp/support/status.h"
#include "server/metrics/registry.h"
#include "server/store/rule_store.h"

namespace cds::metrics {

class ServerMetrics {
 public:
  explicit ServerMetrics(Registry& registry);
  ~ServerMetrics();  // out of line: MethodSeries is complete only in the .cc

  // For ServerBuilder::experimental().SetInterceptorCreators; the factory borrows this.
  std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface> NewInterceptorFactory();

  // A call the authorization layer refused before any handler ran.
  void CallDenied(const std::string& method, grpc::StatusCode code);

  // Called by the interceptor; public for tests.
  void CallFinished(const std::string& method, grpc::StatusCode code, double seconds);
  // Evaluate's response as sent: serialized bytes (its handler sends raw bytes).
  void EvaluateResponseSent(grpc::ByteBuffer* serialized);
  // One EvaluateStream response as sent (a serialized StreamEvaluateResponse): counted as
  // an evaluation when it carries one.
  void StreamEvaluateResponseSent(grpc::ByteBuffer* serialized);

  // One method's series, resolved once: its labels and, per status code, its counters and
  // histogram (each created on first use). A call then costs a few atomic updates instead
  // of splitting the method name, a descriptor-pool lookup and label-vector map lookups
  // under the families' mutexes.
  struct MethodSeries;
  // The entry for `method`. For a method this server defines, the cached one: this owns it
  // and it lives as long as this (`*uncached` is left alone). A method it does not define
  // gets a fresh "unknown" entry each time (callers cannot grow the cache), owned by
  // `*uncached`, which the caller keeps as long as it uses the result. REQUIRES: `uncached`
  // is not null.
  MethodSeries* SeriesFor(const std::string& method, std::shared_ptr<MethodSeries>* uncached)
      ABSL_LOCKS_EXCLUDED(mu_);
  void CallFinished(MethodSeries& series, grpc::StatusCode code, double seconds);

 private:
  Family<Counter>& handled_;
  Family<Histogram>& handling_seconds_;
  Family<Counter>& denied_;
  Family<Counter>& evaluations_;
  absl::Mutex mu_;
  // Never erased: the entries' addresses are handed out for the life of this.
  absl::flat_hash_map<std::string, std::unique_ptr<MethodSeries>> by_method_ ABSL_GUARDED_BY(mu_);
};

// A gauge of the store's versions by rule set and state (AVAILABLE, REJECTED, RETIRED,
// ...): loaded and rejected versions, whether from the rules directory or published.
// Borrows the store, which must outlive the registry's scrapes.
void AddRuleStoreGauges(const store::RuleStore& store, Registry& registry);

// Gauges of this process: resident memory, open file descriptors, start time (from /proc).
void AddProcessGauges(Registry& registry);

// "/pkg.Service/Method" as a label pair, or {"unknown", "unknown"} for a method this
// server does not define (so callers cannot grow the label space).
struct MethodLabels {
  std::string service;
  std::string method;
};
MethodLabels LabelsForMethod(const std::string& full_method);

}  // namespace cds::metrics
