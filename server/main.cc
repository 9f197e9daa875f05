// cds-server: serves cds.v1.DecisionSupport for every rule set found under --rules_dir.
//
// Start-up: load and check every rule-set version (a version that fails to compile or
// fails its embedded cases is logged and not served), then serve with grpc.health.v1
// (NOT_SERVING until at least one rule set is AVAILABLE) and server reflection.
// Rule-set lifecycle: bundles must be signed by a key in --trusted_keys_dir (unless
// --allow_unsigned, development only); cds.v1.RuleSetAdmin publishes bundles, moves labels
// and retires versions, persisted under --state_dir; the rules directory is rescanned for
// complete new bundles every --poll_interval and on SIGHUP.
// Shutdown on SIGTERM / SIGINT: health goes NOT_SERVING at once (after an optional
// --drain during which new calls are still accepted), new calls are refused with
// UNAVAILABLE, calls in flight get --grace_period to finish, then the process exits 0.
// Observability: JSON log lines on stderr (--log_level), Prometheus metrics on
// --metrics_listen.

#include <malloc.h>
#include <pthread.h>
#include <signal.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/synchronization/mutex.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/grpcpp.h"
#include "server/audit/audit_log.h"
#include "server/common/host_port.h"
#include "server/common/log.h"
#include "server/metrics/http_exposer.h"
#include "server/metrics/registry.h"
#include "server/metrics/server_metrics.h"
#include "server/security/authz.h"
#include "server/security/transport.h"
#include "server/service/audit_service.h"
#include "server/service/auditor.h"
#include "server/service/decision_service.h"
#include "server/service/health_service.h"
#include "server/service/noop_service.h"
#include "server/store/rule_store.h"

ABSL_FLAG(std::string, listen, "127.0.0.1:50051",
          "Address to listen on, HOST:PORT. Port 0 picks a free port (logged at start).");
ABSL_FLAG(std::string, rules_dir, "rules",
          "Directory holding the rule sets, as <rules_dir>/<name>/<version>/.");
ABSL_FLAG(std::string, trusted_keys_dir, "",
          "Directory of trusted Ed25519 public keys (*.pub, PEM or base64), re-read before "
          "each publish and scan. Default: <rules_dir>/keys.");
ABSL_FLAG(bool, allow_unsigned, false,
          "DEVELOPMENT ONLY: accept rule-set bundles without MANIFEST/MANIFEST.sig (logged "
          "loudly at start and for every such version).");
ABSL_FLAG(std::string, state_dir, "",
          "Where published bundles, labels and retirements are persisted (created if "
          "missing). Empty: the admin RPCs are refused.");
ABSL_FLAG(int32_t, keep_versions, 10,
          "Retention: per rule set, besides the versions a label points at and the default "
          "one, only this many of the highest loaded versions stay in memory; older ones are "
          "UNLOADED (listed, not served; their bundles stay in --state_dir). 0: keep all.");
ABSL_FLAG(absl::Duration, poll_interval, absl::Seconds(30),
          "How often to look for complete new bundles under --rules_dir (0: never; SIGHUP "
          "always triggers a look).");
ABSL_FLAG(int32_t, max_request_bytes, 16 << 20,
          "Largest request message accepted, in bytes (larger ones get RESOURCE_EXHAUSTED "
          "before any of our code runs). Rule-set bundles are the largest requests.");
ABSL_FLAG(bool, noop_baseline, false,
          "BENCHMARKS ONLY: Evaluate evaluates the first successful call and answers every "
          "later one with a copy of that response (the baseline of bench/load_generator). "
          "Never for clinical use.");
ABSL_FLAG(std::string, tls_cert, "",
          "PEM certificate chain of the server (with --tls_key): serve TLS. Re-read every "
          "--tls_refresh, so a renewed certificate takes effect without a restart.");
ABSL_FLAG(std::string, tls_key, "", "PEM private key for --tls_cert.");
ABSL_FLAG(std::string, tls_client_ca, "",
          "PEM CA bundle: require mutual TLS, accepting client certificates it signed.");
ABSL_FLAG(absl::Duration, tls_refresh, absl::Minutes(1),
          "How often the TLS files are checked for changes.");
ABSL_FLAG(std::string, policy, "",
          "Access policy (cds.v1.AccessPolicy, text format) mapping client-certificate "
          "identities to roles clinical / author / admin; needs TLS. Empty: every caller "
          "the transport admits may call every method.");
