#include "server/bundle/bundle.h"

#include <openssl/bio.h>
#include <openssl/evp.h>
#include <openssl/pem.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <memory>
#include <set>
#include <sstream>
#include <system_error>

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "google/protobuf/text_format.h"

namespace cds::bundle {
namespace {

namespace fs = std::filesystem;

constexpr size_t kKeyBytes = 32;
constexpr size_t kSignatureBytes = 64;

struct PkeyDeleter {
  void operator()(EVP_PKEY* p) const { EVP_PKEY_free(p); }
};
struct MdCtxDeleter {
  void operator()(EVP_MD_CTX* p) const { EVP_MD_CTX_free(p); }
};
struct BioDeleter {
  void operator()(BIO* p) const { BIO_free(p); }
};
using Pkey = std::unique_ptr<EVP_PKEY, PkeyDeleter>;
using MdCtx = std::unique_ptr<EVP_MD_CTX, MdCtxDeleter>;
using Bio = std::unique_ptr<BIO, BioDeleter>;

std::string Trimmed(absl::string_view text) {
  return std::string(absl::StripAsciiWhitespace(text));
}

// Decodes base64 to exactly `size` bytes.
absl::StatusOr<std::string> DecodeBase64(absl::string_view text, size_t size, const char* what) {
  std::string raw;
  if (!absl::Base64Unescape(Trimmed(text), &raw) || raw.size() != size) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, " is neither PEM nor ", size, " bytes of base64"));
  }
  return raw;
}

std::string PemOf(EVP_PKEY* pkey, bool private_key) {
  Bio bio(BIO_new(BIO_s_mem()));
  const int ok = private_key
                     ? PEM_write_bio_PrivateKey(bio.get(), pkey, nullptr, nullptr, 0, nullptr, nullptr)
                     : PEM_write_bio_PUBKEY(bio.get(), pkey);
  if (ok != 1) return "";
  char* data = nullptr;
  const long length = BIO_get_mem_data(bio.get(), &data);
  return std::string(data, static_cast<size_t>(length));
}

absl::StatusOr<std::string> RawKey(EVP_PKEY* pkey, bool private_key) {
  if (EVP_PKEY_get_id(pkey) != EVP_PKEY_ED25519) {
    return absl::InvalidArgumentError("not an Ed25519 key");
  }
  std::string raw(kKeyBytes, '\0');
  size_t length = raw.size();
  const int ok =
      private_key
          ? EVP_PKEY_get_raw_private_key(pkey, reinterpret_cast<unsigned char*>(raw.data()), &length)
          : EVP_PKEY_get_raw_public_key(pkey, reinterpret_cast<unsigned char*>(raw.data()), &length);
  if (ok != 1 || length != kKeyBytes) return absl::InternalError("cannot read the raw key");
  return raw;
}

bool IsPlainFileName(const std::string& path) {
  return !path.empty() && path != "." && path != ".." && path.find('/') == std::string::npos &&
         path.find('\\') == std::string::npos && path.find('\0') == std::string::npos;
}

// Short, printable echo of text that came from a bundle.
std::string Echo(absl::string_view text) {
  std::string shown = absl::CHexEscape(text.substr(0, 64));
  if (text.size() > 64) shown += "...";
  return shown;
}

Rejection Reject(cds::v1::RejectReason reason, std::string message) {
  return Rejection{reason, std::move(message)};
}

}  // namespace

std::string Sha256Hex(absl::string_view data) {
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int length = 0;
  EVP_Digest(data.data(), data.size(), digest, &length, EVP_sha256(), nullptr);
  std::string hex;
  for (unsigned int i = 0; i < length; ++i) absl::StrAppendFormat(&hex, "%02x", digest[i]);
  return hex;
}

// ---- keys ---------------------------------------------------------------------------------

PublicKey PublicKey::FromRaw(std::string raw) {
  PublicKey key;
  key.key_id_ = Sha256Hex(raw).substr(0, 16);
  key.raw_ = std::move(raw);
  return key;
}

