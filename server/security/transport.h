#pragma once

// How cds-server listens: TLS (server certificate and key from files), mutual TLS (also a
// client CA: every client must present a certificate it signed), or — for development
// only — plaintext on a loopback address behind an explicit flag. Certificates and the
// client CA are re-read from their files every `refresh` (gRPC's
// FileWatcherCertificateProvider), so renewed certificates take effect without a restart.

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "grpcpp/security/server_credentials.h"

namespace cds::security {

struct TransportOptions {
  std::string tls_cert;       // PEM certificate chain
  std::string tls_key;        // PEM private key
  std::string tls_client_ca;  // PEM CA bundle; non-empty: mutual TLS required
  bool insecure_dev = false;  // plaintext, loopback only
  // With tls_client_ca: verify a client certificate when one is presented, but let
  // callers without one connect (an access policy then answers them UNAUTHENTICATED, or
  // admits them by a development bearer token). False: the handshake requires one.
  bool client_cert_optional = false;
  absl::Duration refresh = absl::Minutes(1);
};

// True for 127.0.0.0/8, ::1 and "localhost".
bool IsLoopbackHost(const std::string& host);

// The credentials to listen on `host` with, or INVALID_ARGUMENT naming the flag at fault
// (no transport chosen, TLS and --insecure_dev together, plaintext beyond loopback, a
// certificate without its key) or NOT_FOUND / FAILED_PRECONDITION for unreadable or
// malformed files (checked once at start so mistakes fail fast).
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeServerCredentials(
    const TransportOptions& options, const std::string& host);

// One line for the start-up log: "mutual TLS", "TLS", "PLAINTEXT (development)".
std::string Describe(const TransportOptions& options);

}  // namespace cds::security
