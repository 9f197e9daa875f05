#include "server/metrics/server_metrics.h"

#include <dirent.h>
#include <unistd.h>

#include <array>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <map>
#include <utility>

#include "absl/strings/str_split.h"
#include "cds/v1/service.pb.h"
#include "google/protobuf/descriptor.h"
#include "google/protobuf/io/coded_stream.h"
#include "google/protobuf/wire_format_lite.h"
#include "grpcpp/support/byte_buffer.h"
#include "grpcpp/support/proto_buffer_reader.h"

namespace cds::metrics {
namespace {

constexpr char kEvaluateMethod[] = "/cds.v1.DecisionSupport/Evaluate";
constexpr char kEvaluateStreamMethod[] = "/cds.v1.DecisionSupport/EvaluateStream";

// Latency buckets from 50 µs to about 6.5 s.
std::vector<double> LatencyBuckets() { return ExponentialBuckets(50e-6, 2, 18); }

const char* CodeName(grpc::StatusCode code) {
  switch (code) {
    case grpc::StatusCode::OK: return "OK";
    case grpc::StatusCode::CANCELLED: return "CANCELLED";
    case grpc::StatusCode::UNKNOWN: return "UNKNOWN";
    case grpc::StatusCode::INVALID_ARGUMENT: return "INVALID_ARGUMENT";
    case grpc::StatusCode::DEADLINE_EXCEEDED: return "DEADLINE_EXCEEDED";
    case grpc::StatusCode::NOT_FOUND: return "NOT_FOUND";
    case grpc::StatusCode::ALREADY_EXISTS: return "ALREADY_EXISTS";
    case grpc::StatusCode::PERMISSION_DENIED: return "PERMISSION_DENIED";
    case grpc::StatusCode::RESOURCE_EXHAUSTED: return "RESOURCE_EXHAUSTED";
    case grpc::StatusCode::FAILED_PRECONDITION: return "FAILED_PRECONDITION";
    case grpc::StatusCode::ABORTED: return "ABORTED";
    case grpc::StatusCode::OUT_OF_RANGE: return "OUT_OF_RANGE";
    case grpc::StatusCode::UNIMPLEMENTED: return "UNIMPLEMENTED";
    case grpc::StatusCode::INTERNAL: return "INTERNAL";
    case grpc::StatusCode::UNAVAILABLE: return "UNAVAILABLE";
    case grpc::StatusCode::DATA_LOSS: return "DATA_LOSS";
    case grpc::StatusCode::UNAUTHENTICATED: return "UNAUTHENTICATED";
    default: return "UNKNOWN";
  }
}

// gRPC's status codes are 0..16; anything else is counted as UNKNOWN.
constexpr int kStatusCodes = 17;
int CodeIndex(grpc::StatusCode code) {
  const int i = static_cast<int>(code);
  return i >= 0 && i < kStatusCodes ? i : static_cast<int>(grpc::StatusCode::UNKNOWN);
}

}  // namespace

struct ServerMetrics::MethodSeries {
  MethodSeries(const std::string& full_method, MethodLabels labels)
      : full_method(full_method), labels(std::move(labels)) {}

  const std::string full_method;
  const MethodLabels labels;
  std::array<std::atomic<Counter*>, kStatusCodes> handled{};
  std::array<std::atomic<Histogram*>, kStatusCodes> seconds{};
  std::array<std::atomic<Counter*>, kStatusCodes> denied{};

