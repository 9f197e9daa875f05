// DecisionSupport.EvaluateStream: many patients on one bidirectional stream.
//
// Flow control: at most one read is outstanding, and reading pauses while kMaxQueued
// responses wait to be written, so a client that sends faster than it reads is held back
// by HTTP/2 flow control instead of growing the server's memory. Each request is evaluated
// on the callback thread that read it (as the unary Evaluate is), and responses are written
// one at a time in request order. A patient's error goes into its own response; the stream
// ends OK when the client half-closes and every response is written. With an auditor, each
// patient is audited like a unary Evaluate: its response is written only once its record is
// committed (reading goes on meanwhile, so the next patients share the commit), and it fails
// closed (its own UNAVAILABLE error) when the record cannot be committed.

#include <cstdint>
#include <deque>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "server/service/decision_service.h"
#include "server/service/grpc_status.h"

namespace cds::service {
namespace {

// Patients read but not yet written (evaluated, or waiting for their audit record) before
// the reactor stops reading.
constexpr size_t kMaxQueued = 8;

class EvaluateStreamReactor final
    : public grpc::ServerBidiReactor<cds::v1::StreamEvaluateRequest,
                                     cds::v1::StreamEvaluateResponse> {
 public:
  EvaluateStreamReactor(const store::RuleStore& store, const grpc::CallbackServerContext& context,
                        const Auditor* auditor)
      : store_(store), context_(context), auditor_(auditor), start_(absl::Now()) {
    absl::MutexLock lock(&mu_);
    reading_ = true;
    StartRead(&request_);
  }

  void OnReadDone(bool ok) override {
    Slot* slot = nullptr;
    audit::AuditRecord record;
    absl::Time start;
    grpc::Status status;
    {
      absl::MutexLock lock(&mu_);
      reading_ = false;
      if (!ok || failed_) {
        // Half-close (or a broken stream): answer what is queued, then finish.
        reads_done_ = true;
        MaybeFinishLocked();
        return;
      }
      queue_.emplace_back();
      slot = &queue_.back();  // deque elements stay put until popped
      start = absl::Now();
      status = Evaluate(request_, next_index_++, &slot->response);
      if (auditor_ == nullptr) {
        Settle(slot, status);
        request_.Clear();
        MaybeWriteLocked();
        MaybeReadLocked();
        return;
      }
      record = auditor_->EvaluationRecord(request_.request(), slot->response.response(), status,
                                          Auditor::kEvaluateStreamMethod);
      request_.Clear();
      ++audits_pending_;
      // Reading on while the record commits lets the next patients share its commit.
      MaybeReadLocked();
    }
    // Outside mu_: the outcome may be delivered on this thread, at once.
    auditor_->Commit(context_, std::move(record), start, std::move(status),
                     [this, slot](grpc::Status audited) {
                       absl::MutexLock lock(&mu_);
                       Settle(slot, audited);
                       --audits_pending_;
                       MaybeWriteLocked();
                       MaybeReadLocked();
                       MaybeFinishLocked();
                     });
  }

  void OnWriteDone(bool ok) override {
    absl::MutexLock lock(&mu_);
    writing_ = false;
    queue_.pop_front();
    // The client went away: nothing more is written (slots still waiting for their audit
    // record stay until it is answered, then go with the reactor).
    if (!ok) failed_ = true;
    MaybeWriteLocked();
    MaybeReadLocked();
    MaybeFinishLocked();
  }

  void OnDone() override { delete this; }

 private:
  struct Slot {
    cds::v1::StreamEvaluateResponse response;
    bool ready = false;  // its status is final (audited when there is an auditor)
  };

  // Evaluates one patient into `response`; returns its status, converted as the unary RPC
  // would (same code, capped message). Under mu_, which only serialises this stream's own
  // callbacks.
  grpc::Status Evaluate(const cds::v1::StreamEvaluateRequest& request, int64_t index,
                        cds::v1::StreamEvaluateResponse* response) {
    response->set_correlation_id(request.correlation_id());
    response->set_index(index);
    const absl::Status status =
        request.has_request()
            ? EvaluateOnce(store_, request.request(), response->mutable_response())
            : absl::InvalidArgumentError("request is required");
    return ToGrpcStatus(status);
  }

  // The patient's final status: its error replaces the response when not OK.
  static void Settle(Slot* slot, const grpc::Status& status) {
    slot->ready = true;
    if (status.ok()) return;
    slot->response.clear_response();
    slot->response.mutable_error()->set_code(static_cast<int32_t>(status.error_code()));
    slot->response.mutable_error()->set_message(status.error_message());
  }

  void MaybeWriteLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (writing_ || queue_.empty() || !queue_.front().ready || failed_) return;
    writing_ = true;
    // The front stays in the deque (whose elements do not move) until OnWriteDone.
    StartWrite(&queue_.front().response);
  }

  void MaybeReadLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (reading_ || reads_done_ || failed_ || queue_.size() >= kMaxQueued) return;
    reading_ = true;
    StartRead(&request_);
  }

  void MaybeFinishLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    // Never while an audit callback may still come: it refers to this reactor.
    if (finished_ || reading_ || writing_ || audits_pending_ > 0) return;
    if (failed_) {
      finished_ = true;
      FinishAudited(grpc::Status(grpc::StatusCode::CANCELLED, "stream write failed"));
    } else if (reads_done_ && queue_.empty()) {
      finished_ = true;
      FinishAudited(grpc::Status::OK);
    }
  }

  // Each patient has its own record; a stream that carried none gets one record of its own,
  // so that every call leaves a trace.
  void FinishAudited(grpc::Status status) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (auditor_ != nullptr && next_index_ == 0) {
      status = auditor_->Call(context_, Auditor::kEvaluateStreamMethod, start_, "",
                              std::move(status));
    }
    Finish(status);
  }

  const store::RuleStore& store_;
  const grpc::CallbackServerContext& context_;
  const Auditor* const auditor_;  // null: not audited
  const absl::Time start_;
  absl::Mutex mu_;
  cds::v1::StreamEvaluateRequest request_ ABSL_GUARDED_BY(mu_);
  std::deque<Slot> queue_ ABSL_GUARDED_BY(mu_);
  int64_t next_index_ ABSL_GUARDED_BY(mu_) = 0;
  int audits_pending_ ABSL_GUARDED_BY(mu_) = 0;
  bool reading_ ABSL_GUARDED_BY(mu_) = false;
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool reads_done_ ABSL_GUARDED_BY(mu_) = false;
  bool failed_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace

grpc::ServerBidiReactor<cds::v1::StreamEvaluateRequest, cds::v1::StreamEvaluateResponse>*
DecisionServiceImpl::EvaluateStream(grpc::CallbackServerContext* context) {
  return new EvaluateStreamReactor(store_, *context, auditor_);
}

}  // namespace cds::service
