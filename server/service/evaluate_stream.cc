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
#include <array>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "google/protobuf/arena.h"
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
    StartRead(NewRequestLocked());
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
      slot = PushSlotLocked();
      start = absl::Now();
      status = Evaluate(*request_, next_index_++, slot->response);
      if (auditor_ == nullptr) {
        Settle(slot, status);
        MaybeWriteLocked();
        MaybeReadLocked();
        return;
      }
      record = auditor_->EvaluationRecord(request_->request(), slot->response->response(), status,
                                          Auditor::kEvaluateStreamMethod);
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
    head_ = (head_ + 1) % kMaxQueued;
    --queued_;
    // The client went away: nothing more is written (slots still waiting for their audit
    // record stay until it is answered, then go with the reactor).
    if (!ok) failed_ = true;
    MaybeWriteLocked();
    MaybeReadLocked();
    MaybeFinishLocked();
  }

  void OnDone() override { delete this; }

 private:
  // A patient's response, built on an arena of the slot's own that is reset when the slot
  // is reused: the response's hundreds of small fields then cost no malloc or free once the
  // block has been allocated (on the heap, making and freeing them was a third of a
  // stream's CPU; clearing a oneof deletes its message, so reusing a heap message does not
  // help).
  struct Slot {
    static google::protobuf::ArenaOptions Options() {
      google::protobuf::ArenaOptions options;
      options.start_block_size = 32 * 1024;
      options.max_block_size = 32 * 1024;
      return options;
    }
    google::protobuf::Arena arena{Options()};
    cds::v1::StreamEvaluateResponse* response = nullptr;
    bool ready = false;  // its status is final (audited when there is an auditor)
  };

  // An empty request to read into, replacing the last one (already evaluated).
  cds::v1::StreamEvaluateRequest* NewRequestLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    request_ = nullptr;
    read_arena_.Reset();
    request_ = google::protobuf::Arena::CreateMessage<cds::v1::StreamEvaluateRequest>(&read_arena_);
    return request_;
  }

  // The next free slot of the ring, with a new empty response. REQUIRES: queued_ <
  // kMaxQueued (MaybeReadLocked reads no further).
  Slot* PushSlotLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    Slot* slot = &ring_[(head_ + queued_) % kMaxQueued];
    ++queued_;
    slot->response = nullptr;
    slot->arena.Reset();
    slot->response =
        google::protobuf::Arena::CreateMessage<cds::v1::StreamEvaluateResponse>(&slot->arena);
    slot->ready = false;
    return slot;
  }

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
    slot->response->clear_response();
    slot->response->mutable_error()->set_code(static_cast<int32_t>(status.error_code()));
    slot->response->mutable_error()->set_message(status.error_message());
  }

  void MaybeWriteLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (writing_ || queued_ == 0 || !ring_[head_].ready || failed_) return;
    writing_ = true;
    // The front slot is not reused until OnWriteDone. (No buffer_hint to coalesce writes:
    // a hinted write may not complete until a later write flushes it, and the next write
    // only starts once this one has completed: the stream then stalled.)
    StartWrite(ring_[head_].response);
  }

  void MaybeReadLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (reading_ || reads_done_ || failed_ || queued_ >= kMaxQueued) return;
    reading_ = true;
    StartRead(NewRequestLocked());
  }

  void MaybeFinishLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    // Never while an audit callback may still come: it refers to this reactor.
    if (finished_ || reading_ || writing_ || audits_pending_ > 0) return;
    if (failed_) {
      finished_ = true;
      FinishAudited(grpc::Status(grpc::StatusCode::CANCELLED, "stream write failed"));
    } else if (reads_done_ && queued_ == 0) {
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
  // The request being read, on an arena reset for each read (as the responses are, and
  // for the same reason); at most one read is outstanding.
  google::protobuf::Arena read_arena_ ABSL_GUARDED_BY(mu_){Slot::Options()};
  cds::v1::StreamEvaluateRequest* request_ ABSL_GUARDED_BY(mu_) = nullptr;
  // Patients read and not yet written, oldest at head_: a ring of kMaxQueued slots.
  std::array<Slot, kMaxQueued> ring_ ABSL_GUARDED_BY(mu_);
  size_t head_ ABSL_GUARDED_BY(mu_) = 0;
  size_t queued_ ABSL_GUARDED_BY(mu_) = 0;
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
