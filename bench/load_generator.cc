// Load generator for cds-server: N unary Evaluate calls in flight over M channels (gRPC
// callback API) for a fixed time after a warm-up, against a real server and a no-op
// baseline server (`cds-server --noop_baseline`) that are both up at once. It alternates
// between them for several rounds (real first in even rounds, no-op first in odd ones) and
// reports, per target, the median over rounds of QPS, p50/p90/p99/p99.9 latency, errors,
// and server and client CPU per call (server: utime+stime of /proc/<pid>/stat across the
// measured window), plus the real/no-op ratios of each round's pair (median). Optionally it
// also measures patients per second on one EvaluateStream.
//
// Rule updates under load (--publish_every): instead of real against no-op, it alternates
// the real server between steady state and publishing. While publishing, a publisher thread
// signs a NEW version of the rule set every --publish_every (the --publish_source files
// re-versioned: patch + 1, + 2, ... across the whole run), publishes it through
// RuleSetAdmin.PublishRuleSet and moves --publish_label (what the load's requests resolve
// through: "stable" for a request naming no version) to it with SetLabel. It reports both
// phases, the p99 and QPS ratios of each round's pair (median), the publishes and label moves
// that succeeded or failed with their latency, and the versions the responses named.
//
// Talks only to the addresses it is given (bench/run.sh: 127.0.0.1) and stops by itself.
//
//   load_generator --real=127.0.0.1:P1 --real_pid=PID1 --noop=127.0.0.1:P2 --noop_pid=PID2
//       --patient=bench/typical_patient.textproto --in_flight=1,64 --channels=4
//       --warmup=1s --duration=3s --rounds=5 --json_out=FILE
//   load_generator --real=127.0.0.1:P1 --real_pid=PID1 --in_flight=64 --publish_every=100ms
//       --publish_key=KEY.pem --publish_source=rules/ipex/1.1.0 --publish_label=stable

#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <functional>
#include <iostream>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "cds/v1/service.grpc.pb.h"
#include "google/protobuf/io/coded_stream.h"
#include "google/protobuf/text_format.h"
#include "google/protobuf/wire_format_lite.h"
#include "grpcpp/generic/generic_stub.h"
#include "grpcpp/grpcpp.h"
#include "grpcpp/support/proto_buffer_reader.h"
#include "server/bundle/bundle.h"

ABSL_FLAG(std::string, real, "", "Address of the real server (HOST:PORT).");
ABSL_FLAG(int, real_pid, 0, "PID of the real server, for its CPU time (0: not measured).");
ABSL_FLAG(std::string, noop, "", "Address of the no-op baseline server (empty: none).");
ABSL_FLAG(int, noop_pid, 0, "PID of the no-op server, for its CPU time (0: not measured).");
ABSL_FLAG(std::string, patient, "bench/typical_patient.textproto",
          "cds.v1.Patient or cds.v1.EvaluateRequest in text format: the request sent.");
ABSL_FLAG(std::string, rule_set, "ipex", "Rule set for a file holding a bare Patient.");
ABSL_FLAG(int, distinct_patients, 1,
          "Send the patient under this many distinct references (REF-1, REF-2, ...), in turn: "
          "1 sends the file as it is. Many patients make the audit trail's per-patient index "
          "work as it would with real traffic.");
ABSL_FLAG(std::string, in_flight, "1,64", "Comma-separated numbers of calls in flight.");
ABSL_FLAG(int, channels, 4, "Channels (TCP connections) per target; at most in_flight.");
ABSL_FLAG(absl::Duration, warmup, absl::Seconds(1), "Warm-up before each measurement.");
ABSL_FLAG(absl::Duration, duration, absl::Seconds(3), "Measured time per target and round.");
ABSL_FLAG(int, rounds, 5, "Rounds; each measures both targets.");
ABSL_FLAG(absl::Duration, stream_duration, absl::ZeroDuration(),
          "If positive: also measure patients/s on one EvaluateStream to --real for this long.");
ABSL_FLAG(std::string, json_out, "", "Write the results as JSON to this file.");
ABSL_FLAG(absl::Duration, publish_every, absl::ZeroDuration(),
          "If positive: measure rule updates under load (steady state against publishing a new "
          "version this often) at the first --in_flight value, instead of real against no-op.");
ABSL_FLAG(std::string, publish_key, "",
          "Ed25519 private key (PEM, `cdsctl rules keygen`) the server trusts: signs each bundle.");
ABSL_FLAG(std::string, publish_source, "rules/ipex/1.1.0",
          "Rule-set version directory (ruleset.textproto, tests.textproto) published again and "
          "again under new patch versions.");
ABSL_FLAG(std::string, publish_label, "stable",
          "Label moved to each new version: the one the load's requests resolve through.");

