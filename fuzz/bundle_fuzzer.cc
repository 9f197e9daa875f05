// Fuzz target: bundle verification (server/bundle), as the store's directory scan runs it.
//
// The input is a bundle directory written as sections, each starting with a line
// "--- <file name>" followed by that file's bytes (up to the next such line), e.g.
//
//   --- MANIFEST
//   name: "ipex" version: "1.1.0" ... files { path: "ruleset.textproto" sha256: "..." }
//   --- MANIFEST.sig
//   <base64 Ed25519 signature>
//   --- ruleset.textproto
//   ...
//
// The files are written to a scratch directory, read back with ReadBundleDir and verified
// with VerifyBundle against the trusted keys of rules/keys/ plus one fuzzing key. A first
// line "+++ sign" makes the harness sign the MANIFEST section with that fuzzing key (and
// replace MANIFEST.sig), so inputs reach the hash and size checks behind the signature; its
// key id is in fuzz/bundle.dict. A first line "+++ proto" makes the rest a serialized
// cds.v1.Bundle (the PublishRuleSet payload), verified directly.
//
// File names are restricted to [A-Za-z0-9._-] (1 to 64 characters, no leading dot): other
// sections are skipped, so no input writes outside the scratch directory.

#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <optional>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/string_view.h"
#include "absl/strings/strip.h"
#include "cds/v1/service.pb.h"
#include "fuzz/fuzz_util.h"
#include "server/bundle/bundle.h"

namespace cds::fuzz {
namespace {

namespace fs = std::filesystem;

// The raw seed of the fuzzing key (base64 of 32 bytes 0x42): a test key, never trusted
// outside this harness.
constexpr char kFuzzKeySeed[] = "QkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkI=";

[[noreturn]] void Die(const std::string& message) {
  std::fprintf(stderr, "bundle_fuzzer setup: %s\n", message.c_str());
  std::abort();
}

struct Harness {
  bundle::TrustedKeys keys;
  bundle::PrivateKey fuzz_key;
  std::string scratch;
};

Harness& GetHarness() {
  static Harness* const harness = [] {
    auto* h = new Harness();
    absl::StatusOr<bundle::TrustedKeys> keys =
        bundle::TrustedKeys::LoadDirectory(RulesDir() + "/keys");
    if (!keys.ok() || keys->size() == 0) Die("no trusted keys under " + RulesDir() + "/keys");
    h->keys = *std::move(keys);
    absl::StatusOr<bundle::PrivateKey> key = bundle::PrivateKey::Parse(kFuzzKeySeed);
    if (!key.ok()) Die(std::string(key.status().message()));
    h->fuzz_key = *std::move(key);
    h->keys.Add(h->fuzz_key.public_key());
    std::string pattern = (fs::temp_directory_path() / "cds-bundle-fuzz-XXXXXX").string();
    if (mkdtemp(pattern.data()) == nullptr) Die("mkdtemp failed");
    h->scratch = pattern;
    // The scratch directory goes when the process exits normally (libFuzzer's -runs, the
    // replay driver); a crash leaves it under $TMPDIR.
    std::atexit([] { std::error_code ec; fs::remove_all(GetHarness().scratch, ec); });
    return h;
  }();
  return *harness;
}

bool SafeFileName(absl::string_view name) {
  if (name.empty() || name.size() > 64 || name[0] == '.') return false;
  for (char c : name) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                    c == '.' || c == '_' || c == '-';
    if (!ok) return false;
  }
  return true;
}

// Splits "--- name\n<content>--- name\n<content>..." into (name, content) pairs. Bytes
// before the first header are ignored. A header line ends at '\n' (or the input's end).
std::vector<std::pair<std::string, std::string>> SplitSections(absl::string_view input) {
  std::vector<std::pair<std::string, std::string>> sections;
  constexpr absl::string_view kHeader = "--- ";
  size_t pos = 0;
  // Header positions: at the start or right after a newline.
  auto next_header = [&](size_t from) -> size_t {
    for (size_t i = from; i < input.size(); ++i) {
      if ((i == 0 || input[i - 1] == '\n') && absl::StartsWith(input.substr(i), kHeader)) {
        return i;
      }
    }
    return absl::string_view::npos;
  };
  pos = next_header(0);
  while (pos != absl::string_view::npos) {
    const size_t name_start = pos + kHeader.size();
    size_t name_end = input.find('\n', name_start);
    const size_t content_start = name_end == absl::string_view::npos ? input.size() : name_end + 1;
    if (name_end == absl::string_view::npos) name_end = input.size();
    const size_t next = next_header(content_start);
    const size_t content_end = next == absl::string_view::npos ? input.size() : next;
    sections.emplace_back(std::string(input.substr(name_start, name_end - name_start)),
                          std::string(input.substr(content_start, content_end - content_start)));
    pos = next;
  }
  return sections;
}

void VerifyDirectory(Harness& h, absl::string_view input, bool sign) {
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(h.scratch, ec)) fs::remove_all(entry.path(), ec);
  std::vector<std::pair<std::string, std::string>> sections = SplitSections(input);
  if (sign) {
    std::string manifest;
    for (const auto& [name, content] : sections) {
      if (name == bundle::kManifestFile) manifest = content;
    }
    absl::StatusOr<std::string> signature = h.fuzz_key.Sign(manifest);
    if (!signature.ok()) Die("signing failed");
    sections.emplace_back(bundle::kSignatureFile, absl::Base64Escape(*signature) + "\n");
  }
  for (const auto& [name, content] : sections) {
    if (!SafeFileName(name)) continue;
    std::ofstream out(fs::path(h.scratch) / name, std::ios::binary | std::ios::trunc);
    out.write(content.data(), static_cast<std::streamsize>(content.size()));
  }
  absl::StatusOr<cds::v1::Bundle> bundle = bundle::ReadBundleDir(h.scratch);
  if (!bundle.ok()) return;
  bundle::VerifyOptions options;
  options.expected_name = "ipex";
  bundle::VerifiedBundle verified;
  if (std::optional<bundle::Rejection> rejection =
          bundle::VerifyBundle(*bundle, h.keys, options, &verified)) {
    rejection->ToString();
    bundle::RejectionStatus(*rejection).IgnoreError();
  }
}

void VerifyProto(Harness& h, absl::string_view input) {
  cds::v1::Bundle bundle;
  if (!bundle.ParseFromArray(input.data(), static_cast<int>(input.size()))) return;
  bundle::VerifiedBundle verified;
  if (std::optional<bundle::Rejection> rejection =
          bundle::VerifyBundle(bundle, h.keys, bundle::VerifyOptions{}, &verified)) {
    bundle::RejectionStatus(*rejection).IgnoreError();
  }
}

}  // namespace
}  // namespace cds::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  cds::fuzz::Harness& harness = cds::fuzz::GetHarness();
  absl::string_view input(reinterpret_cast<const char*>(data), size);
  if (absl::ConsumePrefix(&input, "+++ proto\n")) {
    cds::fuzz::VerifyProto(harness, input);
  } else {
    const bool sign = absl::ConsumePrefix(&input, "+++ sign\n");
    cds::fuzz::VerifyDirectory(harness, input, sign);
  }
  return 0;
}