ABSL_FLAG(std::string, audit_db, "",
          "SQLite database of the audit trail (created if missing; WAL), with its journal "
          "FILE.journal beside it. Every call (health checks aside), denied and failed ones "
          "included, is recorded in the journal before it is answered and imported into the "
          "database in the background; a call whose record cannot be written fails with "
          "UNAVAILABLE. "
          "Admins query it with AuditService.QueryAudit (cdsctl audit). Empty: no audit "
          "trail (QueryAudit is FAILED_PRECONDITION).");
ABSL_FLAG(absl::Duration, audit_sync_interval, absl::Seconds(1),
          "How far the audit trail on disk may lag the answered calls. Each call's record "
          "is written to the audit journal before the call is answered (a crash of the "
          "server loses none), and a background thread fsyncs the journal at most this long "
          "later (and imports it into the database as often); a power failure or kernel "
          "crash can lose at most this much. 0: fsync every journal write before answering "
          "its calls (slower at low concurrency).");
ABSL_FLAG(std::string, audit_key_file, "",
          "Secret (at least 32 bytes) keying the HMAC-SHA256 pseudonyms of patient "
          "references in the audit trail. Required with --audit_db.");
ABSL_FLAG(bool, insecure_dev, false,
          "DEVELOPMENT ONLY: serve plaintext (no TLS); refused unless --listen is a loopback "
          "address.");
ABSL_FLAG(absl::Duration, drain, absl::ZeroDuration(),
          "On SIGTERM/SIGINT, how long to keep accepting new calls while health already "
          "reports NOT_SERVING, for load balancers that only learn from health checks "
          "(Kubernetes: prefer a preStop delay). 0: refuse new calls at once.");
ABSL_FLAG(absl::Duration, grace_period, absl::Seconds(10),
          "On SIGTERM/SIGINT, how long calls in flight get to finish after new calls are "
          "refused (UNAVAILABLE); calls still running then are cancelled.");
ABSL_FLAG(std::string, metrics_listen, "",
          "HOST:PORT for Prometheus metrics over plain HTTP at /metrics (e.g. "
          "0.0.0.0:9464); empty: no metrics endpoint.");
ABSL_FLAG(std::string, log_level, "info",
          "Lowest level of the JSON log lines on stderr: debug, info, warning or error.");

namespace {

constexpr char kServiceName[] = "cds.v1.DecisionSupport";

// Tests only: CDS_TEST_PAUSE_AT=<step> stops the process at that persistence step (it logs
// "test hook: paused at <step>" and sleeps until killed), so a test can SIGKILL a server in
// the middle of a publish.
std::function<void(absl::string_view)> PauseHookFromEnvironment() {
  const char* step = std::getenv("CDS_TEST_PAUSE_AT");
  if (step == nullptr || *step == '\0') return nullptr;
  const std::string wanted = step;
  cds::log::Warning("CDS_TEST_PAUSE_AT=", wanted, ": test hook armed");
  return [wanted](absl::string_view at) {
    if (at != wanted) return;
    cds::log::Warning("test hook: paused at ", at);
    while (true) absl::SleepFor(absl::Hours(1));
  };
}

}  // namespace

