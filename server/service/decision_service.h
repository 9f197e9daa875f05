#pragma once

// The cds.v1.DecisionSupport and cds.v1.RuleSetAdmin gRPC services, on the callback API. Each RPC is a thin
// adapter: validate, resolve the rule-set version in the store, call the engine, convert
// the status once (grpc_status.h). Thread-safe; borrows the store, which must outlive it.

#include <cstddef>
#include <deque>
#include <functional>
#include <string>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "cds/v1/service.grpc.pb.h"
#include "cds/v1/service.pb.h"
#include "google/protobuf/arena.h"
#include "google/protobuf/message_lite.h"
#include "server/engine/evaluation.h"
#include "server/service/auditor.h"
#include "server/store/rule_store.h"

namespace cds::service {

// cds.v1.DecisionSupport on the callback API, with Evaluate and EvaluateStream on raw bytes:
// their handlers parse the requests themselves and answer with the engine's wire rendering
// of the responses (engine::Evaluation::WriteWire), so no EvaluateResponse message is built
// or serialized.
using RawEvaluateDecisionSupport = cds::v1::DecisionSupport::WithRawCallbackMethod_Evaluate<
    cds::v1::DecisionSupport::WithRawCallbackMethod_EvaluateStream<
        cds::v1::DecisionSupport::WithCallbackMethod_ListRuleSets<
            cds::v1::DecisionSupport::WithCallbackMethod_GetRuleSet<
                cds::v1::DecisionSupport::Service>>>>;

class DecisionServiceImpl final : public RawEvaluateDecisionSupport {
 public:
  explicit DecisionServiceImpl(const store::RuleStore& store) : store_(store) {}
  // Every call is audited (and fails closed) when set; the auditor must outlive this.
  void set_auditor(const Auditor* auditor) { auditor_ = auditor; }

  // `request` is a serialized cds.v1.EvaluateRequest; `response` gets a serialized
  // cds.v1.EvaluateResponse, exactly the bytes protobuf would write for the response
  // EvaluateOnce builds. Statuses and audit records as with a protobuf handler; bytes that
  // do not parse are refused as gRPC refuses them for a generated handler (UNIMPLEMENTED,
  // unaudited).
  grpc::ServerUnaryReactor* Evaluate(grpc::CallbackServerContext* context,
                                     const grpc::ByteBuffer* request,
                                     grpc::ByteBuffer* response) override;
  grpc::ServerUnaryReactor* ListRuleSets(grpc::CallbackServerContext* context,
                                         const cds::v1::ListRuleSetsRequest* request,
                                         cds::v1::ListRuleSetsResponse* response) override;
  grpc::ServerUnaryReactor* GetRuleSet(grpc::CallbackServerContext* context,
                                       const cds::v1::GetRuleSetRequest* request,
                                       cds::v1::GetRuleSetResponse* response) override;
  // Screening: see evaluate_stream.cc. Reads serialized cds.v1.StreamEvaluateRequest and
  // writes serialized cds.v1.StreamEvaluateResponse, byte for byte what protobuf would
  // write for the responses EvaluateOnce's evaluation gives.
  grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* EvaluateStream(
      grpc::CallbackServerContext* context) override;

 private:
  const store::RuleStore& store_;
  const Auditor* auditor_ = nullptr;
};

// cds.v1.RuleSetAdmin: publish bundles, move labels, retire versions. Thread-safe; borrows
// the store, which must outlive it. Who may call them is the access policy's business
// (server/security/authz.h: the author and admin roles); bundles must be signed in any case.
//
// The calls run one at a time on a thread of their own, never on gRPC's callback threads:
// a publish verifies, compiles, runs the embedded cases and fsyncs (50-300 ms), a label
// move fsyncs, and a callback thread blocked that long stalls the evaluations it would
// serve (the callback API's handlers must not block). The store serializes writers anyway.
class RuleSetAdminImpl final : public cds::v1::RuleSetAdmin::CallbackService {
 public:
  explicit RuleSetAdminImpl(store::RuleStore& store);
  // Finishes the calls already queued, then stops the thread. REQUIRES: the server stopped
  // taking calls.
  ~RuleSetAdminImpl() override;
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
  // Runs `task` on the admin thread after the tasks queued before it.
  void Post(std::function<void()> task) ABSL_LOCKS_EXCLUDED(mu_);
  void WorkLoop() ABSL_LOCKS_EXCLUDED(mu_);
  bool HasWorkOrStopping() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return stopping_ || !queue_.empty();
  }