namespace {

using Clock = std::chrono::steady_clock;

constexpr char kEvaluateMethod[] = "/cds.v1.DecisionSupport/Evaluate";
constexpr char kEvaluateStreamMethod[] = "/cds.v1.DecisionSupport/EvaluateStream";

// The requests the calls send, in turn (the same patient under distinct references),
// serialized once. The client sends and reads bytes: parsing each 17 KB response (hundreds
// of fields) cost the client more CPU than the server spent on the call, so a parsing client
// measured itself (one stream was bound by the client's core, and 64 calls in flight by its
// CPU per call). It reads only what it reports: the status, the rule-set version, and
// whether a stream's result is a response or an error.
struct Requests {
  std::vector<grpc::ByteBuffer> unary;   // cds.v1.EvaluateRequest
  std::vector<grpc::ByteBuffer> stream;  // cds.v1.StreamEvaluateRequest
  size_t size() const { return unary.size(); }
};

grpc::ByteBuffer Serialized(const google::protobuf::MessageLite& message) {
  const std::string bytes = message.SerializeAsString();
  grpc::Slice slice(bytes);
  return grpc::ByteBuffer(&slice, 1);
}

// Positions `in` at the payload of the first length-delimited field `number` of the
// message it reads, and returns the payload's length; nullopt if there is none.
std::optional<uint32_t> FindField(google::protobuf::io::CodedInputStream& in, int number) {
  using google::protobuf::internal::WireFormatLite;
  for (uint32_t tag = in.ReadTag(); tag != 0; tag = in.ReadTag()) {
    if (WireFormatLite::GetTagFieldNumber(tag) == number &&
        WireFormatLite::GetTagWireType(tag) == WireFormatLite::WIRETYPE_LENGTH_DELIMITED) {
      uint32_t length = 0;
      if (!in.ReadVarint32(&length)) return std::nullopt;
      return length;
    }
    if (!WireFormatLite::SkipField(&in, tag)) return std::nullopt;
  }
  return std::nullopt;
}

// A serialized message's fields, read in place (the copy shares the slices; the reader
// consumes the copy).
struct BytesReader {
  explicit BytesReader(const grpc::ByteBuffer& bytes) : copy(bytes), reader(&copy), in(&reader) {}
  grpc::ByteBuffer copy;
  grpc::ProtoBufferReader reader;
  google::protobuf::io::CodedInputStream in;
};

// EvaluateResponse.rule_set (2) .version (2), read from the bytes.
std::string ResponseVersion(const grpc::ByteBuffer& response) {
  BytesReader bytes(response);
  std::string version;
  const std::optional<uint32_t> rule_set = FindField(bytes.in, 2);
  if (!rule_set) return version;
  bytes.in.PushLimit(static_cast<int>(*rule_set));
  if (const std::optional<uint32_t> length = FindField(bytes.in, 2)) {
    bytes.in.ReadString(&version, static_cast<int>(*length));
  }
  return version;
}

// Whether a StreamEvaluateResponse carries a response (3) rather than an error (4).
bool IsStreamResult(const grpc::ByteBuffer& result) {
  BytesReader bytes(result);
  return FindField(bytes.in, 3).has_value();
}

struct Target {
  std::string name;
  std::string address;
  int pid = 0;
  std::vector<std::unique_ptr<grpc::GenericStub>> stubs;  // one per channel
};

// One target, one in-flight setting, one round.
struct Sample {
  double qps = 0;
  double p50_us = 0, p90_us = 0, p99_us = 0, p999_us = 0;
  int64_t calls = 0;
  int64_t errors = 0;
  double server_cpu_us_per_call = -1;  // -1: not measured
  double client_cpu_us_per_call = 0;
  // Distinct rule-set versions the window's responses named, and how often a call loop saw
  // the version change from its previous call.
  int64_t versions_seen = 0;
  int64_t version_switches = 0;
  int64_t rss_kib = -1;  // the server's resident memory at the end of the window
};

// utime + stime of a process, in microseconds; -1 when unreadable.
double ProcessCpuMicros(int pid) {
  if (pid <= 0) return -1;
  std::ifstream in(absl::StrCat("/proc/", pid, "/stat"));
  std::string content((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  // Fields after the command name, which is in parentheses and may hold spaces.
  const size_t close = content.rfind(')');
  if (close == std::string::npos) return -1;
  std::vector<std::string> fields = absl::StrSplit(content.substr(close + 2), ' ');
  // utime and stime are fields 14 and 15 of the whole line, 12 and 13 (1-based) here.
  if (fields.size() < 13) return -1;
  int64_t utime = 0, stime = 0;
  if (!absl::SimpleAtoi(fields[11], &utime) || !absl::SimpleAtoi(fields[12], &stime)) return -1;
  return static_cast<double>(utime + stime) * 1e6 / static_cast<double>(sysconf(_SC_CLK_TCK));
}

// VmRSS of a process in KiB; -1 when unreadable.
int64_t ProcessRssKib(int pid) {
  if (pid <= 0) return -1;
  std::ifstream in(absl::StrCat("/proc/", pid, "/status"));
  std::string line;
  while (std::getline(in, line)) {
    int64_t kib = 0;
    if (absl::StartsWith(line, "VmRSS:") &&
        absl::SimpleAtoi(absl::StripSuffix(absl::StripAsciiWhitespace(line.substr(6)), " kB"),
                         &kib)) {
      return kib;
    }
  }
  return -1;
}

double SelfCpuMicros() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  auto micros = [](const timeval& t) { return t.tv_sec * 1e6 + t.tv_usec; };
  return micros(usage.ru_utime) + micros(usage.ru_stime);
}

double Percentile(const std::vector<int64_t>& sorted_ns, double q) {
  if (sorted_ns.empty()) return 0;
  size_t index = static_cast<size_t>(std::ceil(q * static_cast<double>(sorted_ns.size())));
  index = std::min(sorted_ns.size() - 1, index == 0 ? 0 : index - 1);
  return static_cast<double>(sorted_ns[index]) / 1e3;
}

double Median(std::vector<double> values) {
  if (values.empty()) return 0;
  std::sort(values.begin(), values.end());
  const size_t n = values.size();
  return n % 2 == 1 ? values[n / 2] : (values[n / 2 - 1] + values[n / 2]) / 2;
}

// Drives `in_flight` call loops ("slots") until the window ends. A slot's calls are
// sequential, so each slot records into its own vector without locking.
class Run {
 public:
  Run(Target& target, const Requests& requests, int in_flight, Clock::time_point measure_start,
      Clock::time_point measure_end)
      : target_(target),
        requests_(requests),
        measure_start_(measure_start),
        measure_end_(measure_end),
        slots_(in_flight) {}

  void Start() {
    active_ = static_cast<int>(slots_.size());
    for (size_t i = 0; i < slots_.size(); ++i) {
      slots_[i].stub = target_.stubs[i % target_.stubs.size()].get();
      slots_[i].next_request = i;
      Issue(&slots_[i]);
    }
  }

  void Wait() {
    std::unique_lock<std::mutex> lock(mu_);
    done_.wait(lock, [&] { return active_ == 0; });
  }

  void Collect(std::vector<int64_t>* latencies_ns, int64_t* errors, std::string* first_error,
               std::set<std::string>* versions, int64_t* version_switches) {
    for (Slot& slot : slots_) {
      latencies_ns->insert(latencies_ns->end(), slot.latencies_ns.begin(),
                           slot.latencies_ns.end());
      *errors += slot.errors;
      if (first_error->empty()) *first_error = slot.first_error;
      versions->insert(slot.versions.begin(), slot.versions.end());
      *version_switches += slot.version_switches;
    }
  }

 private:
  struct Slot {
    grpc::GenericStub* stub = nullptr;
    std::vector<int64_t> latencies_ns;
    int64_t errors = 0;
    std::string first_error;
    std::string last_version;
    std::set<std::string> versions;
    int64_t version_switches = 0;
    size_t next_request = 0;  // index into requests_; slots interleave
  };

  // One call; deletes itself when done (the callback API's reactor pattern).
  class Call final : public grpc::ClientUnaryReactor {
   public:
    Call(Run* run, Slot* slot) : run_(run), slot_(slot), start_(Clock::now()) {
      context_.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
      const grpc::ByteBuffer& request =
          run->requests_.unary[slot->next_request % run->requests_.size()];
      slot->next_request += run->slots_.size();
      slot->stub->PrepareUnaryCall(&context_, kEvaluateMethod, grpc::StubOptions(), &request,
                                   &response_, this);
      StartCall();
    }
    void OnDone(const grpc::Status& status) override {
      const Clock::time_point end = Clock::now();
      if (start_ >= run_->measure_start_ && end <= run_->measure_end_) {
        if (status.ok()) {
          slot_->latencies_ns.push_back(
              std::chrono::duration_cast<std::chrono::nanoseconds>(end - start_).count());
          const std::string version = ResponseVersion(response_);
          if (version != slot_->last_version) {
            if (!slot_->last_version.empty()) ++slot_->version_switches;
            slot_->last_version = version;
            slot_->versions.insert(version);
          }
        } else {
          ++slot_->errors;
          if (slot_->first_error.empty()) {
            slot_->first_error = absl::StrCat(status.error_code(), ": ", status.error_message());
          }
        }
      }
      Run* run = run_;
      Slot* slot = slot_;
      delete this;
      if (end < run->measure_end_) {
        run->Issue(slot);
      } else {
        run->SlotDone();
      }
    }

   private:
    Run* run_;
    Slot* slot_;
    const Clock::time_point start_;
    grpc::ClientContext context_;
    grpc::ByteBuffer response_;
  };

  void Issue(Slot* slot) { new Call(this, slot); }

  void SlotDone() {
    std::lock_guard<std::mutex> lock(mu_);
    if (--active_ == 0) done_.notify_all();
  }

  Target& target_;
  const Requests& requests_;
  const Clock::time_point measure_start_;
  const Clock::time_point measure_end_;
  std::vector<Slot> slots_;
  std::mutex mu_;
  std::condition_variable done_;
  int active_ = 0;  // guarded by mu_
};

// `during`, when set, runs on its own thread over the measured window.
Sample Measure(Target& target, const Requests& requests, int in_flight, std::string* first_error,
               const std::function<void(Clock::time_point, Clock::time_point)>& during = {}) {
  const auto to_chrono = [](absl::Duration d) {
    return std::chrono::nanoseconds(absl::ToInt64Nanoseconds(d));
  };
  const Clock::time_point measure_start = Clock::now() + to_chrono(absl::GetFlag(FLAGS_warmup));
  const Clock::time_point measure_end = measure_start + to_chrono(absl::GetFlag(FLAGS_duration));
  Run run(target, requests, in_flight, measure_start, measure_end);
  run.Start();
  std::thread during_thread;
  if (during) during_thread = std::thread(during, measure_start, measure_end);
  std::this_thread::sleep_until(measure_start);
  const double server_before = ProcessCpuMicros(target.pid);
  const double client_before = SelfCpuMicros();
  std::this_thread::sleep_until(measure_end);
  const double server_after = ProcessCpuMicros(target.pid);
  const double client_after = SelfCpuMicros();
  run.Wait();
  if (during_thread.joinable()) during_thread.join();
  const int64_t rss_kib = ProcessRssKib(target.pid);

  std::vector<int64_t> latencies;
  Sample sample;
  std::set<std::string> versions;
  run.Collect(&latencies, &sample.errors, first_error, &versions, &sample.version_switches);
  sample.versions_seen = static_cast<int64_t>(versions.size());
  sample.rss_kib = rss_kib;
  std::sort(latencies.begin(), latencies.end());
  const double seconds = absl::ToDoubleSeconds(absl::GetFlag(FLAGS_duration));
  sample.calls = static_cast<int64_t>(latencies.size());
  sample.qps = static_cast<double>(sample.calls) / seconds;
  sample.p50_us = Percentile(latencies, 0.50);
  sample.p90_us = Percentile(latencies, 0.90);
  sample.p99_us = Percentile(latencies, 0.99);
  sample.p999_us = Percentile(latencies, 0.999);
  // The calls completed in the window stand for the work done in it.
  const double calls = std::max<double>(1, static_cast<double>(sample.calls + sample.errors));
  if (server_before >= 0 && server_after >= 0) {
    sample.server_cpu_us_per_call = (server_after - server_before) / calls;
  }
  sample.client_cpu_us_per_call = (client_after - client_before) / calls;
  return sample;
}

// Patients per second on one EvaluateStream: the client writes as fast as flow control lets
// it (one write outstanding) and counts the results read in the measured window.
class StreamRun final : public grpc::ClientBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer> {
 public:
  StreamRun(const Target& target, const std::vector<grpc::ByteBuffer>& messages)
      : target_(target),
        messages_(messages),
        measure_start_(absl::Now() + absl::GetFlag(FLAGS_warmup)),
        measure_end_(measure_start_ + absl::GetFlag(FLAGS_stream_duration)) {}

  // Runs the stream to its end.
  void Run() {
    target_.stubs[0]->PrepareBidiStreamingCall(&context_, kEvaluateStreamMethod,
                                               grpc::StubOptions(), this);
    StartRead(&result_);
    StartWrite(&messages_[0]);
    StartCall();
    std::unique_lock<std::mutex> lock(mu_);
    done_cv_.wait(lock, [&] { return done_; });
  }

  void OnWriteDone(bool ok) override {
    if (!ok) return;  // the stream is over: OnDone has its status
    if (stop_.load(std::memory_order_relaxed)) {
      StartWritesDone();
      return;
    }
    ++written_;
    StartWrite(&messages_[written_ % messages_.size()]);
  }

  void OnReadDone(bool ok) override {
    if (!ok) return;
    const absl::Time now = absl::Now();
    if (now >= measure_end_) {
      if (server_after_ < 0) {
        server_after_ = ProcessCpuMicros(target_.pid);
        client_after_ = SelfCpuMicros();
      }
      stop_.store(true, std::memory_order_relaxed);
    } else if (now >= measure_start_) {
      if (server_before_ < 0) {
        server_before_ = ProcessCpuMicros(target_.pid);
        client_before_ = SelfCpuMicros();
      }
      ++counted_;
      if (!IsStreamResult(result_) && errors_++ == 0) {
        // The first error, parsed for its status (errors are rare and small).
        cds::v1::StreamEvaluateResponse parsed;
        grpc::ProtoBufferReader reader(&result_);
        if (parsed.ParseFromZeroCopyStream(&reader)) {
          first_error_ = absl::StrCat(parsed.error().code(), ": ", parsed.error().message());
        }
      }
    }
    StartRead(&result_);
  }

  void OnDone(const grpc::Status& status) override {
    std::lock_guard<std::mutex> lock(mu_);
    status_ = status;
    done_ = true;
    done_cv_.notify_all();
  }

  // After Run.
  int64_t counted() const { return counted_; }
  int64_t errors() const { return errors_ + (status_.ok() ? 0 : 1); }
  const grpc::Status& status() const { return status_; }
  const std::string& first_error() const { return first_error_; }
  double server_cpu_us_per_patient() const { return PerPatient(server_before_, server_after_); }
  double client_cpu_us_per_patient() const { return PerPatient(client_before_, client_after_); }

 private:
  double PerPatient(double before, double after) const {
    return before >= 0 && after >= 0 && counted_ > 0
               ? (after - before) / static_cast<double>(counted_)
               : -1;
  }

  const Target& target_;
  const std::vector<grpc::ByteBuffer>& messages_;
  const absl::Time measure_start_;
  const absl::Time measure_end_;
  grpc::ClientContext context_;
  std::atomic<bool> stop_{false};
  size_t written_ = 0;  // the write side's
  // The read side's:
  grpc::ByteBuffer result_;
  int64_t counted_ = 0;
  int64_t errors_ = 0;
  std::string first_error_;
  double server_before_ = -1, server_after_ = -1;
  double client_before_ = -1, client_after_ = -1;
  std::mutex mu_;
  std::condition_variable done_cv_;
  bool done_ = false;  // guarded by mu_
  grpc::Status status_;
};

std::string SampleJson(const Sample& s) {
  return absl::StrFormat(
      R"({"qps": %.1f, "p50_us": %.1f, "p90_us": %.1f, "p99_us": %.1f, "p999_us": %.1f, )"
      R"("calls": %d, "errors": %d, "server_cpu_us_per_call": %.2f, )"
      R"("client_cpu_us_per_call": %.2f, "versions_seen": %d, "version_switches": %d, )"
      R"("rss_kib": %d})",
      s.qps, s.p50_us, s.p90_us, s.p99_us, s.p999_us, s.calls, s.errors,
      s.server_cpu_us_per_call, s.client_cpu_us_per_call, s.versions_seen, s.version_switches,
      s.rss_kib);
}

// The median of each field over rounds, and the total errors.
Sample MedianOf(const std::vector<Sample>& samples) {
  auto median = [&](auto field) {
    std::vector<double> v;
    for (const Sample& s : samples) v.push_back(field(s));
    return Median(v);
  };
  Sample m;
  m.qps = median([](const Sample& s) { return s.qps; });
  m.p50_us = median([](const Sample& s) { return s.p50_us; });
  m.p90_us = median([](const Sample& s) { return s.p90_us; });
  m.p99_us = median([](const Sample& s) { return s.p99_us; });
  m.p999_us = median([](const Sample& s) { return s.p999_us; });
  m.server_cpu_us_per_call = median([](const Sample& s) { return s.server_cpu_us_per_call; });
  m.client_cpu_us_per_call = median([](const Sample& s) { return s.client_cpu_us_per_call; });
  for (const Sample& s : samples) {
    m.calls += s.calls;
    m.errors += s.errors;
    m.versions_seen += s.versions_seen;
    m.version_switches += s.version_switches;
    m.rss_kib = s.rss_kib;  // the last round's
  }
  return m;
}

// Publishes a new version of one rule set and moves a label to it, every `interval`, through
// the server's real admin API (RuleSetAdmin.PublishRuleSet with a signed bundle, SetLabel).
// Versions keep counting up across Run calls. Not thread-safe: one Run at a time.
class Publisher {
 public:
  struct Stats {
    int64_t published = 0, publish_failed = 0, labelled = 0, label_failed = 0;
    int64_t late = 0;  // ticks that started late because the previous update overran
    std::vector<int64_t> publish_ns, label_ns;
    std::vector<std::string> versions;  // published and labelled, in order
    std::string first_error;
  };

  static std::unique_ptr<Publisher> Create(const std::string& address, const std::string& key_path,
                                           const std::string& source_dir, const std::string& label,
                                           absl::Duration interval, std::string* error) {
    std::ifstream key_in(key_path);
    std::stringstream key_text;
    key_text << key_in.rdbuf();
    absl::StatusOr<cds::bundle::PrivateKey> key = cds::bundle::PrivateKey::Parse(key_text.str());
    if (!key.ok()) {
      *error = absl::StrCat("cannot read --publish_key ", key_path, ": ", key.status().message());
      return nullptr;
    }
    absl::StatusOr<cds::v1::Bundle> source = cds::bundle::ReadBundleDir(source_dir);
    if (!source.ok()) {
      *error = absl::StrCat("cannot read --publish_source: ", source.status().message());
      return nullptr;
    }
    // .../<name>/<MAJOR.MINOR.PATCH>[/]
    std::vector<std::string> parts = absl::StrSplit(source_dir, '/', absl::SkipEmpty());
    std::vector<std::string> numbers;
    if (!parts.empty()) numbers = absl::StrSplit(parts.back(), '.');
    auto publisher = std::unique_ptr<Publisher>(new Publisher());
    if (parts.size() < 2 || numbers.size() != 3 ||
        !absl::SimpleAtoi(numbers[2], &publisher->patch_)) {
      *error = "--publish_source must be a <name>/<MAJOR.MINOR.PATCH> directory";
      return nullptr;
    }
    publisher->name_ = parts[parts.size() - 2];
    publisher->source_version_ = parts.back();
    publisher->prefix_ = absl::StrCat(numbers[0], ".", numbers[1], ".");
    publisher->files_.assign(source->files().begin(), source->files().end());
    publisher->key_ = *std::move(key);
    publisher->label_ = label;
    publisher->interval_ = std::chrono::nanoseconds(absl::ToInt64Nanoseconds(interval));
    publisher->admin_ = cds::v1::RuleSetAdmin::NewStub(
        grpc::CreateChannel(address, grpc::InsecureChannelCredentials()));
    return publisher;
  }

  // One update now (publish, then move the label); false when either failed.
  bool UpdateOnce() {
    const std::string version = absl::StrCat(prefix_, patch_ + ++published_count_);
    std::vector<cds::compiler::SourceFile> files;
    for (const cds::v1::BundleFile& file : files_) {
      std::string content = file.content();
      if (file.path() == "ruleset.textproto") {
        content = absl::StrReplaceAll(content, {{absl::StrCat("version: \"", source_version_, "\""),
                                                 absl::StrCat("version: \"", version, "\"")}});
      }
      files.push_back({file.path(), std::move(content)});
    }
    absl::StatusOr<cds::v1::Bundle> bundle =
        cds::bundle::SignFiles(name_, version, files, "load_generator", *key_, absl::Now());
    if (!bundle.ok()) return Failed(&stats_.publish_failed, bundle.status().ToString());
    cds::v1::PublishRuleSetRequest publish;
    bundle->SerializeToString(publish.mutable_bundle());
    cds::v1::PublishRuleSetResponse published;
    Clock::time_point start = Clock::now();
    grpc::Status status = Call([&](grpc::ClientContext* context) {
      return admin_->PublishRuleSet(context, publish, &published);
    });
    if (!status.ok()) return Failed(&stats_.publish_failed, "publish " + version, status);
    stats_.publish_ns.push_back(Elapsed(start));
    ++stats_.published;

    cds::v1::SetLabelRequest set;
    set.set_name(name_);
    set.set_label(label_);
    set.set_version(version);
    cds::v1::SetLabelResponse unused;
    start = Clock::now();
    status = Call([&](grpc::ClientContext* context) {
      return admin_->SetLabel(context, set, &unused);
    });
    if (!status.ok()) return Failed(&stats_.label_failed, "label " + version, status);
    stats_.label_ns.push_back(Elapsed(start));
    ++stats_.labelled;
    stats_.versions.push_back(version);
    return true;
  }

  // Updates every interval from `start` until `end`; an update that overruns its interval
  // makes the next one start at once (counted as late), not skipped.
  void Run(Clock::time_point start, Clock::time_point end) {
    Clock::time_point next = start;
    while (true) {
      std::this_thread::sleep_until(next);
      if (Clock::now() >= end) break;
      UpdateOnce();
      next += interval_;
      const Clock::time_point now = Clock::now();
      if (next < now) {
        ++stats_.late;
        next = now;
      }
    }
  }

  const Stats& stats() const { return stats_; }
  const std::string& label() const { return label_; }

 private:
  Publisher() = default;

  template <typename F>
  grpc::Status Call(F f) {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    return f(&context);
  }
  static int64_t Elapsed(Clock::time_point start) {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - start).count();
  }
  bool Failed(int64_t* counter, const std::string& what, const grpc::Status& status = {}) {
    ++*counter;
    if (stats_.first_error.empty()) {
      stats_.first_error = status.ok() ? what
                                       : absl::StrCat(what, ": ", status.error_code(), ": ",
                                                      status.error_message());
    }
    return false;
  }

  std::unique_ptr<cds::v1::RuleSetAdmin::Stub> admin_;
  std::optional<cds::bundle::PrivateKey> key_;
  std::vector<cds::v1::BundleFile> files_;
  std::string name_, source_version_, prefix_, label_;
  uint64_t patch_ = 0;
  int64_t published_count_ = 0;
  std::chrono::nanoseconds interval_{0};
  Stats stats_;
};

std::string MillisJson(std::vector<int64_t> ns) {
  std::sort(ns.begin(), ns.end());
  return absl::StrFormat(R"({"count": %d, "p50_ms": %.2f, "p99_ms": %.2f, "max_ms": %.2f})",
                         ns.size(), Percentile(ns, 0.5) / 1e3, Percentile(ns, 0.99) / 1e3,
                         ns.empty() ? 0.0 : static_cast<double>(ns.back()) / 1e6);
}

// Steady state against publishing, alternated for --rounds at one in-flight setting.
// Returns the JSON object "rule_updates"; false when the publisher could not be set up.
bool MeasureRuleUpdates(Target& target, const Requests& requests, int in_flight,
                        std::string* json) {
  std::string error;
  std::unique_ptr<Publisher> publisher = Publisher::Create(
      target.address, absl::GetFlag(FLAGS_publish_key), absl::GetFlag(FLAGS_publish_source),
      absl::GetFlag(FLAGS_publish_label), absl::GetFlag(FLAGS_publish_every), &error);
  if (publisher == nullptr) {
    std::cerr << "load_generator: " << error << "\n";
    return false;
  }
  // Outside the measurement: one update, so that both phases serve a published version
  // through the label, and the server has loaded what a publish needs (ontology, keys).
  if (!publisher->UpdateOnce()) {
    std::cerr << "load_generator: the first rule update failed: "
              << publisher->stats().first_error << "\n";
    return false;
  }
  const Publisher::Stats primed = publisher->stats();
  const int rounds = std::max(1, absl::GetFlag(FLAGS_rounds));
  const char* kPhases[] = {"steady", "publishing"};
  std::vector<Sample> samples[2];
  std::vector<double> p99_ratios, qps_ratios;
  std::vector<int64_t> published_per_round;
  for (int round = 0; round < rounds; ++round) {
    for (int k = 0; k < 2; ++k) {
      const int phase = round % 2 == 0 ? k : 1 - k;
      std::string first_error;
      const int64_t before = publisher->stats().labelled;
      Sample s = phase == 0 ? Measure(target, requests, in_flight, &first_error)
                            : Measure(target, requests, in_flight, &first_error,
                                      [&](Clock::time_point start, Clock::time_point end) {
                                        publisher->Run(start, end);
                                      });
      if (phase == 1) published_per_round.push_back(publisher->stats().labelled - before);
      samples[phase].push_back(s);
      std::cerr << absl::StrFormat(
          "in_flight=%d round=%d %-10s qps=%.0f p50=%.1fus p99=%.1fus errors=%d versions=%d "
          "switches=%d server_cpu/call=%.1fus rss=%.1fMiB%s%s\n",
          in_flight, round, kPhases[phase], s.qps, s.p50_us, s.p99_us, s.errors, s.versions_seen,
          s.version_switches, s.server_cpu_us_per_call, static_cast<double>(s.rss_kib) / 1024,
          phase == 1 ? absl::StrCat(" updates=", published_per_round.back()) : "",
          first_error.empty() ? "" : absl::StrCat(" first error: ", first_error));
    }
    const Sample& steady = samples[0].back();
    const Sample& publishing = samples[1].back();
    if (steady.p99_us > 0) p99_ratios.push_back(publishing.p99_us / steady.p99_us);
    if (steady.qps > 0) qps_ratios.push_back(publishing.qps / steady.qps);
  }
  const Publisher::Stats& stats = publisher->stats();
  std::vector<int64_t> publish_ns(stats.publish_ns.begin() + primed.publish_ns.size(),
                                  stats.publish_ns.end());
  std::vector<int64_t> label_ns(stats.label_ns.begin() + primed.label_ns.size(),
                                stats.label_ns.end());
  const double every_ms = absl::ToDoubleMilliseconds(absl::GetFlag(FLAGS_publish_every));
  std::printf("rule updates under load: in flight %d, %d channel(s), %d round(s), a new version "
              "every %.0f ms while publishing:\n",
              in_flight, std::min(static_cast<int>(target.stubs.size()), in_flight), rounds,
              every_ms);
  std::printf("  %-10s %9s %9s %9s %9s %7s %9s %14s\n", "", "QPS", "p50 us", "p99 us",
              "p99.9 us", "errors", "versions", "srv CPU/call");
  std::vector<std::string> phases_json;
  for (int phase = 0; phase < 2; ++phase) {
    const Sample m = MedianOf(samples[phase]);
    std::printf("  %-10s %9.0f %9.1f %9.1f %9.1f %7lld %9lld %11.1f us\n", kPhases[phase], m.qps,
                m.p50_us, m.p99_us, m.p999_us, static_cast<long long>(m.errors),
                static_cast<long long>(m.versions_seen), m.server_cpu_us_per_call);
    std::vector<std::string> rounds_json;
    for (const Sample& s : samples[phase]) rounds_json.push_back(SampleJson(s));
    phases_json.push_back(absl::StrCat("\"", kPhases[phase], "\": {\"median\": ", SampleJson(m),
                                       ", \"rounds\": [", absl::StrJoin(rounds_json, ", "), "]}"));
  }
  std::sort(publish_ns.begin(), publish_ns.end());
  std::sort(label_ns.begin(), label_ns.end());
  const int64_t published = stats.published - primed.published;
  const int64_t labelled = stats.labelled - primed.labelled;
  std::printf("  publishing/steady (median of %d paired rounds): p99 %.3f, QPS %.3f\n", rounds,
              Median(p99_ratios), Median(qps_ratios));
  const std::string first_version =
      labelled > 0 ? stats.versions[primed.versions.size()] : std::string();
  const std::string last_version = labelled > 0 ? stats.versions.back() : std::string();
  const Sample steady_median = MedianOf(samples[0]), publishing_median = MedianOf(samples[1]);
  const double p99_ratio_of_medians =
      steady_median.p99_us > 0 ? publishing_median.p99_us / steady_median.p99_us : 0;
  std::printf("  (ratio of the medians: p99 %.3f)\n", p99_ratio_of_medians);
  std::printf(
      "  updates: %lld published (%lld failed), %lld label moves (%lld failed), %lld late; "
      "versions %s..%s\n",
      static_cast<long long>(published), static_cast<long long>(stats.publish_failed),
      static_cast<long long>(labelled), static_cast<long long>(stats.label_failed),
      static_cast<long long>(stats.late), first_version.c_str(), last_version.c_str());
  std::printf("  publish p50 %.1f ms p99 %.1f ms; label move p50 %.1f ms p99 %.1f ms%s\n",
              Percentile(publish_ns, 0.5) / 1e3, Percentile(publish_ns, 0.99) / 1e3,
              Percentile(label_ns, 0.5) / 1e3, Percentile(label_ns, 0.99) / 1e3,
              stats.first_error.empty()
                  ? ""
                  : absl::StrCat("; first error: ", stats.first_error).c_str());
  *json = absl::StrCat(
      "{\"in_flight\": ", in_flight, ", \"channels\": ",
      std::min(static_cast<int>(target.stubs.size()), in_flight), ", \"rounds\": ", rounds,
      ", \"publish_every_ms\": ", every_ms, ", \"label\": \"", publisher->label(), "\", ",
      absl::StrJoin(phases_json, ", "),
      absl::StrFormat(R"(, "p99_ratio": %.4f, "p99_ratio_of_medians": %.4f, "qps_ratio": %.4f, )",
                      Median(p99_ratios), p99_ratio_of_medians, Median(qps_ratios)),
      absl::StrFormat(R"("updates": {"published": %d, "publish_failed": %d, "labelled": %d, )"
                      R"("label_failed": %d, "late": %d, "per_round": [%s], )"
                      R"("first_version": "%s", "last_version": "%s", "first_error": "%s", )",
                      published, stats.publish_failed, labelled, stats.label_failed, stats.late,
                      absl::StrJoin(published_per_round, ", "), first_version, last_version,
                      absl::CHexEscape(stats.first_error)),
      "\"publish\": ", MillisJson(publish_ns), ", \"label_move\": ", MillisJson(label_ns), "}}");
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "Load generator: the real cds-server against its --noop_baseline twin.\n"
      "Usage: load_generator --real=HOST:PORT [--real_pid=PID] [--noop=HOST:PORT "
      "--noop_pid=PID] [--in_flight=1,64] [--rounds=5] [--json_out=FILE]");
  absl::ParseCommandLine(argc, argv);