  // The series of `family` for this method and `code`, looked up once. Two threads may
  // both look it up the first time: Family::With gives them the same series.
  template <typename Metric>
  Metric& Resolve(std::atomic<Metric*>& slot, Family<Metric>& family, grpc::StatusCode code) {
    Metric* metric = slot.load(std::memory_order_acquire);
    if (metric == nullptr) {
      metric = &family.With({labels.service, labels.method, CodeName(code)});
      slot.store(metric, std::memory_order_release);
    }
    return *metric;
  }
};

namespace {

// Counts one evaluation response, its rule-set version and its top diagnosis, from a
// serialized EvaluateResponse (the rest of `in`, up to its limit),
// reading only what it needs: the rule_set's name and version, and the suggestions up to
// the first diagnosis (alerts come first, so that is usually the first or second). False
// when the bytes do not parse.
bool CountSerializedEvaluation(google::protobuf::io::CodedInputStream& in,
                               Family<Counter>& evaluations) {
  using google::protobuf::internal::WireFormatLite;
  constexpr uint32_t kRuleSet = 2, kSuggestions = 3;        // EvaluateResponse
  constexpr uint32_t kName = 1, kVersion = 2;                // RuleSetRef
  constexpr uint32_t kKind = 2, kRuleId = 3;                 // Suggestion
  std::string name, version, top = "none";
  auto nested = [&in](auto&& field) {  // calls field(tag) for each field of a message
    uint32_t size;
    if (!in.ReadVarint32(&size)) return false;
    const auto limit = in.PushLimit(static_cast<int>(size));
    while (const uint32_t tag = in.ReadTag()) {
      if (!field(tag)) return false;
    }
    const bool whole = in.ConsumedEntireMessage();
    in.PopLimit(limit);
    return whole;
  };
  const uint32_t length_delimited = WireFormatLite::WIRETYPE_LENGTH_DELIMITED;
  while (const uint32_t tag = in.ReadTag()) {
    bool ok;
    if (tag == (kRuleSet << 3 | length_delimited)) {
      ok = nested([&](uint32_t t) {
        if (t == (kName << 3 | length_delimited)) return WireFormatLite::ReadString(&in, &name);
        if (t == (kVersion << 3 | length_delimited)) return WireFormatLite::ReadString(&in, &version);
        return WireFormatLite::SkipField(&in, t);
      });
    } else if (tag == (kSuggestions << 3 | length_delimited)) {
      uint32_t kind = 0;
      std::string rule_id;
      ok = nested([&](uint32_t t) {
        if (t == (kKind << 3 | WireFormatLite::WIRETYPE_VARINT)) return in.ReadVarint32(&kind);
        if (t == (kRuleId << 3 | length_delimited)) return WireFormatLite::ReadString(&in, &rule_id);
        return WireFormatLite::SkipField(&in, t);
      });
      if (ok && kind == cds::v1::DIAGNOSIS) {
        top = std::move(rule_id);
        break;  // the rule set came before the suggestions
      }
    } else {
      ok = WireFormatLite::SkipField(&in, tag);
    }
    if (!ok) return false;
  }
  evaluations.With({name, version, top}).Increment();
  return true;
}

bool CountSerializedEvaluation(grpc::ByteBuffer* serialized, Family<Counter>& evaluations) {
  grpc::ProtoBufferReader reader(serialized);
  if (!reader.status().ok()) return false;
  google::protobuf::io::CodedInputStream in(&reader);
  return CountSerializedEvaluation(in, evaluations);
}

// The same from a serialized StreamEvaluateResponse: counted when it carries a response
// (not when it carries the patient's error).
bool CountSerializedStreamed(grpc::ByteBuffer* serialized, Family<Counter>& evaluations) {
  using google::protobuf::internal::WireFormatLite;
  constexpr uint32_t kResponse = 3;  // StreamEvaluateResponse
  grpc::ProtoBufferReader reader(serialized);
  if (!reader.status().ok()) return false;
  google::protobuf::io::CodedInputStream in(&reader);
  while (const uint32_t tag = in.ReadTag()) {
    if (tag == (kResponse << 3 | WireFormatLite::WIRETYPE_LENGTH_DELIMITED)) {
      uint32_t size;
      if (!in.ReadVarint32(&size)) return false;
      in.PushLimit(static_cast<int>(size));
      return CountSerializedEvaluation(in, evaluations);
    }
    if (!WireFormatLite::SkipField(&in, tag)) return false;
  }
  return true;
}

class MetricsInterceptor final : public grpc::experimental::Interceptor {
 public:
  MetricsInterceptor(ServerMetrics& metrics, const std::string& method)
      : metrics_(metrics),
        series_(metrics.SeriesFor(method, &uncached_)),
        start_(std::chrono::steady_clock::now()) {}

  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    using grpc::experimental::InterceptionHookPoints;
    if (methods->QueryInterceptionHookPoint(InterceptionHookPoints::PRE_SEND_MESSAGE)) {
      // Evaluate and EvaluateStream send raw bytes (the service renders them itself): read
      // them, as they are (serializing first, should a handler ever send a message instead).
      // No other method's response is counted.
      if (series_->full_method == kEvaluateMethod) {
        metrics_.EvaluateResponseSent(methods->GetSerializedSendMessage());
      } else if (series_->full_method == kEvaluateStreamMethod) {
        metrics_.StreamEvaluateResponseSent(methods->GetSerializedSendMessage());
      }
    }
    if (methods->QueryInterceptionHookPoint(InterceptionHookPoints::PRE_SEND_STATUS)) {
      const std::chrono::duration<double> elapsed = std::chrono::steady_clock::now() - start_;
      metrics_.CallFinished(*series_, methods->GetSendStatus().error_code(), elapsed.count());
    }
    methods->Proceed();
  }