absl::StatusOr<PublicKey> PublicKey::Parse(absl::string_view text) {
  if (absl::StrContains(text, "-----BEGIN")) {
    Bio bio(BIO_new_mem_buf(text.data(), static_cast<int>(text.size())));
    Pkey pkey(PEM_read_bio_PUBKEY(bio.get(), nullptr, nullptr, nullptr));
    if (pkey == nullptr) return absl::InvalidArgumentError("not a PEM public key");
    absl::StatusOr<std::string> raw = RawKey(pkey.get(), /*private_key=*/false);
    if (!raw.ok()) return raw.status();
    return FromRaw(*std::move(raw));
  }
  absl::StatusOr<std::string> raw = DecodeBase64(text, kKeyBytes, "public key");
  if (!raw.ok()) return raw.status();
  return FromRaw(*std::move(raw));
}

std::string PublicKey::ToPem() const {
  Pkey pkey(EVP_PKEY_new_raw_public_key(EVP_PKEY_ED25519, nullptr,
                                        reinterpret_cast<const unsigned char*>(raw_.data()),
                                        raw_.size()));
  return pkey == nullptr ? "" : PemOf(pkey.get(), /*private_key=*/false);
}

bool PublicKey::Verify(absl::string_view message, absl::string_view signature) const {
  if (signature.size() != kSignatureBytes || raw_.size() != kKeyBytes) return false;
  Pkey pkey(EVP_PKEY_new_raw_public_key(EVP_PKEY_ED25519, nullptr,
                                        reinterpret_cast<const unsigned char*>(raw_.data()),
                                        raw_.size()));
  MdCtx ctx(EVP_MD_CTX_new());
  if (pkey == nullptr || ctx == nullptr ||
      EVP_DigestVerifyInit(ctx.get(), nullptr, nullptr, nullptr, pkey.get()) != 1) {
    return false;
  }
  return EVP_DigestVerify(ctx.get(), reinterpret_cast<const unsigned char*>(signature.data()),
                          signature.size(),
                          reinterpret_cast<const unsigned char*>(message.data()),
                          message.size()) == 1;
}

absl::StatusOr<PrivateKey> PrivateKey::Generate() {
  std::unique_ptr<EVP_PKEY_CTX, void (*)(EVP_PKEY_CTX*)> ctx(
      EVP_PKEY_CTX_new_id(EVP_PKEY_ED25519, nullptr), EVP_PKEY_CTX_free);
  EVP_PKEY* raw_pkey = nullptr;
  if (ctx == nullptr || EVP_PKEY_keygen_init(ctx.get()) != 1 ||
      EVP_PKEY_keygen(ctx.get(), &raw_pkey) != 1) {
    return absl::InternalError("Ed25519 key generation failed");
  }
  Pkey pkey(raw_pkey);
  absl::StatusOr<std::string> seed = RawKey(pkey.get(), /*private_key=*/true);
  if (!seed.ok()) return seed.status();
  return Parse(absl::Base64Escape(*seed));
}

absl::StatusOr<PrivateKey> PrivateKey::Parse(absl::string_view text) {
  Pkey pkey;
  if (absl::StrContains(text, "-----BEGIN")) {
    Bio bio(BIO_new_mem_buf(text.data(), static_cast<int>(text.size())));
    pkey.reset(PEM_read_bio_PrivateKey(bio.get(), nullptr, nullptr, nullptr));
    if (pkey == nullptr) return absl::InvalidArgumentError("not a PEM private key");
  } else {
    absl::StatusOr<std::string> seed = DecodeBase64(text, kKeyBytes, "private key");
    if (!seed.ok()) return seed.status();
    pkey.reset(EVP_PKEY_new_raw_private_key(
        EVP_PKEY_ED25519, nullptr, reinterpret_cast<const unsigned char*>(seed->data()),
        seed->size()));
    if (pkey == nullptr) return absl::InvalidArgumentError("not an Ed25519 private key");
  }
  absl::StatusOr<std::string> seed = RawKey(pkey.get(), /*private_key=*/true);
  if (!seed.ok()) return seed.status();
  absl::StatusOr<std::string> pub = RawKey(pkey.get(), /*private_key=*/false);
  if (!pub.ok()) return pub.status();
  PrivateKey key;
  key.seed_ = *std::move(seed);
  key.public_key_ = PublicKey::FromRaw(*std::move(pub));
  return key;
}