  // The request: a Patient (wrapped, with --rule_set) or a whole EvaluateRequest.
  std::ifstream in(absl::GetFlag(FLAGS_patient));
  std::stringstream text;
  text << in.rdbuf();
  cds::v1::EvaluateRequest request;
  cds::v1::Patient patient;
  if (google::protobuf::TextFormat::ParseFromString(text.str(), &patient)) {
    request.set_rule_set(absl::GetFlag(FLAGS_rule_set));
    *request.mutable_patient() = patient;
  } else if (!google::protobuf::TextFormat::ParseFromString(text.str(), &request)) {
    std::cerr << "load_generator: " << absl::GetFlag(FLAGS_patient)
              << " is not a cds.v1.Patient or cds.v1.EvaluateRequest in text format\n";
    return 2;
  }
  const int distinct_patients = absl::GetFlag(FLAGS_distinct_patients);
  if (distinct_patients < 1) {
    std::cerr << "load_generator: --distinct_patients must be at least 1\n";
    return 2;
  }
  Requests requests;
  for (int i = 1; i <= distinct_patients; ++i) {
    cds::v1::StreamEvaluateRequest message;
    cds::v1::EvaluateRequest& one = *message.mutable_request();
    one = request;
    if (distinct_patients > 1) {
      one.mutable_patient()->set_reference(absl::StrCat(request.patient().reference(), "-", i));
    }
    requests.unary.push_back(Serialized(one));
    requests.stream.push_back(Serialized(message));
  }

