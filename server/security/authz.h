#pragma once

// Role-based access control for cds-server (issue 6, part 2). A caller's identity is the
// subject common name or a subject alternative name of its verified client certificate, or
// (development only) the identity a bearer token of the policy stands for; the policy
// (cds.v1.AccessPolicy, text format) maps identities to roles. Enforced for every method
// of every service before the handler runs, as a grpc::AuthMetadataProcessor (so TLS is
// required): UNAUTHENTICATED without an identity, PERMISSION_DENIED when the identity lacks
// the method's role. Health checks are open to every connected client. Denied calls are
// logged with the identity and method (never request data). The granted identity is added
// to the call's AuthContext as property kIdentityProperty.

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "cds/v1/access.pb.h"
#include "grpcpp/security/auth_metadata_processor.h"

namespace cds::security {

inline constexpr char kIdentityProperty[] = "cds_identity";

// The access policy. Immutable once built; thread-safe.
class AccessPolicy {
 public:
  // Parses a cds.v1.AccessPolicy in text format; INVALID_ARGUMENT for unknown fields,
  // empty identities, unspecified roles or duplicate tokens.
  static absl::StatusOr<std::shared_ptr<const AccessPolicy>> FromText(const std::string& text);
  static absl::StatusOr<std::shared_ptr<const AccessPolicy>> FromFile(const std::string& path);

  // The role a method needs ("/pkg.Service/Method"); nullopt-like ROLE_UNSPECIFIED for
  // methods open to every connected client (health checks).
  static cds::v1::Role RequiredRole(const std::string& method);

  // OK when one of `identities` holds `role` (ADMIN holds every role);
  // UNAUTHENTICATED when `identities` is empty; PERMISSION_DENIED otherwise.
  absl::Status Check(const std::vector<std::string>& identities, const std::string& method,
                     std::string* granted_identity) const;

  // The identity a bearer token stands for; empty when the token is unknown.
  std::string IdentityOfToken(const std::string& token) const;

 private:
  AccessPolicy() = default;
  absl::flat_hash_map<std::string, std::vector<cds::v1::Role>> roles_;  // by identity
  absl::flat_hash_map<std::string, std::string> token_identity_;
};

// Runs `policy` on every call (see the file comment).
class PolicyAuthProcessor final : public grpc::AuthMetadataProcessor {
 public:
  // Called for every denied call (e.g. to audit it); may be empty.
  using OnDenied = std::function<void(const std::string& caller, const std::string& method,
                                      grpc::StatusCode code)>;
  explicit PolicyAuthProcessor(std::shared_ptr<const AccessPolicy> policy,
                               OnDenied on_denied = nullptr)
      : policy_(std::move(policy)), on_denied_(std::move(on_denied)) {}
  // Checking the policy never blocks; recording a denial may (the audit trail commits it),
  // and then gRPC must run Process off its event threads.
  bool IsBlocking() const override { return static_cast<bool>(on_denied_); }
  grpc::Status Process(const InputMetadata& auth_metadata, grpc::AuthContext* context,
                       OutputMetadata* consumed_auth_metadata,
                       OutputMetadata* response_metadata) override;

 private:
  const std::shared_ptr<const AccessPolicy> policy_;
  const OnDenied on_denied_;
};

}  // namespace cds::security
