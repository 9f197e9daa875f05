#include "server/metrics/registry.h"

#include <cmath>
#include <limits>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace cds::metrics {
namespace {

constexpr double kNanos = 1e9;

// Label values and help text are escaped as the exposition format requires.
std::string Escape(const std::string& text, bool quote_too) {
  std::string out;
  out.reserve(text.size());
  for (const char c : text) {
    if (c == '\\') out.append("\\\\");
    else if (c == '\n') out.append("\\n");
    else if (c == '"' && quote_too) out.append("\\\"");
    else out.push_back(c);
  }
  return out;
}

// {a="x",b="y"} plus an optional extra pair (the histogram's "le"); "" without labels.
std::string Labels(const std::vector<std::string>& names, const LabelValues& values,
                   const std::string& extra_name = "", const std::string& extra_value = "") {
  std::string out;
  for (size_t i = 0; i < names.size() && i < values.size(); ++i) {
    absl::StrAppend(&out, out.empty() ? "{" : ",", names[i], "=\"", Escape(values[i], true), "\"");
  }
  if (!extra_name.empty()) {
    absl::StrAppend(&out, out.empty() ? "{" : ",", extra_name, "=\"", extra_value, "\"");
  }
  if (!out.empty()) out.push_back('}');
  return out;
}

std::string Number(double value) {
  if (std::isinf(value)) return value > 0 ? "+Inf" : "-Inf";
  if (std::isnan(value)) return "NaN";
  return absl::StrFormat("%.10g", value);
}

void Header(const std::string& name, const std::string& help, const char* type,
            std::string* out) {
  absl::StrAppend(out, "# HELP ", name, " ", Escape(help, false), "\n# TYPE ", name, " ", type,
                  "\n");
}

}  // namespace

Histogram::Histogram(const std::vector<double>& upper_bounds)
    : upper_bounds_(upper_bounds),
      buckets_(new std::atomic<uint64_t>[upper_bounds.size() + 1]) {
  for (size_t i = 0; i <= upper_bounds_.size(); ++i) buckets_[i].store(0);
}

void Histogram::Observe(double value) {
  size_t bucket = 0;
  while (bucket < upper_bounds_.size() && value > upper_bounds_[bucket]) ++bucket;
  buckets_[bucket].fetch_add(1, std::memory_order_relaxed);
  sum_nanos_.fetch_add(static_cast<int64_t>(std::llround(value * kNanos)),
                       std::memory_order_relaxed);
}

std::vector<uint64_t> Histogram::BucketCounts() const {
  std::vector<uint64_t> counts(upper_bounds_.size() + 1);
  for (size_t i = 0; i < counts.size(); ++i) {
    counts[i] = buckets_[i].load(std::memory_order_relaxed);
  }
  return counts;
}

double Histogram::Sum() const {
  return static_cast<double>(sum_nanos_.load(std::memory_order_relaxed)) / kNanos;
}

Family<Counter>& Registry::AddCounter(const std::string& name, const std::string& help,
                                      std::vector<std::string> label_names) {
  auto family = std::make_unique<Family<Counter>>(name, help, std::move(label_names),
                                                  [] { return std::make_unique<Counter>(); });
  Family<Counter>& ref = *family;
  absl::MutexLock lock(&mu_);
  entries_.emplace_back(std::move(family));
  return ref;
}

Family<Histogram>& Registry::AddHistogram(const std::string& name, const std::string& help,
                                          std::vector<std::string> label_names,
                                          std::vector<double> upper_bounds) {
  auto family = std::make_unique<Family<Histogram>>(
      name, help, std::move(label_names),
      [bounds = std::move(upper_bounds)] { return std::make_unique<Histogram>(bounds); });
  Family<Histogram>& ref = *family;
  absl::MutexLock lock(&mu_);
  entries_.emplace_back(std::move(family));
  return ref;
}

void Registry::AddGauge(const std::string& name, const std::string& help,
                        std::vector<std::string> label_names, GaugeCollector collect) {
  auto gauge = std::make_unique<Gauge>(
      Gauge{name, help, std::move(label_names), std::move(collect)});
  absl::MutexLock lock(&mu_);
  entries_.emplace_back(std::move(gauge));
}

std::string Registry::Render() const {
  std::string out;
  absl::MutexLock lock(&mu_);
  for (const Entry& entry : entries_) {
    if (const auto* counters = std::get_if<std::unique_ptr<Family<Counter>>>(&entry)) {
      const Family<Counter>& family = **counters;
      Header(family.name(), family.help(), "counter", &out);
      family.ForEach([&](const LabelValues& values, const Counter& counter) {
        absl::StrAppend(&out, family.name(), Labels(family.label_names(), values), " ",
                        counter.value(), "\n");
      });
    } else if (const auto* histograms = std::get_if<std::unique_ptr<Family<Histogram>>>(&entry)) {
      const Family<Histogram>& family = **histograms;
      Header(family.name(), family.help(), "histogram", &out);
      family.ForEach([&](const LabelValues& values, const Histogram& histogram) {
        const std::vector<uint64_t> counts = histogram.BucketCounts();
        uint64_t cumulative = 0;
        for (size_t i = 0; i < counts.size(); ++i) {
          cumulative += counts[i];
          const double bound = i < histogram.upper_bounds().size()
                                   ? histogram.upper_bounds()[i]
                                   : std::numeric_limits<double>::infinity();
          absl::StrAppend(&out, family.name(), "_bucket",
                          Labels(family.label_names(), values, "le", Number(bound)), " ",
                          cumulative, "\n");
        }
        absl::StrAppend(&out, family.name(), "_sum", Labels(family.label_names(), values), " ",
                        Number(histogram.Sum()), "\n");
        absl::StrAppend(&out, family.name(), "_count", Labels(family.label_names(), values), " ",
                        cumulative, "\n");
      });
    } else {
      const Gauge& gauge = *std::get<std::unique_ptr<Gauge>>(entry);
      Header(gauge.name, gauge.help, "gauge", &out);
      for (const GaugeSample& sample : gauge.collect()) {
        absl::StrAppend(&out, gauge.name, Labels(gauge.label_names, sample.label_values), " ",
                        Number(sample.value), "\n");
      }
    }
  }
  return out;
}

std::vector<double> ExponentialBuckets(double start, double factor, int count) {
  std::vector<double> bounds;
  double bound = start;
  for (int i = 0; i < count; ++i, bound *= factor) bounds.push_back(bound);
  return bounds;
}

}  // namespace cds::metrics
