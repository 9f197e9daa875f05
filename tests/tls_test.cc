// Transport security against the real cds-server (issue 6, part 1), with certificates made
// in each test by scripts/make-dev-certs.sh: TLS, mutual TLS (no client certificate, a
// certificate from another CA), certificate reload without a restart, the start-up
// refusals (no transport chosen, plaintext beyond loopback, half a key pair), and cdsctl's
// --tls_ca / --tls_cert / --tls_key.

#include <signal.h>

#include <chrono>
#include <filesystem>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "tests/test_util.h"

namespace cds {
namespace {

using ::cds::testing::CommandResult;
using ::cds::testing::ReadFileOrEmpty;
using ::cds::testing::RunCommand;
using ::cds::testing::ServerProcess;
using ::cds::testing::TempDir;
using ::grpc::health::v1::HealthCheckRequest;
using ::grpc::health::v1::HealthCheckResponse;

const std::string kSourceDir = CDS_SOURCE_DIR;

// A CA, a server certificate and client certificates `clients` in `dir`.
void MakeCerts(const std::string& dir, const std::vector<std::string>& clients) {
  std::vector<std::string> argv = {"/bin/bash", kSourceDir + "/scripts/make-dev-certs.sh", dir};
  argv.insert(argv.end(), clients.begin(), clients.end());
  const CommandResult result = RunCommand(argv);
  ASSERT_EQ(result.exit_code, 0) << result.err;
}

std::vector<std::string> BaseFlags() {
  return {"--listen", "127.0.0.1:0", "--rules_dir", kSourceDir + "/rules", "--drain", "0s",
          "--poll_interval", "0"};
}

std::shared_ptr<grpc::ChannelCredentials> Tls(const std::string& ca, const std::string& cert = "",
                                              const std::string& key = "") {
  grpc::SslCredentialsOptions ssl;
  ssl.pem_root_certs = ReadFileOrEmpty(ca);
  if (!cert.empty()) ssl.pem_cert_chain = ReadFileOrEmpty(cert);
  if (!key.empty()) ssl.pem_private_key = ReadFileOrEmpty(key);
  return grpc::SslCredentials(ssl);
}

// grpc.health.v1 Check over a fresh channel; the status of the call.
grpc::Status Check(const std::string& address,
                   const std::shared_ptr<grpc::ChannelCredentials>& credentials) {
  grpc::ChannelArguments args;
  // A fresh connection per check, so a reloaded certificate is seen.
  args.SetInt("grpc.use_local_subchannel_pool", 1);
  auto channel = grpc::CreateCustomChannel(address, credentials, args);
  auto stub = grpc::health::v1::Health::NewStub(channel);
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  HealthCheckResponse response;
  grpc::Status status = stub->Check(&context, HealthCheckRequest(), &response);
  if (status.ok() && response.status() != HealthCheckResponse::SERVING) {
    return grpc::Status(grpc::StatusCode::UNKNOWN, "not serving");
  }
  return status;
}

TEST(TlsTest, ServesTlsAndRefusesPlaintextClients) {
  TempDir dir;
  MakeCerts(dir.path(), {});
  std::vector<std::string> flags = BaseFlags();
  flags.insert(flags.end(), {"--tls_cert", dir.path() + "/server.pem", "--tls_key",
                             dir.path() + "/server.key"});
  ServerProcess server;
  std::string error;
  ASSERT_TRUE(server.Start(CDS_SERVER_BINARY, flags, &error)) << error;
  EXPECT_TRUE(absl::StrContains(server.Stderr(), "transport: TLS")) << server.Stderr();
  const grpc::Status tls = Check(server.address(), Tls(dir.path() + "/ca.pem"));
  EXPECT_TRUE(tls.ok()) << tls.error_message();
  EXPECT_FALSE(Check(server.address(), grpc::InsecureChannelCredentials()).ok());
  // A client trusting another CA does not accept the server.
  TempDir other;
  MakeCerts(other.path(), {});
  EXPECT_FALSE(Check(server.address(), Tls(other.path() + "/ca.pem")).ok());
}

TEST(TlsTest, MutualTlsNeedsAClientCertificateFromTheConfiguredCa) {
  TempDir dir;
  MakeCerts(dir.path(), {"alice"});
  TempDir other;
  MakeCerts(other.path(), {"mallory"});
  std::vector<std::string> flags = BaseFlags();
  flags.insert(flags.end(), {"--tls_cert", dir.path() + "/server.pem", "--tls_key",
                             dir.path() + "/server.key", "--tls_client_ca", dir.path() + "/ca.pem"});
  ServerProcess server;
  std::string error;
  ASSERT_TRUE(server.Start(CDS_SERVER_BINARY, flags, &error)) << error;
  EXPECT_TRUE(absl::StrContains(server.Stderr(), "transport: mutual TLS")) << server.Stderr();
  const std::string ca = dir.path() + "/ca.pem";
  const grpc::Status alice =
      Check(server.address(), Tls(ca, dir.path() + "/alice.pem", dir.path() + "/alice.key"));
  EXPECT_TRUE(alice.ok()) << alice.error_message();
  EXPECT_FALSE(Check(server.address(), Tls(ca)).ok()) << "no client certificate";
  EXPECT_FALSE(
      Check(server.address(), Tls(ca, other.path() + "/mallory.pem", other.path() + "/mallory.key"))
          .ok())
      << "a client certificate from another CA";
  EXPECT_FALSE(Check(server.address(), grpc::InsecureChannelCredentials()).ok());
}

TEST(TlsTest, ReloadsRenewedCertificatesWithoutRestart) {
  TempDir first;
  MakeCerts(first.path(), {"alice"});
  TempDir second;
  MakeCerts(second.path(), {"alice"});
  TempDir live;  // the files the server watches
  for (const char* name : {"server.pem", "server.key", "ca.pem"}) {
    std::filesystem::copy_file(first.path() + "/" + name, live.path() + "/" + name);
  }
  std::vector<std::string> flags = BaseFlags();
  flags.insert(flags.end(), {"--tls_cert", live.path() + "/server.pem", "--tls_key",
                             live.path() + "/server.key", "--tls_client_ca",
                             live.path() + "/ca.pem", "--tls_refresh", "1s"});
  ServerProcess server;
  std::string error;
  ASSERT_TRUE(server.Start(CDS_SERVER_BINARY, flags, &error)) << error;
  auto first_client = [&] {
    return Tls(first.path() + "/ca.pem", first.path() + "/alice.pem", first.path() + "/alice.key");
  };
  auto second_client = [&] {
    return Tls(second.path() + "/ca.pem", second.path() + "/alice.pem",
               second.path() + "/alice.key");
  };
  ASSERT_TRUE(Check(server.address(), first_client()).ok());
  EXPECT_FALSE(Check(server.address(), second_client()).ok());

  // Renew everything (a new CA, server and client certificates), replacing each file
  // atomically as a deployment tool would.
  for (const char* name : {"server.pem", "server.key", "ca.pem"}) {
    const std::string tmp = live.path() + "/." + name + ".new";
    std::filesystem::copy_file(second.path() + "/" + name, tmp);
    std::filesystem::rename(tmp, live.path() + "/" + name);
  }
  bool switched = false;
  for (int i = 0; i < 100 && !switched; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    switched = Check(server.address(), second_client()).ok();
  }
  EXPECT_TRUE(switched) << "the renewed certificates were not picked up";
  EXPECT_FALSE(Check(server.address(), first_client()).ok());
  EXPECT_GT(server.pid(), 0);  // same process throughout
  EXPECT_EQ(server.Stop(SIGTERM), 0);
}

// Runs cds-server with `flags` (no automatic --insecure_dev) and expects it to refuse to
// start with exit code 2 and a message containing `mention`.
void ExpectRefusedAtStart(const std::vector<std::string>& flags, const std::string& mention) {
  std::vector<std::string> argv = {CDS_SERVER_BINARY};
  argv.insert(argv.end(), flags.begin(), flags.end());
  const CommandResult result = RunCommand(argv);
  EXPECT_EQ(result.exit_code, 2) << result.err;
  EXPECT_TRUE(absl::StrContains(result.err, mention)) << result.err;
  EXPECT_FALSE(absl::StrContains(result.err, "listening on")) << result.err;
}

TEST(TlsTest, RefusesToStartWithoutAnExplicitSafeTransport) {
  TempDir dir;
  MakeCerts(dir.path(), {});
  const std::string rules = kSourceDir + "/rules";
  const std::string cert = dir.path() + "/server.pem";
  const std::string key = dir.path() + "/server.key";
  ExpectRefusedAtStart({"--listen", "127.0.0.1:0", "--rules_dir", rules}, "no transport");
  ExpectRefusedAtStart({"--listen", "0.0.0.0:0", "--rules_dir", rules, "--insecure_dev"},
                       "loopback");
  ExpectRefusedAtStart({"--listen", "127.0.0.1:0", "--rules_dir", rules, "--tls_cert", cert},
                       "--tls_key");
  ExpectRefusedAtStart({"--listen", "127.0.0.1:0", "--rules_dir", rules, "--tls_cert", cert,
                        "--tls_key", key, "--insecure_dev"},
                       "exclusive");
  ExpectRefusedAtStart({"--listen", "127.0.0.1:0", "--rules_dir", rules, "--tls_cert",
                        dir.path() + "/missing.pem", "--tls_key", key},
                       "cannot read");
  ExpectRefusedAtStart({"--listen", "127.0.0.1:0", "--rules_dir", rules, "--tls_cert", key,
                        "--tls_key", key},
                       "CERTIFICATE");
  ExpectRefusedAtStart({"--listen", "127.0.0.1:0", "--rules_dir", rules, "--tls_client_ca",
                        dir.path() + "/ca.pem", "--insecure_dev"},
                       "--tls_client_ca");
}

TEST(TlsTest, CdsctlSpeaksMutualTls) {
  TempDir dir;
  MakeCerts(dir.path(), {"alice"});
  std::vector<std::string> flags = BaseFlags();
  flags.insert(flags.end(), {"--tls_cert", dir.path() + "/server.pem", "--tls_key",
                             dir.path() + "/server.key", "--tls_client_ca", dir.path() + "/ca.pem"});
  ServerProcess server;
  std::string error;
  ASSERT_TRUE(server.Start(CDS_SERVER_BINARY, flags, &error)) << error;
  const std::vector<std::string> tls = {"--tls_ca", dir.path() + "/ca.pem", "--tls_cert",
                                        dir.path() + "/alice.pem", "--tls_key",
                                        dir.path() + "/alice.key"};
  std::vector<std::string> health = {CDSCTL_BINARY, "health", "--server", server.address()};
  std::vector<std::string> with_tls = health;
  with_tls.insert(with_tls.end(), tls.begin(), tls.end());
  CommandResult result = RunCommand(with_tls);
  EXPECT_EQ(result.exit_code, 0) << result.out << result.err;

  std::vector<std::string> evaluate = {CDSCTL_BINARY, "evaluate",
                                       kSourceDir + "/client/examples/triad_boy.json",
                                       "--server", server.address()};
  evaluate.insert(evaluate.end(), tls.begin(), tls.end());
  result = RunCommand(evaluate);
  EXPECT_EQ(result.exit_code, 0) << result.out << result.err;

  // Without a client certificate, or in plaintext: unreachable (exit 4).
  result = RunCommand({CDSCTL_BINARY, "health", "--server", server.address(), "--tls_ca",
                       dir.path() + "/ca.pem", "--deadline", "2s"});
  EXPECT_EQ(result.exit_code, 4) << result.out << result.err;
  result = RunCommand({CDSCTL_BINARY, "health", "--server", server.address(), "--deadline", "2s"});
  EXPECT_EQ(result.exit_code, 4) << result.out << result.err;
  // Half a key pair is a usage error.
  result = RunCommand({CDSCTL_BINARY, "health", "--server", server.address(), "--tls_ca",
                       dir.path() + "/ca.pem", "--tls_cert", dir.path() + "/alice.pem"});
  EXPECT_EQ(result.exit_code, 2) << result.out << result.err;
}

}  // namespace
}  // namespace cds