std::string PrivateKey::ToPem() const {
  Pkey pkey(EVP_PKEY_new_raw_private_key(EVP_PKEY_ED25519, nullptr,
                                         reinterpret_cast<const unsigned char*>(seed_.data()),
                                         seed_.size()));
  return pkey == nullptr ? "" : PemOf(pkey.get(), /*private_key=*/true);
}

absl::StatusOr<std::string> PrivateKey::Sign(absl::string_view message) const {
  Pkey pkey(EVP_PKEY_new_raw_private_key(EVP_PKEY_ED25519, nullptr,
                                         reinterpret_cast<const unsigned char*>(seed_.data()),
                                         seed_.size()));
  MdCtx ctx(EVP_MD_CTX_new());
  if (pkey == nullptr || ctx == nullptr ||
      EVP_DigestSignInit(ctx.get(), nullptr, nullptr, nullptr, pkey.get()) != 1) {
    return absl::InternalError("cannot initialise Ed25519 signing");
  }
  std::string signature(kSignatureBytes, '\0');
  size_t length = signature.size();
  if (EVP_DigestSign(ctx.get(), reinterpret_cast<unsigned char*>(signature.data()), &length,
                     reinterpret_cast<const unsigned char*>(message.data()),
                     message.size()) != 1 ||
      length != kSignatureBytes) {
    return absl::InternalError("Ed25519 signing failed");
  }
  return signature;
}

absl::StatusOr<TrustedKeys> TrustedKeys::LoadDirectory(const std::string& dir) {
  TrustedKeys keys;
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return keys;
  std::vector<fs::path> paths;
  for (const auto& entry : fs::directory_iterator(dir, ec)) {
    if (entry.is_regular_file() && entry.path().extension() == ".pub") {
      paths.push_back(entry.path());
    }
  }
  if (ec) return absl::UnavailableError(absl::StrCat("cannot list ", dir, ": ", ec.message()));
  std::sort(paths.begin(), paths.end());
  for (const fs::path& path : paths) {
    std::ifstream in(path, std::ios::binary);
    std::ostringstream content;
    content << in.rdbuf();
    if (!in) return absl::UnavailableError(absl::StrCat("cannot read ", path.string()));
    absl::StatusOr<PublicKey> key = PublicKey::Parse(content.str());
    if (!key.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat(path.string(), ": ", key.status().message()));
    }
    keys.Add(*key);
  }
  return keys;
}

const PublicKey* TrustedKeys::Find(const std::string& key_id) const {
  auto it = keys_.find(key_id);
  return it == keys_.end() ? nullptr : &it->second;
}

std::vector<std::string> TrustedKeys::KeyIds() const {
  std::vector<std::string> ids;
  for (const auto& [id, unused] : keys_) ids.push_back(id);
  return ids;
}

// ---- verification -------------------------------------------------------------------------

std::string Rejection::ToString() const {
  return absl::StrCat(cds::v1::RejectReason_Name(reason), ": ", message);
}

absl::Status RejectionStatus(const Rejection& rejection) {
  switch (rejection.reason) {
    case cds::v1::UNSIGNED:
    case cds::v1::UNKNOWN_KEY:
    case cds::v1::BAD_SIGNATURE:
      return absl::FailedPreconditionError(rejection.ToString());
    case cds::v1::VERSION_CONFLICT:
      return absl::AlreadyExistsError(rejection.ToString());
    default:
      return absl::InvalidArgumentError(rejection.ToString());
  }
}

