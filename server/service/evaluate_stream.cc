// DecisionSupport.EvaluateStream: many patients on one bidirectional stream.
//
// Flow control: at most one read is outstanding, and reading pauses while kMaxQueued
// responses wait to be written, so a client that sends faster than it reads is held back
// by HTTP/2 flow control instead of growing the server's memory. Each request is evaluated
// on the callback thread that read it (as the unary Evaluate is), and responses are written
// one at a time in request order. A patient's error goes into its own response; the stream
// ends OK when the client half-closes and every response is written. With an auditor, each
// patient is audited like a unary Evaluate before its response is queued, and fails closed
// (its own UNAVAILABLE error) when the record cannot be committed.

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

// Responses evaluated but not yet written before the reactor stops reading.
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
    absl::MutexLock lock(&mu_);
    reading_ = false;
    if (!ok || failed_) {
      // Half-close (or a broken stream): answer what is queued, then finish.
      reads_done_ = true;
      MaybeFinishLocked();
      return;
    }
    cds::v1::StreamEvaluateResponse response;
    Evaluate(request_, next_index_++, &response);
    request_.Clear();
    queue_.push_back(std::move(response));
    MaybeWriteLocked();
    MaybeReadLocked();
  }

  void OnWriteDone(bool ok) override {
    absl::MutexLock lock(&mu_);
    writing_ = false;
    queue_.pop_front();
    if (!ok) {
      // The client went away: drop what is left.
      failed_ = true;
      queue_.clear();
    }
    MaybeWriteLocked();
    MaybeReadLocked();
    MaybeFinishLocked();
  }

  void OnDone() override { delete this; }

 private:
  // Evaluation happens under mu_, which only serialises this stream's own callbacks.
  void Evaluate(const cds::v1::StreamEvaluateRequest& request, int64_t index,
                cds::v1::StreamEvaluateResponse* response) {
    response->set_correlation_id(request.correlation_id());
    response->set_index(index);
    const absl::Time start = absl::Now();
    absl::Status status =
        request.has_request()
            ? EvaluateOnce(store_, request.request(), response->mutable_response())
            : absl::InvalidArgumentError("request is required");
    // Same code and capped message as the unary RPC would return.
    grpc::Status converted = ToGrpcStatus(status);
    if (auditor_ != nullptr) {
      converted = auditor_->Evaluated(context_, start, request.request(), response->response(),
                                      std::move(converted), Auditor::kEvaluateStreamMethod);
    }
    if (converted.ok()) return;
    response->mutable_error()->set_code(static_cast<int32_t>(converted.error_code()));
    response->mutable_error()->set_message(converted.error_message());
  }

  void MaybeWriteLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (writing_ || queue_.empty() || failed_) return;
    writing_ = true;
    // The front stays in the deque (whose elements do not move) until OnWriteDone.
    StartWrite(&queue_.front());
  }

  void MaybeReadLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (reading_ || reads_done_ || failed_ || queue_.size() >= kMaxQueued) return;
    reading_ = true;
    StartRead(&request_);
  }

  void MaybeFinishLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (finished_ || reading_ || writing_) return;
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
  std::deque<cds::v1::StreamEvaluateResponse> queue_ ABSL_GUARDED_BY(mu_);
  int64_t next_index_ ABSL_GUARDED_BY(mu_) = 0;
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