  store::RuleStore& store_;
  const Auditor* auditor_ = nullptr;

  absl::Mutex mu_;
  std::deque<std::function<void()>> queue_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::thread worker_;  // last: started once the rest is set up
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

// The same up to rendering: validates the request, resolves its rule-set version and
// evaluates it into `evaluation`. The result holds the rule set, which must be kept while
// `evaluation` is used; the service's fields are for the caller to add (see EvaluateOnce).
absl::StatusOr<store::Resolved> EvaluateInto(const store::RuleStore& store,
                                             const cds::v1::EvaluateRequest& request,
                                             engine::Evaluation* evaluation);

// The service's fields of a successful evaluation's response, for the wire renderer: a new
// evaluation id (kept in `*evaluation_id`, which the extras view), the resolved version's
// label and the time now.
engine::WireExtras ResponseExtras(const store::Resolved& resolved, std::string* evaluation_id);

// What the audit record keeps of `evaluation`'s response (views into its rule set and
// `evaluation_id`, which must outlive the summary).
Auditor::EvaluationSummary SummarizeEvaluation(const engine::Evaluation& evaluation,
                                               absl::string_view evaluation_id);

// Parses a serialized request as gRPC's generated handlers do (arena-allocated by the
// caller); INVALID_ARGUMENT naming the expected message type when the bytes do not parse
// (where the generated handlers would answer UNIMPLEMENTED with no message).
grpc::Status ParseRequest(const grpc::ByteBuffer& bytes, google::protobuf::MessageLite* request);

// A request of type `Request` on an arena whose first block is part of this object, for a
// handler to keep on its stack: parsing a typical request then allocates nothing else but
// long strings. The request and the arena live as long as this. Not thread-safe.
template <typename Request>
class StackArenaRequest {
 public:
  StackArenaRequest()
      : arena_(FirstBlockOptions(first_block_)),
        request_(google::protobuf::Arena::CreateMessage<Request>(&arena_)) {}
  StackArenaRequest(const StackArenaRequest&) = delete;
  StackArenaRequest& operator=(const StackArenaRequest&) = delete;

  // Parses `bytes` into the request, as ParseRequest does.
  grpc::Status Parse(const grpc::ByteBuffer& bytes) { return ParseRequest(bytes, request_); }

  Request& request() { return *request_; }
  // For other messages that should live (and be freed) with the request.
  google::protobuf::Arena& arena() { return arena_; }

  // The typical patient (bench/typical_patient.textproto: 30 findings, 5 labs, 3
  // relatives; 1 KB on the wire) takes about 10 KB of arena with its strings and their
  // cleanup entries: 8 KB overflowed into one more (heap) block on every call.
  static constexpr size_t kFirstBlockSize = 16384;

 private:
  static google::protobuf::ArenaOptions FirstBlockOptions(char* first_block) {
    google::protobuf::ArenaOptions options;
    options.initial_block = first_block;
    options.initial_block_size = kFirstBlockSize;
    return options;
  }

  alignas(std::max_align_t) char first_block_[kFirstBlockSize];  // before arena_, which uses it
  google::protobuf::Arena arena_;
  Request* const request_;  // on arena_
};

// A slice of `size` bytes for the caller to fill, sent without a copy.
grpc::Slice NewSlice(size_t size, char** data);

// Finishes the call with `status` once its audit record is committed (UNAVAILABLE instead
// when it cannot be), or at once when `auditor` is null. Never blocks.
grpc::ServerUnaryReactor* FinishAudited(const Auditor* auditor,
                                        grpc::CallbackServerContext* context, const char* method,
                                        absl::Time start, std::string rule_set,
                                        grpc::Status status);

// A random (version 4) UUID in its canonical 8-4-4-4-12 hex form.
std::string NewUuidV4();

}  // namespace cds::service
