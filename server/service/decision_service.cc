#include "server/service/decision_service.h"

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>

#include "absl/random/random.h"
#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "google/protobuf/arena.h"
#include "grpcpp/support/proto_buffer_reader.h"
#include "server/common/status_macros.h"
#include "server/engine/engine.h"
#include "server/service/grpc_status.h"
#include "server/service/request_validation.h"

namespace cds::service {
namespace {

void SetTimestamp(absl::Time t, google::protobuf::Timestamp* out) {
  const int64_t seconds = absl::ToUnixSeconds(t);
  out->set_seconds(seconds);
  out->set_nanos(
      static_cast<int32_t>(absl::ToInt64Nanoseconds(t - absl::FromUnixSeconds(seconds))));
}

}  // namespace

// Finishes `reactor` with `status` once the call's audit record is committed.
grpc::ServerUnaryReactor* FinishAudited(grpc::ServerUnaryReactor* reactor, const Auditor* auditor,
                                        grpc::CallbackServerContext* context, const char* method,
                                        absl::Time start, std::string rule_set,
                                        grpc::Status status) {
  if (auditor == nullptr) {
    reactor->Finish(status);
  } else {
    auditor->CallAsync(*context, method, start, std::move(rule_set), std::move(status), "",
                       [reactor](grpc::Status audited) { reactor->Finish(audited); });
  }
  return reactor;
}

grpc::ServerUnaryReactor* FinishAudited(const Auditor* auditor,
                                        grpc::CallbackServerContext* context, const char* method,
                                        absl::Time start, std::string rule_set,
                                        grpc::Status status) {
  return FinishAudited(context->DefaultReactor(), auditor, context, method, start,
                       std::move(rule_set), std::move(status));
}

absl::StatusOr<Pin> ParsePin(const cds::v1::EvaluateRequest& request) {
  Pin pin;
  pin.name = request.rule_set();
  pin.version = request.version();
  pin.label = request.label();
  if (const size_t at = pin.name.find('@'); at != std::string::npos) {
    const std::string suffix = pin.name.substr(at + 1);
    pin.name.resize(at);
    if (!pin.version.empty() || !pin.label.empty()) {
      return absl::InvalidArgumentError(
          "rule_set pins name@version or name@label: leave version and label empty");
    }
    if (suffix.empty()) return absl::InvalidArgumentError("rule_set has an empty pin after '@'");
    // Versions start with a digit; labels with a letter.
    (absl::ascii_isdigit(static_cast<unsigned char>(suffix[0])) ? pin.version : pin.label) =
        suffix;
  }
  if (pin.name.empty()) return absl::InvalidArgumentError("rule_set is required");
  if (!pin.version.empty() && !pin.label.empty()) {
    return absl::InvalidArgumentError("version and label are exclusive");
  }
  return pin;
}

std::string NewUuidV4() {
  // absl::BitGen is seeded from the OS and is not thread-safe: one per thread.
  thread_local absl::BitGen gen;
  uint64_t hi = absl::Uniform<uint64_t>(gen);
  uint64_t lo = absl::Uniform<uint64_t>(gen);
  hi = (hi & ~uint64_t{0xF000}) | uint64_t{0x4000};                // version 4
  lo = (lo & ~(uint64_t{0xC} << 60)) | (uint64_t{0x8} << 60);      // RFC 4122 variant
  // 8-4-4-4-12 lower-case hex digits, written by hand (one per call: StrFormat's parsing
  // cost more than the random numbers).
  static constexpr char kHex[] = "0123456789abcdef";
  std::string id(36, '-');
  int at = 35;
  for (int nibble = 0; nibble < 16; ++nibble, --at) {
    if (at == 23) --at;
    id[static_cast<size_t>(at)] = kHex[(lo >> (4 * nibble)) & 0xF];
  }
  for (int nibble = 0; nibble < 16; ++nibble, --at) {
    if (at == 18 || at == 13 || at == 8) --at;
    id[static_cast<size_t>(at)] = kHex[(hi >> (4 * nibble)) & 0xF];
  }
  return id;
}

absl::StatusOr<store::Resolved> EvaluateInto(const store::RuleStore& store,
                                             const cds::v1::EvaluateRequest& request,
                                             engine::Evaluation* evaluation) {
  // ValidateEvaluateRequest below runs engine::CheckPatient on the patient: the engine
  // need not run it again.
  engine::EvaluateOptions checked;
  checked.validate = false;
  // Validate before resolving, so a malformed request gets INVALID_ARGUMENT (with a
  // BadRequest field violation per problem) whatever the server holds. Messages name
  // fields only, never values.
  CDS_RETURN_IF_ERROR(ValidateEvaluateRequest(request));
  CDS_ASSIGN_OR_RETURN(const Pin pin, ParsePin(request));
  CDS_ASSIGN_OR_RETURN(store::Resolved resolved, store.Resolve(pin.name, pin.version, pin.label));
  // Compact explanations unless the caller asks for the full trace (or none); a value this
  // server does not know yet counts as unset.
  checked.explain = request.explanation() != cds::v1::EXPLANATION_NONE;
  checked.full_trace = request.explanation() == cds::v1::EXPLANATION_FULL;
  CDS_RETURN_IF_ERROR(
      engine::Evaluate(*resolved.rule_set, request.patient(), checked, evaluation));
  resolved.evaluations->fetch_add(1, std::memory_order_relaxed);
  return resolved;
}

absl::Status EvaluateOnce(const store::RuleStore& store, const cds::v1::EvaluateRequest& request,
                          cds::v1::EvaluateResponse* response) {
  thread_local engine::Evaluation evaluation;
  CDS_ASSIGN_OR_RETURN(const store::Resolved resolved, EvaluateInto(store, request, &evaluation));
  evaluation.ToProto(response);
  response->mutable_rule_set()->set_label(resolved.label);
  response->set_evaluation_id(NewUuidV4());
  SetTimestamp(absl::Now(), response->mutable_evaluated_at());
  return absl::OkStatus();
}

engine::WireExtras ResponseExtras(const store::Resolved& resolved, std::string* evaluation_id) {
  *evaluation_id = NewUuidV4();
  const absl::Time now = absl::Now();
  const int64_t seconds = absl::ToUnixSeconds(now);
  engine::WireExtras extras;
  extras.evaluation_id = *evaluation_id;
  extras.label = resolved.label;
  extras.has_evaluated_at = true;
  extras.evaluated_at_seconds = seconds;
  extras.evaluated_at_nanos =
      static_cast<int32_t>(absl::ToInt64Nanoseconds(now - absl::FromUnixSeconds(seconds)));
  return extras;
}

Auditor::EvaluationSummary SummarizeEvaluation(const engine::Evaluation& evaluation,
                                               absl::string_view evaluation_id) {
  Auditor::EvaluationSummary summary;
  const compiler::CompiledRuleSet& rs = evaluation.rule_set();
  summary.rule_set_name = rs.name;
  summary.rule_set_version = rs.version;
  summary.digest = rs.digest;
  summary.evaluation_id = evaluation_id;
  for (size_t i = 0; i < evaluation.suggestion_count() &&
                     i < static_cast<size_t>(Auditor::kTopSuggestions);
       ++i) {
    summary.top_suggestions[i] = evaluation.suggestion_rule_id(i);
    summary.top_suggestion_count = static_cast<int>(i + 1);
  }
  return summary;
}

grpc::Status ParseRequest(const grpc::ByteBuffer& bytes, google::protobuf::MessageLite* request) {
  grpc::ByteBuffer copy(bytes);  // shares the slices; the reader consumes the copy
  if (!grpc::GenericDeserialize<grpc::ProtoBufferReader, google::protobuf::MessageLite>(&copy,
                                                                                      request)
           .ok()) {
    // gRPC's generated handlers answer UNIMPLEMENTED with no message here; a caller is
    // better served by the field-less truth. No byte of the request is echoed.
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                        absl::StrCat("the request is not a serialized ",
                                     request->GetTypeName()));
  }
  return grpc::Status::OK;
}

