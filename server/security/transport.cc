#include "server/security/transport.h"

#include <fstream>
#include <sstream>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "grpcpp/security/tls_certificate_provider.h"
#include "grpcpp/security/tls_credentials_options.h"

namespace cds::security {
namespace {

// The file's content, or NOT_FOUND; FAILED_PRECONDITION when it holds no PEM block `kind`.
absl::Status CheckPemFile(const std::string& flag, const std::string& path,
                          const std::string& kind) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(flag, ": cannot read ", path));
  std::stringstream content;
  content << in.rdbuf();
  if (!absl::StrContains(content.str(), "-----BEGIN ") ||
      !absl::StrContains(content.str(), kind)) {
    return absl::FailedPreconditionError(
        absl::StrCat(flag, ": ", path, " holds no PEM ", kind));
  }
  return absl::OkStatus();
}

}  // namespace

bool IsLoopbackHost(const std::string& host) {
  return host == "localhost" || host == "[::1]" || host == "::1" ||
         absl::StartsWith(host, "127.");
}

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeServerCredentials(
    const TransportOptions& options, const std::string& host) {
  const bool tls = !options.tls_cert.empty() || !options.tls_key.empty();
  if (tls && options.insecure_dev) {
    return absl::InvalidArgumentError("--insecure_dev and --tls_cert/--tls_key are exclusive");
  }
  if (!tls && !options.tls_client_ca.empty()) {
    return absl::InvalidArgumentError("--tls_client_ca needs --tls_cert and --tls_key");
  }
  if (!tls) {
    if (!options.insecure_dev) {
      return absl::InvalidArgumentError(
          "no transport: give --tls_cert and --tls_key (TLS; add --tls_client_ca for mutual "
          "TLS), or --insecure_dev for plaintext on a loopback address (development only)");
    }
    if (!IsLoopbackHost(host)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--insecure_dev serves plaintext on loopback addresses only, not on ", host));
    }
    return grpc::InsecureServerCredentials();
  }
  if (options.tls_cert.empty() || options.tls_key.empty()) {
    return absl::InvalidArgumentError("--tls_cert and --tls_key go together");
  }
  if (absl::Status s = CheckPemFile("--tls_cert", options.tls_cert, "CERTIFICATE"); !s.ok()) {
    return s;
  }
  if (absl::Status s = CheckPemFile("--tls_key", options.tls_key, "PRIVATE KEY"); !s.ok()) {
    return s;
  }
  if (!options.tls_client_ca.empty()) {
    if (absl::Status s = CheckPemFile("--tls_client_ca", options.tls_client_ca, "CERTIFICATE");
        !s.ok()) {
      return s;
    }
  }
  const int64_t seconds = std::max<int64_t>(1, absl::ToInt64Seconds(options.refresh));
  auto provider = std::make_shared<grpc::experimental::FileWatcherCertificateProvider>(
      options.tls_key, options.tls_cert, options.tls_client_ca,
      static_cast<unsigned int>(seconds));
  grpc::experimental::TlsServerCredentialsOptions tls_options(provider);
  tls_options.watch_identity_key_cert_pairs();
  if (options.tls_client_ca.empty()) {
    tls_options.set_cert_request_type(GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE);
  } else {
    tls_options.watch_root_certs();
    tls_options.set_cert_request_type(
        options.client_cert_optional
            ? GRPC_SSL_REQUEST_CLIENT_CERTIFICATE_AND_VERIFY
            : GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  }
  return grpc::experimental::TlsServerCredentials(tls_options);
}

std::string Describe(const TransportOptions& options) {
  if (!options.tls_client_ca.empty()) return "mutual TLS";
  if (!options.tls_cert.empty()) return "TLS";
  return "PLAINTEXT (development only)";
}

}  // namespace cds::security