std::optional<Rejection> VerifyBundle(const cds::v1::Bundle& bundle, const TrustedKeys& keys,
                                      const VerifyOptions& options, VerifiedBundle* out) {
  *out = VerifiedBundle();
  if (bundle.files().empty() && bundle.manifest().empty()) {
    return Reject(cds::v1::EMPTY_BUNDLE, "the bundle holds no file");
  }
  std::map<std::string, const std::string*> files;
  for (const cds::v1::BundleFile& file : bundle.files()) {
    if (!IsPlainFileName(file.path()) || file.path() == kManifestFile ||
        file.path() == kSignatureFile) {
      return Reject(cds::v1::MALFORMED_BUNDLE,
                    absl::StrCat("invalid file name '", Echo(file.path()), "'"));
    }
    if (!files.emplace(file.path(), &file.content()).second) {
      return Reject(cds::v1::MALFORMED_BUNDLE,
                    absl::StrCat("file '", Echo(file.path()), "' appears twice"));
    }
  }

  const bool has_manifest = !bundle.manifest().empty();
  const bool has_signature = !bundle.signature().empty();
  if (!has_signature) {
    if (!options.allow_unsigned) {
      return Reject(cds::v1::UNSIGNED,
                    has_manifest ? "MANIFEST.sig is missing: the bundle is not signed"
                                 : "no MANIFEST and MANIFEST.sig: the bundle is not signed "
                                   "(cdsctl rules sign)");
    }
    if (!has_manifest) {
      // Development mode, no manifest at all: take the files as they are.
      for (const auto& [path, content] : files) out->files.push_back({path, *content});
      if (out->files.empty()) return Reject(cds::v1::EMPTY_BUNDLE, "the bundle holds no file");
      return std::nullopt;
    }
  } else if (!has_manifest) {
    return Reject(cds::v1::MALFORMED_BUNDLE, "MANIFEST.sig without a MANIFEST");
  }

  cds::v1::BundleManifest manifest;
  google::protobuf::TextFormat::Parser parser;
  if (!parser.ParseFromString(bundle.manifest(), &manifest)) {
    return Reject(cds::v1::MALFORMED_BUNDLE, "MANIFEST is not a cds.v1.BundleManifest");
  }
  // Kept even when a later check fails, so callers can name the version that failed.
  out->manifest = manifest;
  if (has_signature) {
    const PublicKey* key = keys.Find(manifest.key_id());
    if (key == nullptr) {
      return Reject(cds::v1::UNKNOWN_KEY,
                    absl::StrCat("signed with key '", Echo(manifest.key_id()),
                                 "', which this server does not trust (trusted: ",
                                 keys.size() == 0 ? "none" : absl::StrJoin(keys.KeyIds(), ", "),
                                 ")"));
    }
    std::string signature;
    if (!absl::Base64Unescape(Trimmed(bundle.signature()), &signature) ||
        !key->Verify(bundle.manifest(), signature)) {
      return Reject(cds::v1::BAD_SIGNATURE,
                    absl::StrCat("MANIFEST.sig is not a valid signature of MANIFEST by key ",
                                 key->key_id()));
    }
    out->signer = key->key_id();
  }
  if (manifest.files().empty()) {
    return Reject(cds::v1::EMPTY_BUNDLE, "the manifest lists no file");
  }
  if (!options.expected_name.empty() && manifest.name() != options.expected_name) {
    return Reject(cds::v1::MANIFEST_MISMATCH,
                  absl::StrCat("the manifest names rule set '", Echo(manifest.name()),
                               "' but the bundle is for '", Echo(options.expected_name), "'"));
  }
  if (!options.expected_version.empty() && manifest.version() != options.expected_version) {
    return Reject(cds::v1::MANIFEST_MISMATCH,
                  absl::StrCat("the manifest names version '", Echo(manifest.version()),
                               "' but the bundle is for '", Echo(options.expected_version), "'"));
  }
  std::set<std::string> listed;
  for (const cds::v1::ManifestFile& entry : manifest.files()) {
    if (!IsPlainFileName(entry.path()) || !listed.insert(entry.path()).second) {
      return Reject(cds::v1::MALFORMED_BUNDLE,
                    absl::StrCat("manifest entry '", Echo(entry.path()),
                                 "' is not a plain file name or is listed twice"));
    }
    auto it = files.find(entry.path());
    if (it == files.end()) {
      return Reject(cds::v1::MISSING_FILE,
                    absl::StrCat("'", Echo(entry.path()), "' is listed in the manifest but missing"));
    }
    const std::string& content = *it->second;
    if (static_cast<int64_t>(content.size()) != entry.size() ||
        Sha256Hex(content) != absl::AsciiStrToLower(entry.sha256())) {
      return Reject(cds::v1::TAMPERED_FILE,
                    absl::StrCat("'", Echo(entry.path()),
                                 "' differs from the manifest (SHA-256 or size)"));
    }
    out->files.push_back({entry.path(), content});
  }
  for (const auto& [path, unused] : files) {
    if (listed.count(path) == 0) {
      return Reject(cds::v1::EXTRA_FILE,
                    absl::StrCat("'", Echo(path), "' is not listed in the manifest"));
    }
  }
  std::sort(out->files.begin(), out->files.end(),
            [](const compiler::SourceFile& a, const compiler::SourceFile& b) {
              return a.path < b.path;
            });
  return std::nullopt;
}

