#include "server/common/host_port.h"

#include "gtest/gtest.h"

namespace cds::common {
namespace {

TEST(HostPortTest, SplitsAtTheLastColon) {
  absl::StatusOr<HostPort> v4 = ParseHostPort("127.0.0.1:50051", "--listen");
  ASSERT_TRUE(v4.ok()) << v4.status();
  EXPECT_EQ(v4->host, "127.0.0.1");
  EXPECT_EQ(v4->port, 50051);
  absl::StatusOr<HostPort> v6 = ParseHostPort("[::1]:0", "--listen");
  ASSERT_TRUE(v6.ok()) << v6.status();
  EXPECT_EQ(v6->host, "[::1]");
  EXPECT_EQ(v6->port, 0);
  EXPECT_EQ(Unbracketed(v6->host), "::1");
  EXPECT_EQ(Unbracketed("localhost"), "localhost");
}

TEST(HostPortTest, RefusesWhatIsNotHostColonPort) {
  for (const char* bad : {"", "50051", ":50051", "localhost:", "localhost:http", "host:-1",
                          "host:65536", "host:1x"}) {
    absl::StatusOr<HostPort> parsed = ParseHostPort(bad, "--metrics_listen");
    ASSERT_FALSE(parsed.ok()) << bad;
    EXPECT_EQ(parsed.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_EQ(parsed.status().message(),
              std::string("--metrics_listen must be HOST:PORT, got '") + bad + "'");
  }
}

}  // namespace
}  // namespace cds::common