grpc::Slice NewSlice(size_t size, char** data) {
  grpc_slice slice = grpc_slice_malloc(size);
  *data = reinterpret_cast<char*>(GRPC_SLICE_START_PTR(slice));
  return grpc::Slice(slice, grpc::Slice::STEAL_REF);
}

grpc::ServerUnaryReactor* DecisionServiceImpl::Evaluate(grpc::CallbackServerContext* context,
                                                        const grpc::ByteBuffer* request_bytes,
                                                        grpc::ByteBuffer* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  const absl::Time start = absl::Now();
  // The request on an arena whose first block is on this stack: parsing a typical request
  // allocates nothing else but long strings. It is done with once the audit record is built.
  StackArenaRequest<cds::v1::EvaluateRequest> stack_request;
  const cds::v1::EvaluateRequest* const request = &stack_request.request();
  if (grpc::Status parsed = stack_request.Parse(*request_bytes); !parsed.ok()) {
    // Audited like every refused call; nothing of the request is recorded.
    return FinishAudited(reactor, auditor_, context, Auditor::kEvaluateMethod, start, "",
                         std::move(parsed));
  }
  // Reused by every call on this thread: nothing is allocated for it once grown.
  thread_local engine::Evaluation evaluation;
  grpc::Status status;
  std::string evaluation_id;
  store::Resolved resolved;  // keeps the rule set the evaluation refers to
  // A call whose client has given up (deadline passed, cancelled) is not evaluated.
  if (context->IsCancelled() || context->deadline() <= std::chrono::system_clock::now()) {
    status = ToGrpcStatus(
        absl::DeadlineExceededError("the call's deadline passed before evaluation"));
  } else if (absl::StatusOr<store::Resolved> evaluated =
                 EvaluateInto(store_, *request, &evaluation);
             !evaluated.ok()) {
    status = ToGrpcStatus(evaluated.status());
  } else {
    resolved = *std::move(evaluated);
    const engine::WireExtras extras = ResponseExtras(resolved, &evaluation_id);
    // Written straight into the slice gRPC sends.
    char* data = nullptr;
    grpc::Slice slice = NewSlice(evaluation.WireSize(extras), &data);
    evaluation.WriteWire(extras, data);
    *response = grpc::ByteBuffer(&slice, 1);
  }
  if (auditor_ != nullptr) {
    const Auditor::EvaluationSummary summary =
        status.ok() ? SummarizeEvaluation(evaluation, evaluation_id)
                    : Auditor::EvaluationSummary();
    // Answered once the record is in the audit journal: usually by this thread, which
    // writes it when no other call is writing; otherwise by the thread that writes it
    // together with the others' (this one is then free meanwhile).
    auditor_->EvaluatedAsync(*context, start, *request, summary, std::move(status),
                             Auditor::kEvaluateMethod,
                             [reactor](grpc::Status audited) { reactor->Finish(audited); });
    return reactor;
  }
  reactor->Finish(status);
  return reactor;
}

