#include "server/bundle/bundle.h"

#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"

namespace cds::bundle {
namespace {

std::vector<compiler::SourceFile> Files() {
  return {{"ruleset.textproto", "metadata { name: \"demo\" }\n"},
          {"tests.textproto", "cases { name: \"c\" }\n"}};
}

struct Signed {
  PrivateKey key;
  TrustedKeys trusted;
  cds::v1::Bundle bundle;
};

Signed MakeSigned() {
  Signed s{PrivateKey::Generate().value(), TrustedKeys(), cds::v1::Bundle()};
  s.trusted.Add(s.key.public_key());
  s.bundle = SignFiles("demo", "1.0.0", Files(), "Test Author", s.key, absl::Now()).value();
  return s;
}

std::optional<Rejection> Verify(const cds::v1::Bundle& bundle, const TrustedKeys& keys,
                                bool allow_unsigned = false) {
  VerifyOptions options;
  options.allow_unsigned = allow_unsigned;
  VerifiedBundle out;
  return VerifyBundle(bundle, keys, options, &out);
}

cds::v1::RejectReason ReasonOf(const std::optional<Rejection>& r) {
  return r.has_value() ? r->reason : cds::v1::REJECT_REASON_UNSPECIFIED;
}

TEST(BundleTest, Sha256OfKnownInput) {
  EXPECT_EQ(Sha256Hex("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
}

TEST(BundleTest, KeysRoundTripThroughPemAndBase64WithStableId) {
  const PrivateKey key = PrivateKey::Generate().value();
  EXPECT_EQ(key.public_key().key_id().size(), 16u);
  const PrivateKey again = PrivateKey::Parse(key.ToPem()).value();
  EXPECT_EQ(again.public_key().key_id(), key.public_key().key_id());
  const PublicKey pub = PublicKey::Parse(key.public_key().ToPem()).value();
  EXPECT_EQ(pub.key_id(), key.public_key().key_id());
  EXPECT_FALSE(PublicKey::Parse("not a key").ok());
  EXPECT_FALSE(PrivateKey::Parse("-----BEGIN PRIVATE KEY-----\nxx\n-----END PRIVATE KEY-----\n").ok());
}

TEST(BundleTest, SignatureVerifiesOnlyForTheExactMessageAndKey) {
  const PrivateKey key = PrivateKey::Generate().value();
  const PrivateKey other = PrivateKey::Generate().value();
  const std::string signature = key.Sign("manifest bytes").value();
  EXPECT_EQ(signature.size(), 64u);
  EXPECT_TRUE(key.public_key().Verify("manifest bytes", signature));
  EXPECT_FALSE(key.public_key().Verify("manifest bytes ", signature));
  EXPECT_FALSE(other.public_key().Verify("manifest bytes", signature));
  EXPECT_FALSE(key.public_key().Verify("manifest bytes", signature.substr(1)));
}

TEST(BundleTest, ASignedBundleVerifies) {
  Signed s = MakeSigned();
  VerifiedBundle out;
  ASSERT_FALSE(VerifyBundle(s.bundle, s.trusted, VerifyOptions(), &out).has_value());
  EXPECT_EQ(out.signer, s.key.public_key().key_id());
  EXPECT_EQ(out.manifest.name(), "demo");
  EXPECT_EQ(out.manifest.author(), "Test Author");
  ASSERT_EQ(out.files.size(), 2u);
  EXPECT_EQ(out.files[0].path, "ruleset.textproto");
}

TEST(BundleTest, EachEnvelopeProblemHasItsOwnReason) {
  Signed s = MakeSigned();
  EXPECT_EQ(ReasonOf(Verify(cds::v1::Bundle(), s.trusted)), cds::v1::EMPTY_BUNDLE);

  cds::v1::Bundle unsigned_bundle = s.bundle;
  unsigned_bundle.clear_signature();
  EXPECT_EQ(ReasonOf(Verify(unsigned_bundle, s.trusted)), cds::v1::UNSIGNED);
  // Development mode accepts it (the manifest's hashes still count).
  EXPECT_FALSE(Verify(unsigned_bundle, s.trusted, /*allow_unsigned=*/true).has_value());

  EXPECT_EQ(ReasonOf(Verify(s.bundle, TrustedKeys())), cds::v1::UNKNOWN_KEY);

  cds::v1::Bundle bad_sig = s.bundle;
  std::string manifest = bad_sig.manifest();
  manifest[manifest.size() - 3] ^= 1;  // inside the last hash: still parses
  bad_sig.set_manifest(manifest);
  EXPECT_EQ(ReasonOf(Verify(bad_sig, s.trusted)), cds::v1::BAD_SIGNATURE);

  cds::v1::Bundle tampered = s.bundle;
  tampered.mutable_files(0)->mutable_content()->append(" ");
  EXPECT_EQ(ReasonOf(Verify(tampered, s.trusted)), cds::v1::TAMPERED_FILE);

  cds::v1::Bundle missing = s.bundle;
  missing.mutable_files()->RemoveLast();
  EXPECT_EQ(ReasonOf(Verify(missing, s.trusted)), cds::v1::MISSING_FILE);

  cds::v1::Bundle extra = s.bundle;
  cds::v1::BundleFile* file = extra.add_files();
  file->set_path("notes.txt");
  file->set_content("hello");
  EXPECT_EQ(ReasonOf(Verify(extra, s.trusted)), cds::v1::EXTRA_FILE);

  cds::v1::Bundle traversal = s.bundle;
  traversal.mutable_files(0)->set_path("../escape");
  EXPECT_EQ(ReasonOf(Verify(traversal, s.trusted)), cds::v1::MALFORMED_BUNDLE);

  VerifyOptions other_name;
  other_name.expected_name = "other";
  VerifiedBundle out;
  EXPECT_EQ(ReasonOf(VerifyBundle(s.bundle, s.trusted, other_name, &out)),
            cds::v1::MANIFEST_MISMATCH);
}

TEST(BundleTest, RejectionStatusCodes) {
  EXPECT_EQ(RejectionStatus({cds::v1::BAD_SIGNATURE, "x"}).code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(RejectionStatus({cds::v1::UNSIGNED, "x"}).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(RejectionStatus({cds::v1::VERSION_CONFLICT, "x"}).code(),
            absl::StatusCode::kAlreadyExists);
  const absl::Status s = RejectionStatus({cds::v1::TAMPERED_FILE, "detail"});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StartsWith(s.message(), "TAMPERED_FILE: detail")) << s.message();
}

}  // namespace
}  // namespace cds::bundle