 private:
  ServerMetrics& metrics_;
  // Owns series_ for a method the server does not define (null otherwise: series_ is then
  // metrics_' cached entry). Before series_, which is set from it.
  std::shared_ptr<ServerMetrics::MethodSeries> uncached_;
  ServerMetrics::MethodSeries* const series_;
  const std::chrono::steady_clock::time_point start_;
};

class MetricsInterceptorFactory final
    : public grpc::experimental::ServerInterceptorFactoryInterface {
 public:
  explicit MetricsInterceptorFactory(ServerMetrics& metrics) : metrics_(metrics) {}
  grpc::experimental::Interceptor* CreateServerInterceptor(
      grpc::experimental::ServerRpcInfo* info) override {
    return new MetricsInterceptor(metrics_, info->method() == nullptr ? "" : info->method());
  }

 private:
  ServerMetrics& metrics_;
};

}  // namespace

MethodLabels LabelsForMethod(const std::string& full_method) {
  // "/cds.v1.DecisionSupport/Evaluate" -> service "cds.v1.DecisionSupport", method "Evaluate",
  // if the generated descriptor pool knows that method.
  const std::vector<std::string> parts = absl::StrSplit(full_method, '/');
  if (parts.size() == 3 && parts[0].empty()) {
    const google::protobuf::MethodDescriptor* found =
        google::protobuf::DescriptorPool::generated_pool()->FindMethodByName(
            parts[1] + "." + parts[2]);
    if (found != nullptr) return {parts[1], parts[2]};
  }
  return {"unknown", "unknown"};
}

ServerMetrics::ServerMetrics(Registry& registry)
    : handled_(registry.AddCounter("grpc_server_handled_total",
                                   "gRPC calls completed, by method and status code.",
                                   {"grpc_service", "grpc_method", "grpc_code"})),
      handling_seconds_(registry.AddHistogram(
          "grpc_server_handling_seconds",
          "Time from a call's arrival to its status being sent, by method and status code.",
          {"grpc_service", "grpc_method", "grpc_code"}, LatencyBuckets())),
      denied_(registry.AddCounter(
          "cds_denied_calls_total",
          "Calls refused by the access policy before any handler ran, by method and code.",
          {"grpc_service", "grpc_method", "grpc_code"})),
      evaluations_(registry.AddCounter(
          "cds_evaluations_total",
          "Patients evaluated (unary and streamed), by rule-set version and the top-ranked "
          "diagnosis rule id (\"none\" when no diagnosis is suggested).",
          {"rule_set", "version", "top_diagnosis"})) {}

ServerMetrics::~ServerMetrics() = default;

std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>
ServerMetrics::NewInterceptorFactory() {
  return std::make_unique<MetricsInterceptorFactory>(*this);
}