int main(int argc, char** argv) {
  // glibc gives each thread that allocates its own malloc arena, up to 8 per core; gRPC's
  // pollers, callback threads and the audit writer each then keep freed memory of their
  // own. One arena per core (at least 2) measured 60-61 MiB resident instead of 67 MiB
  // with 10 versions under load (bench/memory.sh); QPS against a 16-arena twin, alternated
  // in one load_generator run: 1.00 (1 in flight) and 1.05 (64 in flight).
  // Set before any thread starts; MALLOC_ARENA_MAX in the environment still overrides it.
  if (std::getenv("MALLOC_ARENA_MAX") == nullptr) {
    mallopt(M_ARENA_MAX, static_cast<int>(std::max(2u, std::thread::hardware_concurrency())));
  }
  // Debian builds Abseil without NDEBUG, which leaves Mutex deadlock detection on: every
  // Lock then updates a global lock-order graph (GraphCycles::GetId showed in the profile
  // of every call). The tests keep it; the server does not pay for it.
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
  absl::SetProgramUsageMessage(
      "Serves IPEX clinical decision support over gRPC (cds.v1.DecisionSupport).\n"
      "Usage: cds-server [--listen=127.0.0.1:50051] [--rules_dir=rules] [--state_dir=DIR]\n"
      "                  [--trusted_keys_dir=DIR] [--poll_interval=30s] [--grace_period=10s]\n"
      "                  [--metrics_listen=HOST:PORT] [--log_level=info]\n"
      "                  (--tls_cert=PEM --tls_key=PEM [--tls_client_ca=PEM] | --insecure_dev)");
  absl::ParseCommandLine(argc, argv);
  if (cds::log::Level level; cds::log::ParseLevel(absl::GetFlag(FLAGS_log_level), &level)) {
    cds::log::SetMinLevel(level);
  } else {
    cds::log::Error("--log_level must be debug, info, warning or error");
    return 2;
  }
  const std::string listen = absl::GetFlag(FLAGS_listen);
  const std::string rules_dir = absl::GetFlag(FLAGS_rules_dir);
  const absl::Duration drain = absl::GetFlag(FLAGS_drain);
  const absl::Duration grace_period = absl::GetFlag(FLAGS_grace_period);
  const absl::Duration poll_interval = absl::GetFlag(FLAGS_poll_interval);
  std::string trusted_keys_dir = absl::GetFlag(FLAGS_trusted_keys_dir);
  if (trusted_keys_dir.empty()) trusted_keys_dir = rules_dir + "/keys";

  const absl::StatusOr<cds::common::HostPort> listen_at =
      cds::common::ParseHostPort(listen, "--listen");
  if (!listen_at.ok()) {
    cds::log::Error(listen_at.status().message());
    return 2;
  }
  const std::string& host = listen_at->host;

  // Block the shutdown signals before gRPC starts its threads, so that they inherit the
  // mask and only the waiter thread below ever receives them.
  sigset_t shutdown_signals;
  sigemptyset(&shutdown_signals);
  sigaddset(&shutdown_signals, SIGTERM);
  sigaddset(&shutdown_signals, SIGINT);
  sigaddset(&shutdown_signals, SIGHUP);
  pthread_sigmask(SIG_BLOCK, &shutdown_signals, nullptr);

  // After the signal mask: the certificate provider starts a file-watching thread.
  cds::security::TransportOptions transport;
  transport.tls_cert = absl::GetFlag(FLAGS_tls_cert);
  transport.tls_key = absl::GetFlag(FLAGS_tls_key);
  transport.tls_client_ca = absl::GetFlag(FLAGS_tls_client_ca);
  transport.insecure_dev = absl::GetFlag(FLAGS_insecure_dev);
  transport.refresh = absl::GetFlag(FLAGS_tls_refresh);
  // With a policy, callers without a certificate get UNAUTHENTICATED from it (or use a
  // development bearer token) instead of a failed handshake.
  transport.client_cert_optional = !absl::GetFlag(FLAGS_policy).empty();
  absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> credentials =
      cds::security::MakeServerCredentials(transport, host);
  if (!credentials.ok()) {
    cds::log::Error(credentials.status().message());
    return 2;
  }
  if (transport.insecure_dev) {
    cds::log::Warning("--insecure_dev: PLAINTEXT on ", host, ", for development only");
  }
  // Metrics exist from the start so that denied calls are counted too; the HTTP endpoint
  // opens once the server runs.
  cds::metrics::Registry metrics_registry;
  cds::metrics::ServerMetrics server_metrics(metrics_registry);

  // The audit trail, opened before anything can be called.
  std::unique_ptr<cds::audit::AuditSink> audit_sink;
  std::unique_ptr<cds::service::Auditor> auditor;
  if (const std::string audit_db = absl::GetFlag(FLAGS_audit_db); !audit_db.empty()) {
    absl::StatusOr<cds::audit::Pseudonymizer> pseudonymizer =
        cds::audit::Pseudonymizer::FromKeyFile(absl::GetFlag(FLAGS_audit_key_file));
    if (!pseudonymizer.ok()) {
      cds::log::Error(pseudonymizer.status().message());
      return 2;
    }
    cds::audit::SqliteAuditOptions audit_options;
    audit_options.path = audit_db;
    audit_options.sync_interval = absl::GetFlag(FLAGS_audit_sync_interval);
    if (audit_options.sync_interval < absl::ZeroDuration()) {
      cds::log::Error("--audit_sync_interval must not be negative");
      return 2;
    }
    // Tests only: a slow audit disk.
    if (const char* delay = std::getenv("CDS_TEST_AUDIT_COMMIT_DELAY"); delay != nullptr) {
      if (absl::ParseDuration(delay, &audit_options.commit_delay)) {
        cds::log::Warning("CDS_TEST_AUDIT_COMMIT_DELAY=", delay, ": test hook armed");
      }
    }
    // Tests only: a full audit disk.
    if (const char* pages = std::getenv("CDS_TEST_AUDIT_MAX_PAGES"); pages != nullptr) {
      if (absl::SimpleAtoi(pages, &audit_options.max_pages)) {
        cds::log::Warning("CDS_TEST_AUDIT_MAX_PAGES=", pages, ": test hook armed");
      }
    }
    absl::StatusOr<std::unique_ptr<cds::audit::AuditSink>> sink =
        cds::audit::OpenSqliteAudit(audit_options);
    if (!sink.ok()) {
      cds::log::Error(sink.status().message());
      return 2;
    }
    audit_sink = *std::move(sink);
    auditor = std::make_unique<cds::service::Auditor>(*audit_sink, *std::move(pseudonymizer));
    cds::log::Info("audit trail in ", audit_db);
  }
  if (const std::string policy_file = absl::GetFlag(FLAGS_policy); !policy_file.empty()) {
    if (transport.insecure_dev) {
      cds::log::Error("--policy needs TLS (--tls_cert, --tls_key, --tls_client_ca)");
      return 2;
    }
    absl::StatusOr<std::shared_ptr<const cds::security::AccessPolicy>> policy =
        cds::security::AccessPolicy::FromFile(policy_file);
    if (!policy.ok()) {
      cds::log::Error(policy.status().message());
      return 2;
    }
    cds::audit::AuditSink* sink = audit_sink.get();
    cds::security::PolicyAuthProcessor::OnDenied on_denied =
        [sink, &server_metrics](const std::string& caller, const std::string& method,
                                grpc::StatusCode code) {
          server_metrics.CallDenied(method, code);
          if (sink == nullptr) return;
          cds::audit::AuditRecord record;
          record.time = absl::Now();
          record.caller = caller;
          record.method = method;
          record.status_code = static_cast<int>(code);
          sink->Record(std::move(record)).IgnoreError();  // denied either way
        };
    (*credentials)->SetAuthMetadataProcessor(std::make_shared<cds::security::PolicyAuthProcessor>(
        *std::move(policy), std::move(on_denied)));
    cds::log::Info("access policy from ", policy_file);
  } else if (!transport.insecure_dev) {
    cds::log::Warning("no --policy: every caller the transport admits may call every method");
  }

  // Health follows the number of AVAILABLE versions (NOT_SERVING until the first), and
  // turns NOT_SERVING for good on SIGTERM.
  cds::service::HealthService health({"", kServiceName});
  std::atomic<bool> draining{false};
  cds::store::RuleStore::Options options;
  options.trusted_keys_dir = trusted_keys_dir;
  options.allow_unsigned = absl::GetFlag(FLAGS_allow_unsigned);
  options.state_dir = absl::GetFlag(FLAGS_state_dir);
  options.keep_versions = std::max<int32_t>(0, absl::GetFlag(FLAGS_keep_versions));
  options.ontology_dir = rules_dir + "/ontology";
  options.persistence_hook = PauseHookFromEnvironment();
  options.on_change = [&health, &draining](int available_now) {
    if (!draining.load()) health.SetServing(available_now > 0);
  };
  cds::store::RuleStore store(options);
  const absl::Time load_start = absl::Now();
  absl::StatusOr<int> available = store.LoadFromDirectory(rules_dir);
  if (!available.ok()) {
    cds::log::Error(available.status().message());
    return 2;
  }
  available = store.RestoreState();
  if (!available.ok()) {
    cds::log::Error("cannot restore --state_dir: ", available.status().message());
    return 2;
  }
  if (options.state_dir.empty()) {
    cds::log::Info("no --state_dir: PublishRuleSet, SetLabel and RetireRuleSet are refused");
  }
  cds::log::Info("loaded rule sets from ", rules_dir, ": ", *available, " available, ",
                 store.List("").size() - *available, " not served, in ",
                 absl::FormatDuration(absl::Now() - load_start));

  cds::service::DecisionServiceImpl service(store);
  cds::service::RuleSetAdminImpl admin(store);
  service.set_auditor(auditor.get());
  admin.set_auditor(auditor.get());
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  int selected_port = 0;
  builder.AddListeningPort(listen, *credentials, &selected_port);
  builder.SetMaxReceiveMessageSize(absl::GetFlag(FLAGS_max_request_bytes));
  {
    std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>> creators;
    creators.push_back(server_metrics.NewInterceptorFactory());
    builder.experimental().SetInterceptorCreators(std::move(creators));
  }
  cds::metrics::AddRuleStoreGauges(store, metrics_registry);
  metrics_registry.AddGauge(
      "cds_audit_queue_depth",
      "Audit records not yet in the audit database: waiting for the journal or for their "
      "import (0 without --audit_db).",
      {}, [sink = audit_sink.get()] {
        return std::vector<cds::metrics::GaugeSample>{
            {{}, sink == nullptr ? 0.0 : static_cast<double>(sink->QueueDepth())}};
      });
  cds::metrics::AddProcessGauges(metrics_registry);
  cds::service::NoopDecisionService noop(store);
  if (absl::GetFlag(FLAGS_noop_baseline)) {
    cds::log::Warning("--noop_baseline: Evaluate answers every call with the first response "
                      "(benchmarks only)");
    builder.RegisterService(&noop);
  } else {
    builder.RegisterService(&service);
  }
  builder.RegisterService(&admin);
  builder.RegisterService(&health);
  cds::service::AuditServiceImpl audit_service(auditor.get());
  builder.RegisterService(&audit_service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || selected_port == 0) {
    cds::log::Error("cannot listen on ", listen);
    return 2;
  }
  health.SetServing(store.AvailableCount() > 0);
  if (*available == 0) {
    cds::log::Error("no rule set is available: health is NOT_SERVING and Evaluate returns "
                    "UNAVAILABLE");
  }
  std::unique_ptr<cds::metrics::HttpExposer> metrics_exposer;
  if (const std::string address = absl::GetFlag(FLAGS_metrics_listen); !address.empty()) {
    absl::StatusOr<std::unique_ptr<cds::metrics::HttpExposer>> exposer =
        cds::metrics::HttpExposer::Start(address, metrics_registry);
    if (!exposer.ok()) {
      cds::log::Error(exposer.status().message());
      server->Shutdown(absl::ToChronoTime(absl::Now()));
      return 2;
    }
    metrics_exposer = *std::move(exposer);
    // Before "listening on", so that whoever waits for that line can read this one.
    cds::log::Info("metrics on http://", address.substr(0, address.rfind(':')), ":",
                   metrics_exposer->port(), "/metrics");
  }
  cds::log::Info("transport: ", cds::security::Describe(transport));
  // Tests start the server on port 0 and read the chosen port from this line.
  cds::log::Info("listening on ", host, ":", selected_port);

  absl::Notification stop_polling;
  std::thread poller([&] {
    if (poll_interval <= absl::ZeroDuration()) return;
    while (!stop_polling.WaitForNotificationWithTimeout(poll_interval)) {
      const int added = store.ScanRulesDir();
      if (added > 0) cds::log::Info("rules directory scan: ", added, " new version(s)");
    }
  });

  std::thread waiter([&] {
    int signal_number = 0;
    while (true) {
      sigwait(&shutdown_signals, &signal_number);
      if (signal_number != SIGHUP) break;
      const int added = store.ScanRulesDir();
      cds::log::Info("SIGHUP: rules directory scanned, ", added, " new version(s)");
    }
    // Health first, so that probes and client-side health checks move callers away;
    // then stop accepting (new calls get UNAVAILABLE) and give calls in flight the grace
    // period before they are cancelled.
    cds::log::Info("received signal ", signal_number, ": health NOT_SERVING, drain ",
                   absl::FormatDuration(drain), ", grace period ",
                   absl::FormatDuration(grace_period));
    draining.store(true);
    stop_polling.Notify();
    health.SetServing(false);
    absl::SleepFor(drain);
    cds::log::Info("refusing new calls; waiting for calls in flight");
    health.Shutdown();  // ends health watches, which would otherwise hold up Shutdown
    server->Shutdown(absl::ToChronoTime(absl::Now() + grace_period));
  });
  server->Wait();
  waiter.join();
  poller.join();
  cds::log::Info("stopped");
  return 0;
}
