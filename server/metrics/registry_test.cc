#include "server/metrics/registry.h"

#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "grpc/health/v1/health.pb.h"
#include "server/metrics/server_metrics.h"

namespace cds::metrics {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

TEST(RegistryTest, RendersCountersWithEscapedLabels) {
  Registry registry;
  Family<Counter>& calls = registry.AddCounter("calls_total", "Calls.\nAll of them.", {"m"});
  calls.With({"a\"b"}).Increment(2);
  calls.With({"c"}).Increment();
  EXPECT_EQ(registry.Render(),
            "# HELP calls_total Calls.\\nAll of them.\n"
            "# TYPE calls_total counter\n"
            "calls_total{m=\"a\\\"b\"} 2\n"
            "calls_total{m=\"c\"} 1\n");
}

TEST(RegistryTest, RendersCumulativeHistogramBuckets) {
  Registry registry;
  Family<Histogram>& latency = registry.AddHistogram("lat_seconds", "Latency.", {}, {0.1, 1});
  Histogram& h = latency.With({});
  h.Observe(0.05);
  h.Observe(0.1);  // an upper bound is inclusive
  h.Observe(0.5);
  h.Observe(7);
  EXPECT_EQ(registry.Render(),
            "# HELP lat_seconds Latency.\n"
            "# TYPE lat_seconds histogram\n"
            "lat_seconds_bucket{le=\"0.1\"} 2\n"
            "lat_seconds_bucket{le=\"1\"} 3\n"
            "lat_seconds_bucket{le=\"+Inf\"} 4\n"
            "lat_seconds_sum 7.65\n"
            "lat_seconds_count 4\n");
}

TEST(RegistryTest, GaugesAreReadAtScrapeTime) {
  Registry registry;
  int depth = 3;
  registry.AddGauge("depth", "Depth.", {"q"}, [&depth] {
    return std::vector<GaugeSample>{{{"audit"}, static_cast<double>(depth)}};
  });
  EXPECT_THAT(registry.Render(), HasSubstr("depth{q=\"audit\"} 3\n"));
  depth = 5;
  EXPECT_THAT(registry.Render(), HasSubstr("depth{q=\"audit\"} 5\n"));
}

TEST(RegistryTest, CountsFromManyThreadsAddUp) {
  Registry registry;
  Family<Counter>& calls = registry.AddCounter("calls_total", "Calls.", {"m"});
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&calls] {
      for (int i = 0; i < 10000; ++i) calls.With({"x"}).Increment();
    });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(calls.With({"x"}).value(), 40000u);
}

TEST(ServerMetricsTest, UnknownMethodsShareOneLabelSoCallersCannotGrowTheSeries) {
  EXPECT_EQ(LabelsForMethod("/cds.v1.DecisionSupport/Evaluate").service, "cds.v1.DecisionSupport");
  EXPECT_EQ(LabelsForMethod("/cds.v1.DecisionSupport/Evaluate").method, "Evaluate");
  // Linked in, so its descriptor is in the generated pool like in cds-server.
  ASSERT_NE(grpc::health::v1::HealthCheckRequest::descriptor(), nullptr);
  EXPECT_EQ(LabelsForMethod("/grpc.health.v1.Health/Check").method, "Check");
  EXPECT_EQ(LabelsForMethod("/cds.v1.DecisionSupport/Nope").method, "unknown");
  EXPECT_EQ(LabelsForMethod("/PATIENT-12345/x").service, "unknown");
  EXPECT_EQ(LabelsForMethod("garbage").service, "unknown");
}

// The interceptor's per-method cache counts exactly what the label lookups did, from many
// threads at once, and keeps no entry for a method the server does not define.
TEST(ServerMetricsTest, CachedMethodSeriesCountLikeTheLabelLookups) {
  Registry registry;
  ServerMetrics metrics(registry);
  const std::string evaluate = "/cds.v1.DecisionSupport/Evaluate";
  std::shared_ptr<ServerMetrics::MethodSeries> uncached[4];
  EXPECT_EQ(metrics.SeriesFor(evaluate, &uncached[0]), metrics.SeriesFor(evaluate, &uncached[1]));
  EXPECT_EQ(uncached[0], nullptr);  // cached: owned by `metrics`
  EXPECT_EQ(uncached[1], nullptr);
  EXPECT_NE(metrics.SeriesFor("/PATIENT-1/x", &uncached[2]),
            metrics.SeriesFor("/PATIENT-1/x", &uncached[3]));
  EXPECT_NE(uncached[2], nullptr);  // not cached: owned by the caller
  EXPECT_NE(uncached[3], nullptr);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 1000; ++i) {
        std::shared_ptr<ServerMetrics::MethodSeries> none;
        ServerMetrics::MethodSeries* series = metrics.SeriesFor(evaluate, &none);
        metrics.CallFinished(*series, i % 2 ? grpc::StatusCode::OK
                                            : grpc::StatusCode::INVALID_ARGUMENT, 1e-4);
      }
    });
  }
  for (std::thread& t : threads) t.join();
  metrics.CallFinished("/PATIENT-1/x", static_cast<grpc::StatusCode>(99), 1e-4);
  metrics.CallDenied(evaluate, grpc::StatusCode::PERMISSION_DENIED);
  const std::string text = registry.Render();
  const std::string labels =
      "grpc_service=\"cds.v1.DecisionSupport\",grpc_method=\"Evaluate\",grpc_code=";
  EXPECT_THAT(text, HasSubstr("grpc_server_handled_total{" + labels + "\"OK\"} 2000\n"));
  EXPECT_THAT(text,
              HasSubstr("grpc_server_handled_total{" + labels + "\"INVALID_ARGUMENT\"} 2000\n"));
  EXPECT_THAT(text, HasSubstr("grpc_server_handling_seconds_count{" + labels + "\"OK\"} 2000\n"));
  EXPECT_THAT(text, HasSubstr("grpc_server_handled_total{grpc_service=\"unknown\","
                              "grpc_method=\"unknown\",grpc_code=\"UNKNOWN\"} 1\n"));
  EXPECT_THAT(text, HasSubstr("cds_denied_calls_total{" + labels + "\"PERMISSION_DENIED\"} 1\n"));
  EXPECT_THAT(text, Not(HasSubstr("PATIENT")));
}

}  // namespace
}  // namespace cds::metrics
