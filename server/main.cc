// cds-server: serves cds.v1.DecisionSupport for every rule set found under --rules_dir.
//
// Start-up: load and check every rule-set version (a version that fails to compile or
// fails its embedded cases is logged and not served), then serve with grpc.health.v1
// (NOT_SERVING until at least one rule set is AVAILABLE) and server reflection.
// Shutdown on SIGTERM / SIGINT: health goes NOT_SERVING so load balancers stop sending
// new calls, the server waits --drain, then stops with a deadline for calls in flight.

#include <pthread.h>
#include <signal.h>

#include <chrono>
#include <cstdlib>
#include <memory>
#include <string>
#include <thread>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/grpcpp.h"
#include "grpcpp/health_check_service_interface.h"
#include "server/common/log.h"
#include "server/service/decision_service.h"
#include "server/store/rule_store.h"

ABSL_FLAG(std::string, listen, "127.0.0.1:50051",
          "Address to listen on, HOST:PORT. Port 0 picks a free port (logged at start).");
ABSL_FLAG(std::string, rules_dir, "rules",
          "Directory holding the rule sets, as <rules_dir>/<name>/<version>/.");
ABSL_FLAG(absl::Duration, drain, absl::Seconds(5),
          "On SIGTERM/SIGINT, how long to report NOT_SERVING before stopping, so that "
          "clients and load balancers move away first.");

namespace {

// Calls still running this long after the drain are cancelled.
constexpr absl::Duration kShutdownGrace = absl::Seconds(10);
constexpr char kServiceName[] = "cds.v1.DecisionSupport";

// Splits "host:port" / "[v6]:port" at the last colon; false when there is no port.
bool SplitHostPort(const std::string& address, std::string* host, std::string* port) {
  const size_t colon = address.rfind(':');
  if (colon == std::string::npos || colon + 1 == address.size()) return false;
  *host = address.substr(0, colon);
  *port = address.substr(colon + 1);
  return !host->empty();
}

bool IsLoopback(const std::string& host) {
  return host == "127.0.0.1" || host == "localhost" || host == "[::1]" ||
         host.rfind("127.", 0) == 0;
}

void SetHealth(grpc::Server& server, bool serving) {
  grpc::HealthCheckServiceInterface* health = server.GetHealthCheckService();
  if (health == nullptr) return;
  health->SetServingStatus("", serving);
  health->SetServingStatus(kServiceName, serving);
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "Serves IPEX clinical decision support over gRPC (cds.v1.DecisionSupport).\n"
      "Usage: cds-server [--listen=127.0.0.1:50051] [--rules_dir=rules] [--drain=5s]");
  absl::ParseCommandLine(argc, argv);
  const std::string listen = absl::GetFlag(FLAGS_listen);
  const std::string rules_dir = absl::GetFlag(FLAGS_rules_dir);
  const absl::Duration drain = absl::GetFlag(FLAGS_drain);

  std::string host, port;
  int port_number = 0;
  if (!SplitHostPort(listen, &host, &port) || !absl::SimpleAtoi(port, &port_number) ||
      port_number < 0 || port_number > 65535) {
    cds::log::Error("--listen must be HOST:PORT, got '", listen, "'");
    return 2;
  }
  if (!IsLoopback(host)) {
    // TLS arrives with a later issue; until then anything beyond loopback is plaintext.
    cds::log::Warning("listening on non-loopback ", host,
                      " WITHOUT TLS: traffic (patient findings) is unencrypted");
  }

  // Block the shutdown signals before gRPC starts its threads, so that they inherit the
  // mask and only the waiter thread below ever receives them.
  sigset_t shutdown_signals;
  sigemptyset(&shutdown_signals);
  sigaddset(&shutdown_signals, SIGTERM);
  sigaddset(&shutdown_signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &shutdown_signals, nullptr);

  cds::store::RuleStore store;
  const absl::Time load_start = absl::Now();
  absl::StatusOr<int> available = store.LoadFromDirectory(rules_dir);
  if (!available.ok()) {
    cds::log::Error(available.status().message());
    return 2;
  }
  cds::log::Info("loaded rule sets from ", rules_dir, ": ", *available, " available, ",
                 store.List("").size() - *available, " not served, in ",
                 absl::FormatDuration(absl::Now() - load_start));

  cds::service::DecisionServiceImpl service(store);
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  int selected_port = 0;
  builder.AddListeningPort(listen, grpc::InsecureServerCredentials(), &selected_port);
  builder.RegisterService(&service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || selected_port == 0) {
    cds::log::Error("cannot listen on ", listen);
    return 2;
  }
  // gRPC's default health service starts out SERVING and can only be set once the server
  // runs, so set it before anything announces the port.
  SetHealth(*server, *available > 0);
  if (*available == 0) {
    cds::log::Error("no rule set is available: health is NOT_SERVING and Evaluate returns "
                    "UNAVAILABLE");
  }
  // Tests start the server on port 0 and read the chosen port from this line.
  cds::log::Info("listening on ", host, ":", selected_port);

  std::thread waiter([&] {
    int signal_number = 0;
    sigwait(&shutdown_signals, &signal_number);
    cds::log::Info("received signal ", signal_number, ": draining for ",
                   absl::FormatDuration(drain));
    SetHealth(*server, false);
    absl::SleepFor(drain);
    cds::log::Info("shutting down");
    server->Shutdown(absl::ToChronoTime(absl::Now() + kShutdownGrace));
  });
  server->Wait();
  waiter.join();
  cds::log::Info("stopped");
  return 0;
}