ServerMetrics::MethodSeries* ServerMetrics::SeriesFor(const std::string& method,
                                                      std::shared_ptr<MethodSeries>* uncached) {
  {
    absl::ReaderMutexLock lock(&mu_);
    if (auto it = by_method_.find(method); it != by_method_.end()) return it->second.get();
  }
  MethodLabels labels = LabelsForMethod(method);
  if (labels.method == "unknown") {  // not cached: see the header
    *uncached = std::make_shared<MethodSeries>(method, std::move(labels));
    return uncached->get();
  }
  auto series = std::make_unique<MethodSeries>(method, std::move(labels));
  absl::MutexLock lock(&mu_);
  return by_method_.try_emplace(method, std::move(series)).first->second.get();
}

void ServerMetrics::CallDenied(const std::string& method, grpc::StatusCode code) {
  std::shared_ptr<MethodSeries> uncached;
  MethodSeries& series = *SeriesFor(method, &uncached);
  series.Resolve(series.denied[CodeIndex(code)], denied_, code).Increment();
}

void ServerMetrics::CallFinished(const std::string& method, grpc::StatusCode code,
                                 double seconds) {
  std::shared_ptr<MethodSeries> uncached;
  CallFinished(*SeriesFor(method, &uncached), code, seconds);
}

void ServerMetrics::CallFinished(MethodSeries& series, grpc::StatusCode code, double seconds) {
  const int i = CodeIndex(code);
  series.Resolve(series.handled[i], handled_, code).Increment();
  series.Resolve(series.seconds[i], handling_seconds_, code).Observe(seconds);
}

void ServerMetrics::EvaluateResponseSent(grpc::ByteBuffer* serialized) {
  if (serialized != nullptr) CountSerializedEvaluation(serialized, evaluations_);
}

void ServerMetrics::StreamEvaluateResponseSent(grpc::ByteBuffer* serialized) {
  if (serialized != nullptr) CountSerializedStreamed(serialized, evaluations_);
}

void AddRuleStoreGauges(const store::RuleStore& store, Registry& registry) {
  registry.AddGauge(
      "cds_rule_set_versions",
      "Rule-set versions known to the server, by rule set and state (AVAILABLE, REJECTED, "
      "RETIRED, UNLOADED, LOADING).",
      {"rule_set", "state"}, [&store] {
        std::map<std::pair<std::string, std::string>, double> counts;
        for (const cds::v1::RuleSetInfo& info : store.List("")) {
          counts[{info.ref().name(), cds::v1::RuleSetInfo::State_Name(info.state())}] += 1;
        }
        std::vector<GaugeSample> samples;
        for (const auto& [key, count] : counts) {
          samples.push_back({{key.first, key.second}, count});
        }
        return samples;
      });
}

void AddProcessGauges(Registry& registry) {
  registry.AddGauge("process_resident_memory_bytes", "Resident memory of this process.", {}, [] {
    long pages = 0;
    if (FILE* f = std::fopen("/proc/self/statm", "r"); f != nullptr) {
      long size = 0;
      if (std::fscanf(f, "%ld %ld", &size, &pages) != 2) pages = 0;
      std::fclose(f);
    }
    return std::vector<GaugeSample>{{{}, static_cast<double>(pages) * sysconf(_SC_PAGESIZE)}};
  });
  registry.AddGauge("process_open_fds", "Open file descriptors of this process.", {}, [] {
    double count = 0;
    if (DIR* dir = opendir("/proc/self/fd"); dir != nullptr) {
      while (const dirent* entry = readdir(dir)) {
        if (entry->d_name[0] != '.') count += 1;
      }
      closedir(dir);
      count -= 1;  // the descriptor of the listing itself
    }
    return std::vector<GaugeSample>{{{}, count}};
  });
  const double start = std::chrono::duration<double>(
                           std::chrono::system_clock::now().time_since_epoch())
                           .count();
  registry.AddGauge("process_start_time_seconds", "Start time of this process (Unix time).", {},
                    [start] { return std::vector<GaugeSample>{{{}, start}}; });
}

}  // namespace cds::metrics
