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
//
// On raw bytes, as the unary Evaluate: each request is parsed onto its slot's arena, and
// each response is written by hand into the slice gRPC sends: correlation_id, index, then
// the engine's wire rendering of the EvaluateResponse (engine::Evaluation::WriteWire) or
// the StreamError, exactly the bytes protobuf writes for the StreamEvaluateResponse.

#include <cstdint>
#include <array>
#include <string>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "absl/strings/string_view.h"
#include "google/protobuf/arena.h"
#include "google/protobuf/io/coded_stream.h"
#include "server/engine/evaluation.h"
#include "server/service/decision_service.h"
#include "server/service/grpc_status.h"

namespace cds::service {
namespace {

// Patients read but not yet written (evaluated, or waiting for their audit record) before
// the reactor stops reading.
constexpr size_t kMaxQueued = 8;

// The serialized StreamEvaluateResponse, field by field in number order as protobuf writes
// it (proto3: an empty string or a zero number is left out; the oneof's field is written
// even when empty).
using google::protobuf::io::CodedOutputStream;
constexpr uint32_t kLengthDelimited = 2;
constexpr uint32_t kCorrelationIdTag = 1 << 3 | kLengthDelimited;
constexpr uint32_t kIndexTag = 2 << 3;  // varint
constexpr uint32_t kResponseTag = 3 << 3 | kLengthDelimited;
constexpr uint32_t kErrorTag = 4 << 3 | kLengthDelimited;
constexpr uint32_t kErrorCodeTag = 1 << 3;  // StreamError.code, varint
constexpr uint32_t kErrorMessageTag = 2 << 3 | kLengthDelimited;

size_t StringFieldSize(absl::string_view value) {
  return value.empty() ? 0 : 1 + CodedOutputStream::VarintSize32(value.size()) + value.size();
}

uint8_t* WriteStringField(uint32_t tag, absl::string_view value, uint8_t* out) {
  if (value.empty()) return out;
  out = CodedOutputStream::WriteTagToArray(tag, out);
  out = CodedOutputStream::WriteVarint32ToArray(static_cast<uint32_t>(value.size()), out);
  return CodedOutputStream::WriteRawToArray(value.data(), static_cast<int>(value.size()), out);
}

// int32 and int64 fields are written as 64-bit varints (a negative int32 takes ten bytes).
size_t IntFieldSize(int64_t value) {
  return value == 0 ? 0 : 1 + CodedOutputStream::VarintSize64(static_cast<uint64_t>(value));
}

uint8_t* WriteIntField(uint32_t tag, int64_t value, uint8_t* out) {
  if (value == 0) return out;
  out = CodedOutputStream::WriteTagToArray(tag, out);
  return CodedOutputStream::WriteVarint64ToArray(static_cast<uint64_t>(value), out);
}

// correlation_id and index, the fields every response starts with.
size_t HeaderSize(absl::string_view correlation_id, int64_t index) {
  return StringFieldSize(correlation_id) + IntFieldSize(index);
}

uint8_t* WriteHeader(absl::string_view correlation_id, int64_t index, uint8_t* out) {
  out = WriteStringField(kCorrelationIdTag, correlation_id, out);
  return WriteIntField(kIndexTag, index, out);
}

// A response: correlation_id and index, then the length-delimited field `tag` (a one-byte
// tag: the response oneof's field 3 or 4) whose `payload_size` bytes
// `write_payload(uint8_t* out)` writes at `out`.
template <typename WritePayload>
grpc::ByteBuffer FramedResponse(absl::string_view correlation_id, int64_t index, uint32_t tag,
                                size_t payload_size, WritePayload write_payload) {
  const size_t size = HeaderSize(correlation_id, index) + 1 +
                      CodedOutputStream::VarintSize64(payload_size) + payload_size;
  char* data = nullptr;
  grpc::Slice slice = NewSlice(size, &data);
  uint8_t* out = WriteHeader(correlation_id, index, reinterpret_cast<uint8_t*>(data));
  out = CodedOutputStream::WriteTagToArray(tag, out);
  out = CodedOutputStream::WriteVarint64ToArray(payload_size, out);
  write_payload(out);
  return grpc::ByteBuffer(&slice, 1);
}

// The response carrying `evaluation`'s EvaluateResponse, rendered with `extras`.
grpc::ByteBuffer EvaluatedBytes(absl::string_view correlation_id, int64_t index,
                                engine::Evaluation& evaluation, const engine::WireExtras& extras) {
  return FramedResponse(correlation_id, index, kResponseTag, evaluation.WireSize(extras),
                        [&](uint8_t* out) {
                          evaluation.WriteWire(extras, reinterpret_cast<char*>(out));
                        });
}

// The response carrying the patient's error instead.
grpc::ByteBuffer ErrorBytes(absl::string_view correlation_id, int64_t index,
                            const grpc::Status& status) {
  const int32_t code = static_cast<int32_t>(status.error_code());
  const std::string message = status.error_message();  // a copy: returned by value
  return FramedResponse(correlation_id, index, kErrorTag,
                        IntFieldSize(code) + StringFieldSize(message), [&](uint8_t* out) {
                          out = WriteIntField(kErrorCodeTag, code, out);
                          WriteStringField(kErrorMessageTag, message, out);
                        });
}

class EvaluateStreamReactor final
    : public grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer> {
 public:
  EvaluateStreamReactor(const store::RuleStore& store, const grpc::CallbackServerContext& context,
                        const Auditor* auditor)
      : store_(store), context_(context), auditor_(auditor), start_(absl::Now()) {
    absl::MutexLock lock(&mu_);
    reading_ = true;
    StartRead(&read_);
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
      status = ParseRequest(read_, slot->request);
      read_.Clear();
      // Nothing of bytes that do not parse is kept (nor audited): the patient's error then
      // has no correlation id.
      if (!status.ok()) slot->request->Clear();
      slot->index = next_index_++;
      // Reused by every patient evaluated on this thread (rendered before it lets go of
      // mu_): nothing is allocated for it once grown.
      thread_local engine::Evaluation evaluation;
      std::string evaluation_id;
      store::Resolved resolved;  // keeps the rule set the evaluation (and record) refer to
      if (status.ok()) status = Evaluate(*slot, &evaluation, &resolved, &evaluation_id);
      if (auditor_ == nullptr) {
        Settle(slot, status);
        MaybeWriteLocked();
        MaybeReadLocked();
        return;
      }
      record = auditor_->EvaluationRecord(
          slot->request->request(),
          status.ok() ? SummarizeEvaluation(evaluation, evaluation_id)
                      : Auditor::EvaluationSummary(),
          status, Auditor::kEvaluateStreamMethod);
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
  // A patient: its request, parsed onto an arena of the slot's own that is reset when the
  // slot is reused (the request's many small fields then cost no malloc or free once the
  // block has been allocated), and its serialized response.
  struct Slot {
    static google::protobuf::ArenaOptions Options() {
      google::protobuf::ArenaOptions options;
      options.start_block_size = 32 * 1024;
      options.max_block_size = 32 * 1024;
      return options;
    }
    google::protobuf::Arena arena{Options()};
    cds::v1::StreamEvaluateRequest* request = nullptr;
    int64_t index = 0;
    grpc::ByteBuffer response;  // the evaluation's, until Settle
    bool ready = false;         // its status is final (audited when there is an auditor)
  };

  // The next free slot of the ring, with a new empty request. REQUIRES: queued_ <
  // kMaxQueued (MaybeReadLocked reads no further).
  Slot* PushSlotLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    Slot* slot = &ring_[(head_ + queued_) % kMaxQueued];
    ++queued_;
    slot->response.Clear();
    slot->request = nullptr;
    slot->arena.Reset();
    slot->request =
        google::protobuf::Arena::CreateMessage<cds::v1::StreamEvaluateRequest>(&slot->arena);
    slot->ready = false;
    return slot;
  }

  // Evaluates the slot's patient into `evaluation` (its rule set held by `*resolved`) and
  // renders its response into the slot; returns its status, converted as the unary RPC
  // would (same code, capped message). Under mu_, which only serialises this stream's own
  // callbacks.
  grpc::Status Evaluate(Slot& slot, engine::Evaluation* evaluation, store::Resolved* resolved,
                        std::string* evaluation_id) {
    const cds::v1::StreamEvaluateRequest& request = *slot.request;
    if (!request.has_request()) {
      return ToGrpcStatus(absl::InvalidArgumentError("request is required"));
    }
    absl::StatusOr<store::Resolved> evaluated =
        EvaluateInto(store_, request.request(), evaluation);
    if (!evaluated.ok()) return ToGrpcStatus(evaluated.status());
    *resolved = *std::move(evaluated);
    slot.response = EvaluatedBytes(request.correlation_id(), slot.index, *evaluation,
                                   ResponseExtras(*resolved, evaluation_id));
    return grpc::Status::OK;
  }

  // The patient's final status: its error replaces the response when not OK.
  static void Settle(Slot* slot, const grpc::Status& status) {
    slot->ready = true;
    if (status.ok()) return;
    slot->response = ErrorBytes(slot->request->correlation_id(), slot->index, status);
  }

  void MaybeWriteLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (writing_ || queued_ == 0 || !ring_[head_].ready || failed_) return;
    writing_ = true;
    // The front slot is not reused until OnWriteDone. (No buffer_hint to coalesce writes:
    // a hinted write may not complete until a later write flushes it, and the next write
    // only starts once this one has completed: the stream then stalled.)
    StartWrite(&ring_[head_].response);
  }

  void MaybeReadLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (reading_ || reads_done_ || failed_ || queued_ >= kMaxQueued) return;
    reading_ = true;
    StartRead(&read_);
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
  // The request being read, as it came; at most one read is outstanding.
  grpc::ByteBuffer read_ ABSL_GUARDED_BY(mu_);
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

grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* DecisionServiceImpl::EvaluateStream(
    grpc::CallbackServerContext* context) {
  return new EvaluateStreamReactor(store_, *context, auditor_);
}

}  // namespace cds::service