  std::vector<int> in_flight_values;
  for (absl::string_view part : absl::StrSplit(absl::GetFlag(FLAGS_in_flight), ',')) {
    int n = 0;
    if (!absl::SimpleAtoi(part, &n) || n <= 0) {
      std::cerr << "load_generator: --in_flight wants positive integers\n";
      return 2;
    }
    in_flight_values.push_back(n);
  }
  if (absl::GetFlag(FLAGS_real).empty()) {
    std::cerr << "load_generator: --real is required\n";
    return 2;
  }

  std::vector<Target> targets;
  targets.push_back({"real", absl::GetFlag(FLAGS_real), absl::GetFlag(FLAGS_real_pid), {}});
  if (!absl::GetFlag(FLAGS_noop).empty()) {
    targets.push_back({"noop", absl::GetFlag(FLAGS_noop), absl::GetFlag(FLAGS_noop_pid), {}});
  }
  const int channels = std::max(1, absl::GetFlag(FLAGS_channels));
  for (Target& target : targets) {
    for (int i = 0; i < channels; ++i) {
      grpc::ChannelArguments args;
      // Distinct arguments give each channel its own TCP connection.
      args.SetInt("cds.load_generator.channel", i);
      target.stubs.push_back(std::make_unique<grpc::GenericStub>(grpc::CreateCustomChannel(
          target.address, grpc::InsecureChannelCredentials(), args)));
    }
  }
  const int rounds = std::max(1, absl::GetFlag(FLAGS_rounds));