grpc::ServerUnaryReactor* DecisionServiceImpl::ListRuleSets(
    grpc::CallbackServerContext* context, const cds::v1::ListRuleSetsRequest* request,
    cds::v1::ListRuleSetsResponse* response) {
  const absl::Time start = absl::Now();
  for (cds::v1::RuleSetInfo& info : store_.List(request->name())) {
    *response->add_rule_sets() = std::move(info);
  }
  return FinishAudited(auditor_, context, "/cds.v1.DecisionSupport/ListRuleSets", start,
                       request->name(), grpc::Status::OK);
}

grpc::ServerUnaryReactor* DecisionServiceImpl::GetRuleSet(
    grpc::CallbackServerContext* context, const cds::v1::GetRuleSetRequest* request,
    cds::v1::GetRuleSetResponse* response) {
  const absl::Time start = absl::Now();
  absl::Status status;
  std::string rule_set = request->name();
  if (request->name().empty()) {
    status = absl::InvalidArgumentError("name is required");
  } else {
    absl::StatusOr<cds::v1::GetRuleSetResponse> found =
        store_.Get(request->name(), request->version());
    if (found.ok()) {
      *response = *std::move(found);
      rule_set = absl::StrCat(response->info().ref().name(), "@", response->info().ref().version());
    } else {
      if (!request->version().empty()) absl::StrAppend(&rule_set, "@", request->version());
      status = found.status();
    }
  }
  return FinishAudited(auditor_, context, "/cds.v1.DecisionSupport/GetRuleSet", start,
                       std::move(rule_set), ToGrpcStatus(status));
}

}  // namespace cds::service

