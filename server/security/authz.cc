#include "server/security/authz.h"

#include <fstream>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "google/protobuf/text_format.h"
#include "grpc/grpc_security_constants.h"
#include "server/common/log.h"

namespace cds::security {
namespace {

constexpr char kBearerPrefix[] = "Bearer ";

std::string RoleName(cds::v1::Role role) {
  switch (role) {
    case cds::v1::CLINICAL: return "clinical";
    case cds::v1::AUTHOR: return "author";
    case cds::v1::ADMIN: return "admin";
    default: return "none";
  }
}

}  // namespace

absl::StatusOr<std::shared_ptr<const AccessPolicy>> AccessPolicy::FromText(const std::string& text) {
  cds::v1::AccessPolicy proto;
  google::protobuf::TextFormat::Parser parser;
  if (!parser.ParseFromString(text, &proto)) {
    return absl::InvalidArgumentError("the policy is not a cds.v1.AccessPolicy in text format");
  }
  std::shared_ptr<AccessPolicy> policy(new AccessPolicy());
  for (int i = 0; i < proto.grants_size(); ++i) {
    const cds::v1::Grant& grant = proto.grants(i);
    if (grant.identity().empty()) {
      return absl::InvalidArgumentError(absl::StrCat("grants[", i, "].identity is required"));
    }
    std::vector<cds::v1::Role>& roles = policy->roles_[grant.identity()];
    for (int r = 0; r < grant.roles_size(); ++r) {
      const auto role = static_cast<cds::v1::Role>(grant.roles(r));
      if (role == cds::v1::ROLE_UNSPECIFIED || !cds::v1::Role_IsValid(role)) {
        return absl::InvalidArgumentError(
            absl::StrCat("grants[", i, "].roles[", r, "] is not a known role"));
      }
      roles.push_back(role);
    }
  }
  for (int i = 0; i < proto.bearer_tokens_size(); ++i) {
    const cds::v1::BearerToken& token = proto.bearer_tokens(i);
    if (token.token().size() < 16 || token.identity().empty()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "bearer_tokens[", i, "] needs a token of at least 16 characters and an identity"));
    }
    if (!policy->token_identity_.emplace(token.token(), token.identity()).second) {
      return absl::InvalidArgumentError(absl::StrCat("bearer_tokens[", i, "] repeats a token"));
    }
  }
  return std::shared_ptr<const AccessPolicy>(std::move(policy));
}

absl::StatusOr<std::shared_ptr<const AccessPolicy>> AccessPolicy::FromFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("--policy: cannot read ", path));
  std::stringstream content;
  content << in.rdbuf();
  absl::StatusOr<std::shared_ptr<const AccessPolicy>> policy = FromText(content.str());
  if (!policy.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("--policy ", path, ": ", policy.status().message()));
  }
  return policy;
}

cds::v1::Role AccessPolicy::RequiredRole(const std::string& method) {
  if (absl::StartsWith(method, "/grpc.health.v1.Health/")) return cds::v1::ROLE_UNSPECIFIED;
  if (absl::StartsWith(method, "/cds.v1.DecisionSupport/")) return cds::v1::CLINICAL;
  if (method == "/cds.v1.RuleSetAdmin/PublishRuleSet" ||
      method == "/cds.v1.RuleSetAdmin/SetLabel") {
    return cds::v1::AUTHOR;
  }
  if (absl::StartsWith(method, "/grpc.reflection.")) return cds::v1::CLINICAL;
  if (absl::StartsWith(method, "/cds.v1.AuditService/")) return cds::v1::ADMIN;
  return cds::v1::ADMIN;  // RetireRuleSet, anything new
}

absl::Status AccessPolicy::Check(const std::vector<std::string>& identities,
                                 const std::string& method, std::string* granted_identity) const {
  const cds::v1::Role needed = RequiredRole(method);
  if (identities.empty()) {
    if (needed == cds::v1::ROLE_UNSPECIFIED) return absl::OkStatus();
    return absl::UnauthenticatedError(
        "no caller identity: present a client certificate (or a development bearer token)");
  }
  for (const std::string& identity : identities) {
    auto it = roles_.find(identity);
    if (it == roles_.end()) continue;
    for (cds::v1::Role role : it->second) {
      if (needed == cds::v1::ROLE_UNSPECIFIED || role == needed || role == cds::v1::ADMIN ||
          (needed == cds::v1::CLINICAL && absl::StartsWith(method, "/grpc.reflection.") &&
           role != cds::v1::ROLE_UNSPECIFIED)) {
        *granted_identity = identity;
        return absl::OkStatus();
      }
    }
  }
  if (needed == cds::v1::ROLE_UNSPECIFIED) return absl::OkStatus();
  return absl::PermissionDeniedError(absl::StrCat("caller ", identities.front(), " lacks role ",
                                                  RoleName(needed), " for ", method));
}

std::string AccessPolicy::IdentityOfToken(const std::string& token) const {
  auto it = token_identity_.find(token);
  return it == token_identity_.end() ? "" : it->second;
}

grpc::Status PolicyAuthProcessor::Process(const InputMetadata& auth_metadata,
                                          grpc::AuthContext* context,
                                          OutputMetadata* consumed_auth_metadata,
                                          OutputMetadata* /*response_metadata*/) {
  std::string method;
  if (auto it = auth_metadata.find(":path"); it != auth_metadata.end()) {
    method.assign(it->second.data(), it->second.size());
  }
  // Identities of the verified client certificate.
  std::vector<std::string> identities;
  for (const char* property : {GRPC_X509_CN_PROPERTY_NAME, GRPC_X509_SAN_PROPERTY_NAME}) {
    for (const grpc::string_ref& value : context->FindPropertyValues(property)) {
      identities.emplace_back(value.data(), value.size());
    }
  }
  // A development bearer token.
  if (auto it = auth_metadata.find("authorization"); it != auth_metadata.end()) {
    const std::string value(it->second.data(), it->second.size());
    consumed_auth_metadata->insert({"authorization", value});
    if (!absl::StartsWith(value, kBearerPrefix)) {
      return grpc::Status(grpc::StatusCode::UNAUTHENTICATED, "authorization is not a bearer token");
    }
    const std::string identity = policy_->IdentityOfToken(value.substr(sizeof(kBearerPrefix) - 1));
    if (identity.empty()) {
      cds::log::Warning("denied ", method, ": unknown bearer token");
      if (on_denied_) on_denied_("", method, grpc::StatusCode::UNAUTHENTICATED);
      return grpc::Status(grpc::StatusCode::UNAUTHENTICATED, "unknown bearer token");
    }
    identities.insert(identities.begin(), identity);
  }
  std::string granted;
  const absl::Status status = policy_->Check(identities, method, &granted);
  if (!status.ok()) {
    cds::log::Warning("denied ", method, " to ",
                      identities.empty() ? std::string("an anonymous caller")
                                         : absl::StrJoin(identities, "|"),
                      ": ", absl::StatusCodeToString(status.code()));
    const auto code = static_cast<grpc::StatusCode>(status.code());
    if (on_denied_) on_denied_(identities.empty() ? "" : identities.front(), method, code);
    return grpc::Status(code, std::string(status.message()));
  }
  if (!granted.empty()) context->AddProperty(kIdentityProperty, granted);
  return grpc::Status::OK;
}

}  // namespace cds::security