  if (absl::GetFlag(FLAGS_publish_every) > absl::ZeroDuration()) {
    std::string rule_updates;
    if (!MeasureRuleUpdates(targets[0], requests, in_flight_values[0], &rule_updates)) return 1;
    const std::string json = absl::StrCat(
        "{\"request_bytes\": ", request.ByteSizeLong(), ", \"warmup_s\": ",
        absl::ToDoubleSeconds(absl::GetFlag(FLAGS_warmup)), ", \"duration_s\": ",
        absl::ToDoubleSeconds(absl::GetFlag(FLAGS_duration)), ", \"rule_updates\": ", rule_updates,
        "}\n");
    if (!absl::GetFlag(FLAGS_json_out).empty()) {
      std::ofstream out(absl::GetFlag(FLAGS_json_out));
      out << json;
      if (!out) return 1;
    }
    return 0;
  }

  std::vector<std::string> json_configs;
  for (const int in_flight : in_flight_values) {
    std::vector<std::vector<Sample>> samples(targets.size());
    std::vector<double> qps_ratios, p50_ratios, p99_ratios, cpu_deltas, p50_deltas;
    for (int round = 0; round < rounds; ++round) {
      std::vector<size_t> order;
      for (size_t t = 0; t < targets.size(); ++t) order.push_back(t);
      if (round % 2 == 1) std::reverse(order.begin(), order.end());
      for (size_t t : order) {
        Target& target = targets[t];
        std::string first_error;
        Sample s = Measure(target, requests, in_flight, &first_error);
        samples[t].push_back(s);
        std::cerr << absl::StrFormat(
            "in_flight=%d round=%d %-4s qps=%.0f p50=%.1fus p99=%.1fus errors=%d "
            "server_cpu/call=%.1fus client_cpu/call=%.1fus%s\n",
            in_flight, round, target.name, s.qps, s.p50_us, s.p99_us, s.errors,
            s.server_cpu_us_per_call, s.client_cpu_us_per_call,
            first_error.empty() ? "" : absl::StrCat(" first error: ", first_error));
      }
      if (targets.size() == 2) {
        const Sample& r = samples[0].back();
        const Sample& n = samples[1].back();
        if (n.qps > 0) qps_ratios.push_back(r.qps / n.qps);
        if (n.p50_us > 0) p50_ratios.push_back(r.p50_us / n.p50_us);
        if (n.p99_us > 0) p99_ratios.push_back(r.p99_us / n.p99_us);
        p50_deltas.push_back(r.p50_us - n.p50_us);
        cpu_deltas.push_back(r.server_cpu_us_per_call - n.server_cpu_us_per_call);
      }
    }
    std::vector<std::string> per_target;
    std::printf("in flight %d, %d channel(s), %d round(s):\n", in_flight,
                std::min(channels, in_flight), rounds);
    std::printf("  %-5s %9s %9s %9s %9s %9s %7s %14s %14s\n", "", "QPS", "p50 us", "p90 us",
                "p99 us", "p99.9 us", "errors", "srv CPU/call", "cli CPU/call");
    for (size_t t = 0; t < targets.size(); ++t) {
      const Sample m = MedianOf(samples[t]);
      std::printf("  %-5s %9.0f %9.1f %9.1f %9.1f %9.1f %7lld %11.1f us %11.1f us\n",
                  targets[t].name.c_str(), m.qps, m.p50_us, m.p90_us, m.p99_us, m.p999_us,
                  static_cast<long long>(m.errors), m.server_cpu_us_per_call,
                  m.client_cpu_us_per_call);
      std::vector<std::string> rounds_json;
      for (const Sample& s : samples[t]) rounds_json.push_back(SampleJson(s));
      per_target.push_back(absl::StrCat("\"", targets[t].name, "\": {\"median\": ", SampleJson(m),
                                        ", \"rounds\": [", absl::StrJoin(rounds_json, ", "),
                                        "]}"));
    }
    std::string ratios_json;
    if (targets.size() == 2) {
      std::printf(
          "  real/noop (median of %d paired rounds): QPS %.3f, p50 %.3f (%+.1f us), p99 %.3f, "
          "server CPU/call %+.1f us\n",
          rounds, Median(qps_ratios), Median(p50_ratios), Median(p50_deltas),
          Median(p99_ratios), Median(cpu_deltas));
      ratios_json = absl::StrFormat(
          R"(, "real_vs_noop": {"qps_ratio": %.4f, "p50_ratio": %.4f, "p50_delta_us": %.2f, )"
          R"("p99_ratio": %.4f, "server_cpu_delta_us_per_call": %.2f})",
          Median(qps_ratios), Median(p50_ratios), Median(p50_deltas), Median(p99_ratios),
          Median(cpu_deltas));
    }
    json_configs.push_back(absl::StrCat("{\"in_flight\": ", in_flight, ", \"channels\": ",
                                        std::min(channels, in_flight), ", \"rounds\": ", rounds,
                                        ", ", absl::StrJoin(per_target, ", "), ratios_json, "}"));
  }