namespace cds::service {

RuleSetAdminImpl::RuleSetAdminImpl(store::RuleStore& store)
    : store_(store), worker_([this] { WorkLoop(); }) {}

RuleSetAdminImpl::~RuleSetAdminImpl() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  worker_.join();
}

void RuleSetAdminImpl::Post(std::function<void()> task) {
  absl::MutexLock lock(&mu_);
  queue_.push_back(std::move(task));
}

void RuleSetAdminImpl::WorkLoop() {
  while (true) {
    std::function<void()> task;
    {
      absl::MutexLock lock(&mu_);
      mu_.Await(absl::Condition(this, &RuleSetAdminImpl::HasWorkOrStopping));
      if (queue_.empty()) return;  // stopping, and every queued call finished
      task = std::move(queue_.front());
      queue_.pop_front();
    }
    task();
  }
}

// Each admin call: the reactor is taken here, the work and Finish happen on the admin thread
// (context, request and response stay valid until Finish).
grpc::ServerUnaryReactor* RuleSetAdminImpl::PublishRuleSet(
    grpc::CallbackServerContext* context, const cds::v1::PublishRuleSetRequest* request,
    cds::v1::PublishRuleSetResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  const absl::Time start = absl::Now();
  Post([this, reactor, context, request, response, start] {
    absl::StatusOr<store::PublishResult> published = store_.PublishBytes(request->bundle());
    std::string rule_set;
    if (published.ok()) {
      rule_set = absl::StrCat(published->info.ref().name(), "@", published->info.ref().version());
      *response->mutable_info() = std::move(published->info);
      response->set_created(published->created);
    }
    grpc::Status status = ToGrpcStatus(published.status());
    FinishAudited(reactor, auditor_, context, "/cds.v1.RuleSetAdmin/PublishRuleSet", start,
                  std::move(rule_set), std::move(status));
  });
  return reactor;
}

grpc::ServerUnaryReactor* RuleSetAdminImpl::SetLabel(grpc::CallbackServerContext* context,
                                                     const cds::v1::SetLabelRequest* request,
                                                     cds::v1::SetLabelResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  const absl::Time start = absl::Now();
  Post([this, reactor, context, request, response, start] {
    absl::Status status;
    if (request->name().empty() || request->label().empty() || request->version().empty()) {
      status = absl::InvalidArgumentError("name, label and version are required");
    } else {
      absl::StatusOr<std::string> previous =
          store_.SetLabel(request->name(), request->label(), request->version());
      if (previous.ok()) response->set_previous_version(*previous);
      status = previous.status();
    }
    grpc::Status result = ToGrpcStatus(status);
    FinishAudited(reactor, auditor_, context, "/cds.v1.RuleSetAdmin/SetLabel", start,
                  absl::StrCat(request->name(), "@", request->version()), std::move(result));
  });
  return reactor;
}

grpc::ServerUnaryReactor* RuleSetAdminImpl::RetireRuleSet(
    grpc::CallbackServerContext* context, const cds::v1::RetireRuleSetRequest* request,
    cds::v1::RetireRuleSetResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  const absl::Time start = absl::Now();
  Post([this, reactor, context, request, response, start] {
    absl::Status status;
    if (request->name().empty() || request->version().empty()) {
      status = absl::InvalidArgumentError("name and version are required");
    } else {
      absl::StatusOr<cds::v1::RuleSetInfo> info =
          store_.Retire(request->name(), request->version());
      if (info.ok()) *response->mutable_info() = std::move(*info);
      status = info.status();
    }
    grpc::Status result = ToGrpcStatus(status);
    FinishAudited(reactor, auditor_, context, "/cds.v1.RuleSetAdmin/RetireRuleSet", start,
                  absl::StrCat(request->name(), "@", request->version()), std::move(result));
  });
  return reactor;
}

}  // namespace cds::service
