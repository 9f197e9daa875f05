#pragma once

// Signed rule-set bundles: a version's files, a MANIFEST (cds.v1.BundleManifest in text
// format: name, version, creation time, author, signing key id, SHA-256 and size of every
// file) and MANIFEST.sig, a detached Ed25519 signature over the exact MANIFEST bytes.
//
// On disk a bundle is a directory rules/<name>/<version>/ holding the files, MANIFEST and
// MANIFEST.sig (written last, so a directory with a signature is complete once its hashes
// verify); over the wire it is a cds.v1.Bundle. Cryptography is OpenSSL's EVP API
// (EVP_PKEY_ED25519, SHA-256); nothing here is home-made. Everything is thread-compatible
// value types; TrustedKeys is immutable once loaded.

#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "cds/v1/service.pb.h"
#include "server/compiler/compiler.h"

namespace cds::bundle {

inline constexpr char kManifestFile[] = "MANIFEST";
inline constexpr char kSignatureFile[] = "MANIFEST.sig";

// Lower-case hex SHA-256 of `data`.
std::string Sha256Hex(absl::string_view data);

// An Ed25519 public key and its id: the first 16 hex digits of the SHA-256 of the raw
// 32-byte key.
class PublicKey {
 public:
  // PEM ("-----BEGIN PUBLIC KEY-----", SubjectPublicKeyInfo) or the raw 32 bytes in base64.
  static absl::StatusOr<PublicKey> Parse(absl::string_view text);
  static PublicKey FromRaw(std::string raw);

  const std::string& key_id() const { return key_id_; }
  const std::string& raw() const { return raw_; }
  std::string ToPem() const;
  // True when `signature` is a valid Ed25519 signature of `message` by this key.
  bool Verify(absl::string_view message, absl::string_view signature) const;

 private:
  std::string raw_;
  std::string key_id_;
};

class PrivateKey {
 public:
  static absl::StatusOr<PrivateKey> Generate();
  // PEM ("-----BEGIN PRIVATE KEY-----", PKCS#8) or the raw 32-byte seed in base64.
  static absl::StatusOr<PrivateKey> Parse(absl::string_view text);

  std::string ToPem() const;
  const PublicKey& public_key() const { return public_key_; }
  // The 64-byte Ed25519 signature of `message`.
  absl::StatusOr<std::string> Sign(absl::string_view message) const;

 private:
  std::string seed_;  // raw 32 bytes
  PublicKey public_key_;
};

// The public keys a server trusts, by key id.
class TrustedKeys {
 public:
  // Every "*.pub" file directly in `dir`. An unreadable or malformed key file is an error
  // (a silently dropped key would reject every bundle it signed). A missing directory is
  // an empty set.
  static absl::StatusOr<TrustedKeys> LoadDirectory(const std::string& dir);
  void Add(const PublicKey& key) { keys_[key.key_id()] = key; }
  const PublicKey* Find(const std::string& key_id) const;
  size_t size() const { return keys_.size(); }
  std::vector<std::string> KeyIds() const;

 private:
  std::map<std::string, PublicKey> keys_;
};

// A bundle that passed the checks of VerifyBundle.
struct VerifiedBundle {
  // Unset fields when unsigned (accepted only with allow_unsigned).
  cds::v1::BundleManifest manifest;
  // The rule-set files (without MANIFEST and MANIFEST.sig), sorted by path.
  std::vector<compiler::SourceFile> files;
  // Key id of the signer; empty when unsigned.
  std::string signer;
};

struct Rejection {
  cds::v1::RejectReason reason = cds::v1::REJECT_REASON_UNSPECIFIED;
  std::string message;
  // "BAD_SIGNATURE: <message>"
  std::string ToString() const;
};

struct VerifyOptions {
  // Accept bundles without MANIFEST / MANIFEST.sig (development only).
  bool allow_unsigned = false;
  // When non-empty, the manifest must name this rule set / version (a bundle directory's
  // rules/<name>/<version>/ path).
  std::string expected_name;
  std::string expected_version;
};

// Checks the envelope: not empty, signed by a trusted key with a valid signature over the
// manifest, every listed file present with its hash and size, no unlisted file. Returns the
// first problem found, in that order. Does not compile: see the store for the full gate.
std::optional<Rejection> VerifyBundle(const cds::v1::Bundle& bundle, const TrustedKeys& keys,
                                      const VerifyOptions& options, VerifiedBundle* out);

// The status a refused bundle is reported with: FAILED_PRECONDITION for UNSIGNED,
// UNKNOWN_KEY and BAD_SIGNATURE, ALREADY_EXISTS for VERSION_CONFLICT, INVALID_ARGUMENT
// otherwise. The message starts with the reason's name.
absl::Status RejectionStatus(const Rejection& rejection);

// Reads a bundle directory: MANIFEST and MANIFEST.sig into their fields, every other
// regular file into `files` (sorted). Subdirectories are ignored.
absl::StatusOr<cds::v1::Bundle> ReadBundleDir(const std::string& dir);

// Makes the MANIFEST for `files` and signs it. `files` must not contain MANIFEST or
// MANIFEST.sig.
absl::StatusOr<cds::v1::Bundle> SignFiles(const std::string& name, const std::string& version,
                                          const std::vector<compiler::SourceFile>& files,
                                          const std::string& author, const PrivateKey& key,
                                          absl::Time created_at);

// Drops MANIFEST and MANIFEST.sig from a list of files (as read by LoadRuleSetDir).
void RemoveBundleFiles(std::vector<compiler::SourceFile>* files);

}  // namespace cds::bundle