  std::string stream_json;
  if (absl::GetFlag(FLAGS_stream_duration) > absl::ZeroDuration()) {
    StreamRun stream(targets[0], requests.stream);
    stream.Run();
    if (!stream.status().ok()) {
      std::cerr << "stream ended with " << stream.status().error_code() << ": "
                << stream.status().error_message() << "\n";
    }
    if (!stream.first_error().empty()) {
      std::cerr << "the stream's first error: " << stream.first_error() << "\n";
    }
    const double rate = static_cast<double>(stream.counted()) /
                        absl::ToDoubleSeconds(absl::GetFlag(FLAGS_stream_duration));
    const int64_t errors = stream.errors();
    const double server_cpu = stream.server_cpu_us_per_patient();
    const double client_cpu = stream.client_cpu_us_per_patient();
    std::printf(
        "one EvaluateStream to the real server: %.0f patients/s, %lld error(s), server CPU "
        "%.1f us/patient, client CPU %.1f us/patient\n",
        rate, static_cast<long long>(errors), server_cpu, client_cpu);
    stream_json = absl::StrFormat(
        R"(, "stream": {"patients_per_second": %.1f, "errors": %d, )"
        R"("server_cpu_us_per_patient": %.1f, "client_cpu_us_per_patient": %.1f})",
        rate, errors, server_cpu, client_cpu);
  }

  const std::string json =
      absl::StrCat("{\"request_bytes\": ", request.ByteSizeLong(), ", \"distinct_patients\": ",
                   distinct_patients, ", \"warmup_s\": ",
                   absl::ToDoubleSeconds(absl::GetFlag(FLAGS_warmup)), ", \"duration_s\": ",
                   absl::ToDoubleSeconds(absl::GetFlag(FLAGS_duration)), ", \"configs\": [",
                   absl::StrJoin(json_configs, ", "), "]", stream_json, "}\n");
  if (!absl::GetFlag(FLAGS_json_out).empty()) {
    std::ofstream out(absl::GetFlag(FLAGS_json_out));
    out << json;
    if (!out) {
      std::cerr << "load_generator: cannot write " << absl::GetFlag(FLAGS_json_out) << "\n";
      return 1;
    }
  }
  return 0;
}
