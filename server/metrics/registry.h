#pragma once

// A small Prometheus metrics registry: counters and histograms with labels, and gauges
// computed at scrape time, rendered in the text exposition format (version 0.0.4). We
// write our own because Debian 12 packages no C++ Prometheus client; the format is a
// few lines of text per series.
//
// Thread-safe. Counter and histogram updates are lock-free once a series exists; finding
// or creating a series by its label values takes the family's mutex.

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <variant>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"

namespace cds::metrics {

// Label values in the order of the family's label names.
using LabelValues = std::vector<std::string>;

class Counter {
 public:
  void Increment(uint64_t by = 1) { value_.fetch_add(by, std::memory_order_relaxed); }
  uint64_t value() const { return value_.load(std::memory_order_relaxed); }

 private:
  std::atomic<uint64_t> value_{0};
};

// Cumulative buckets as Prometheus expects them; the sum is kept in nanounits so that it
// can be an atomic integer.
class Histogram {
 public:
  explicit Histogram(const std::vector<double>& upper_bounds);
  void Observe(double value);

  const std::vector<double>& upper_bounds() const { return upper_bounds_; }
  // Per-bucket (not cumulative) counts; the last is the +Inf bucket.
  std::vector<uint64_t> BucketCounts() const;
  double Sum() const;

 private:
  const std::vector<double> upper_bounds_;
  std::unique_ptr<std::atomic<uint64_t>[]> buckets_;  // upper_bounds_.size() + 1
  std::atomic<int64_t> sum_nanos_{0};
};

// One metric name with its label names and series.
template <typename Metric>
class Family {
 public:
  Family(std::string name, std::string help, std::vector<std::string> label_names,
         std::function<std::unique_ptr<Metric>()> make)
      : name_(std::move(name)),
        help_(std::move(help)),
        label_names_(std::move(label_names)),
        make_(std::move(make)) {}

  // The series for these label values, created on first use. The reference stays valid
  // for the family's lifetime. REQUIRES: values.size() == label names.
  Metric& With(const LabelValues& values) ABSL_LOCKS_EXCLUDED(mu_) {
    absl::MutexLock lock(&mu_);
    std::unique_ptr<Metric>& slot = series_[values];
    if (slot == nullptr) slot = make_();
    return *slot;
  }

  const std::string& name() const { return name_; }
  const std::string& help() const { return help_; }
  const std::vector<std::string>& label_names() const { return label_names_; }
  // Calls `visit` for every series, in label order, under the family's lock.
  void ForEach(const std::function<void(const LabelValues&, const Metric&)>& visit) const
      ABSL_LOCKS_EXCLUDED(mu_) {
    absl::MutexLock lock(&mu_);
    for (const auto& [values, metric] : series_) visit(values, *metric);
  }

 private:
  const std::string name_;
  const std::string help_;
  const std::vector<std::string> label_names_;
  const std::function<std::unique_ptr<Metric>()> make_;
  mutable absl::Mutex mu_;
  std::map<LabelValues, std::unique_ptr<Metric>> series_ ABSL_GUARDED_BY(mu_);
};

// A gauge read when scraped: each call of the collector returns its series.
struct GaugeSample {
  LabelValues label_values;
  double value = 0;
};
using GaugeCollector = std::function<std::vector<GaugeSample>()>;

class Registry {
 public:
  // The Add* calls are for start-up; the returned families live as long as the registry.
  Family<Counter>& AddCounter(const std::string& name, const std::string& help,
                              std::vector<std::string> label_names) ABSL_LOCKS_EXCLUDED(mu_);
  Family<Histogram>& AddHistogram(const std::string& name, const std::string& help,
                                  std::vector<std::string> label_names,
                                  std::vector<double> upper_bounds) ABSL_LOCKS_EXCLUDED(mu_);
  void AddGauge(const std::string& name, const std::string& help,
                std::vector<std::string> label_names, GaugeCollector collect)
      ABSL_LOCKS_EXCLUDED(mu_);

  // Every metric in the text exposition format, in the order they were added.
  std::string Render() const ABSL_LOCKS_EXCLUDED(mu_);

 private:
  struct Gauge {
    std::string name;
    std::string help;
    std::vector<std::string> label_names;
    GaugeCollector collect;
  };
  using Entry = std::variant<std::unique_ptr<Family<Counter>>, std::unique_ptr<Family<Histogram>>,
                             std::unique_ptr<Gauge>>;
  mutable absl::Mutex mu_;
  std::vector<Entry> entries_ ABSL_GUARDED_BY(mu_);
};

// Exponential bucket bounds: start, start*factor, ... (count bounds).
std::vector<double> ExponentialBuckets(double start, double factor, int count);

}  // namespace cds::metrics