// ---- files --------------------------------------------------------------------------------

absl::StatusOr<cds::v1::Bundle> ReadBundleDir(const std::string& dir) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) {
    return absl::NotFoundError(absl::StrCat("bundle directory not found: ", dir));
  }
  std::vector<fs::path> paths;
  for (const auto& entry : fs::directory_iterator(dir, ec)) {
    if (entry.is_regular_file()) paths.push_back(entry.path());
  }
  if (ec) return absl::UnavailableError(absl::StrCat("cannot list ", dir, ": ", ec.message()));
  std::sort(paths.begin(), paths.end());
  cds::v1::Bundle bundle;
  for (const fs::path& path : paths) {
    std::ifstream in(path, std::ios::binary);
    std::ostringstream content;
    content << in.rdbuf();
    if (!in) return absl::UnavailableError(absl::StrCat("cannot read ", path.string()));
    const std::string name = path.filename().string();
    if (name == kManifestFile) {
      bundle.set_manifest(content.str());
    } else if (name == kSignatureFile) {
      bundle.set_signature(content.str());
    } else {
      cds::v1::BundleFile* file = bundle.add_files();
      file->set_path(name);
      file->set_content(content.str());
    }
  }
  return bundle;
}

absl::StatusOr<cds::v1::Bundle> SignFiles(const std::string& name, const std::string& version,
                                          const std::vector<compiler::SourceFile>& files,
                                          const std::string& author, const PrivateKey& key,
                                          absl::Time created_at) {
  cds::v1::BundleManifest manifest;
  manifest.set_name(name);
  manifest.set_version(version);
  manifest.mutable_created_at()->set_seconds(absl::ToUnixSeconds(created_at));
  manifest.set_author(author);
  manifest.set_key_id(key.public_key().key_id());
  std::vector<const compiler::SourceFile*> sorted;
  for (const compiler::SourceFile& file : files) {
    if (!IsPlainFileName(file.path) || file.path == kManifestFile ||
        file.path == kSignatureFile) {
      return absl::InvalidArgumentError(absl::StrCat("cannot sign file '", file.path, "'"));
    }
    sorted.push_back(&file);
  }
  std::sort(sorted.begin(), sorted.end(),
            [](const compiler::SourceFile* a, const compiler::SourceFile* b) {
              return a->path < b->path;
            });
  cds::v1::Bundle bundle;
  for (const compiler::SourceFile* file : sorted) {
    cds::v1::ManifestFile* entry = manifest.add_files();
    entry->set_path(file->path);
    entry->set_sha256(Sha256Hex(file->content));
    entry->set_size(static_cast<int64_t>(file->content.size()));
    cds::v1::BundleFile* out = bundle.add_files();
    out->set_path(file->path);
    out->set_content(file->content);
  }
  std::string text;
  google::protobuf::TextFormat::PrintToString(manifest, &text);
  text = absl::StrCat("# cds.v1.BundleManifest: signed by MANIFEST.sig (Ed25519). Do not edit.\n",
                      text);
  absl::StatusOr<std::string> signature = key.Sign(text);
  if (!signature.ok()) return signature.status();
  bundle.set_manifest(text);
  bundle.set_signature(absl::StrCat(absl::Base64Escape(*signature), "\n"));
  return bundle;
}

void RemoveBundleFiles(std::vector<compiler::SourceFile>* files) {
  files->erase(std::remove_if(files->begin(), files->end(),
                              [](const compiler::SourceFile& f) {
                                return f.path == kManifestFile || f.path == kSignatureFile;
                              }),
               files->end());
}

}  // namespace cds::bundle
