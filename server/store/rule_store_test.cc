#include "server/store/rule_store.h"

#include <stdlib.h>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "absl/time/clock.h"
#include "server/bundle/bundle.h"
#include "gtest/gtest.h"

namespace cds::store {
namespace {

using cds::v1::RuleSetInfo;

// A small valid rule set: one hypothesis moved by one finding, and a competitor.
// $NAME, $VERSION and $STATUS are substituted; $EXTRA is appended inside the rule set.
constexpr char kRuleSetTemplate[] = R"pb(
  metadata {
    name: "$NAME"
    version: "$VERSION"
    status: $STATUS
    title: "Demo"
    disclaimer: "Decision support only."
  }
  concepts {
    id: "diarrhoea"
    label: "Chronic diarrhoea"
    codes { system: "HPO" code: "HP:0002028" }
  }
  hypotheses {
    id: "ipex"
    title: "IPEX"
    code { system: "OMIM" code: "OMIM:304790" }
    pretest_probability: 0.05
    pretest_provenance { assumption: true note: "test" }
    evidence {
      id: "diarrhoea"
      description: "Chronic diarrhoea"
      when { finding { concept: "diarrhoea" } }
      likelihood_ratios { positive: 10 negative: 0.5 }
      provenance { assumption: true note: "test" }
    }
  }
  hypotheses {
    id: "other"
    title: "Other"
    code { system: "OMIM" code: "OMIM:100000" }
    pretest_probability: 0.05
    pretest_provenance { assumption: true note: "test" }
    evidence {
      id: "diarrhoea"
      description: "Chronic diarrhoea"
      when { finding { concept: "diarrhoea" } }
      likelihood_ratios { positive: 1.5 }
      provenance { assumption: true note: "test" }
    }
  }
  $EXTRA
)pb";

// A boy with diarrhoea; $TOP is the diagnosis the case expects first.
constexpr char kTestsTemplate[] = R"pb(
  cases {
    name: "boy_with_diarrhoea"
    patient {
      reference: "case-1"
      sex: MALE
      age { days: 30 }
      findings { term { system: "HPO" code: "HP:0002028" } status: PRESENT }
    }
    expect { top_diagnosis: "$TOP" }
  }
)pb";

struct Spec {
  std::string name = "demo";
  std::string version = "1.0.0";
  std::string status = "ACTIVE";
  std::string extra;            // more rule-set text
  std::string top = "ipex";     // expected top diagnosis of the embedded case
};

compiler::RuleSetSource Source(const Spec& spec) {
  compiler::RuleSetSource source;
  source.files = {
      {compiler::kRuleSetFile,
       absl::StrReplaceAll(kRuleSetTemplate, {{"$NAME", spec.name},
                                              {"$VERSION", spec.version},
                                              {"$STATUS", spec.status},
                                              {"$EXTRA", spec.extra}})},
      {compiler::kTestsFile, absl::StrReplaceAll(kTestsTemplate, {{"$TOP", spec.top}})},
  };
  return source;
}

compiler::RuleSetSource Good(const std::string& version) {
  Spec spec;
  spec.version = version;
  return Source(spec);
}

// Refers to a concept nobody defined: a compile error.
compiler::RuleSetSource Broken(const std::string& version) {
  Spec spec;
  spec.version = version;
  spec.extra = R"pb(actions {
    id: "dangling"
    kind: TEST
    title: "Dangling"
    urgency: INFO
    when { finding { concept: "no_such_concept" } }
  })pb";
  compiler::RuleSetSource source = Source(spec);
  // As LoadRuleSetDir would: the directory names what the version must be.
  source.expected_name = "demo";
  source.expected_version = version;
  return source;
}

const RuleSetInfo* Find(const std::vector<RuleSetInfo>& list, const std::string& version) {
  for (const RuleSetInfo& info : list) {
    if (info.ref().version() == version) return &info;
  }
  return nullptr;
}

TEST(RuleStoreTest, AddsAndResolvesAVersion) {
  RuleStore store;
  ASSERT_EQ(store.AddVersion(Good("1.0.0"), "mem"), RuleSetInfo::AVAILABLE);
  EXPECT_EQ(store.AvailableCount(), 1);
  absl::StatusOr<Resolved> resolved = store.Resolve("demo", "");
  ASSERT_TRUE(resolved.ok()) << resolved.status();
  EXPECT_EQ(resolved->rule_set->version, "1.0.0");
  EXPECT_TRUE(absl::StartsWith(resolved->rule_set->digest, "sha256:"));
  resolved = store.Resolve("demo", "1.0.0");
  ASSERT_TRUE(resolved.ok()) << resolved.status();

  const std::vector<RuleSetInfo> list = store.List("");
  ASSERT_EQ(list.size(), 1u);
  EXPECT_EQ(list[0].state(), RuleSetInfo::AVAILABLE);
  EXPECT_TRUE(list[0].is_default());
  EXPECT_EQ(list[0].hypothesis_count(), 2);
  EXPECT_EQ(list[0].title(), "Demo");
  EXPECT_EQ(list[0].ref().digest(), resolved->rule_set->digest);
}

TEST(RuleStoreTest, KeepsOtherVersionsWhenOneFailsToCompile) {
  RuleStore store;
  ASSERT_EQ(store.AddVersion(Good("1.0.0"), "mem"), RuleSetInfo::AVAILABLE);
  EXPECT_EQ(store.AddVersion(Broken("1.1.0"), "mem"), RuleSetInfo::REJECTED);

  absl::StatusOr<Resolved> resolved = store.Resolve("demo", "");
  ASSERT_TRUE(resolved.ok()) << resolved.status();
  EXPECT_EQ(resolved->rule_set->version, "1.0.0");
  EXPECT_EQ(store.Resolve("demo", "1.1.0").status().code(), absl::StatusCode::kNotFound);

  const std::vector<RuleSetInfo> list = store.List("demo");
  const RuleSetInfo* rejected = Find(list, "1.1.0");
  ASSERT_NE(rejected, nullptr);
  EXPECT_EQ(rejected->state(), RuleSetInfo::REJECTED);
  EXPECT_FALSE(rejected->is_default());
  EXPECT_TRUE(absl::StrContains(rejected->reason(), "no_such_concept")) << rejected->reason();
  EXPECT_TRUE(absl::StrContains(rejected->reason(), "ruleset.textproto:")) << rejected->reason();
  // The rejected content is identified, so an operator can tell which upload failed.
  EXPECT_TRUE(absl::StartsWith(rejected->ref().digest(), "sha256:"));
  ASSERT_NE(Find(list, "1.0.0"), nullptr);
  EXPECT_TRUE(Find(list, "1.0.0")->is_default());
}

TEST(RuleStoreTest, FailedReloadOfAServedVersionKeepsServingIt) {
  RuleStore store;
  ASSERT_EQ(store.AddVersion(Good("1.0.0"), "mem"), RuleSetInfo::AVAILABLE);
  EXPECT_EQ(store.AddVersion(Broken("1.0.0"), "mem"), RuleSetInfo::REJECTED);
  absl::StatusOr<Resolved> resolved = store.Resolve("demo", "1.0.0");
  ASSERT_TRUE(resolved.ok()) << resolved.status();
  EXPECT_EQ(store.List("")[0].state(), RuleSetInfo::AVAILABLE);
}

TEST(RuleStoreTest, DefaultIsHighestSemver) {
  RuleStore store;
  for (const char* version : {"1.2.0", "1.10.0", "1.9.0"}) {
    ASSERT_EQ(store.AddVersion(Good(version), "mem"), RuleSetInfo::AVAILABLE) << version;
  }
  absl::StatusOr<Resolved> resolved = store.Resolve("demo", "");
  ASSERT_TRUE(resolved.ok()) << resolved.status();
  EXPECT_EQ(resolved->rule_set->version, "1.10.0");  // lexically, 1.9.0 would win

  const std::vector<RuleSetInfo> list = store.List("");
  ASSERT_EQ(list.size(), 3u);
  EXPECT_EQ(list[0].ref().version(), "1.2.0");
  EXPECT_EQ(list[1].ref().version(), "1.9.0");
  EXPECT_EQ(list[2].ref().version(), "1.10.0");
  EXPECT_FALSE(list[0].is_default());
  EXPECT_FALSE(list[1].is_default());
  EXPECT_TRUE(list[2].is_default());
}

TEST(RuleStoreTest, RejectsVersionWhoseCasesFail) {
  Spec spec;
  spec.version = "2.0.0";
  spec.top = "other";  // the rule set ranks ipex first: this case must fail
  RuleStore store;
  ASSERT_EQ(store.AddVersion(Good("1.0.0"), "mem"), RuleSetInfo::AVAILABLE);
  EXPECT_EQ(store.AddVersion(Source(spec), "mem"), RuleSetInfo::REJECTED);

  const std::vector<RuleSetInfo> list = store.List("demo");
  const RuleSetInfo* rejected = Find(list, "2.0.0");
  ASSERT_NE(rejected, nullptr);
  EXPECT_EQ(rejected->state(), RuleSetInfo::REJECTED);
  EXPECT_TRUE(absl::StrContains(rejected->reason(), "boy_with_diarrhoea")) << rejected->reason();
  EXPECT_EQ(store.Resolve("demo", "").value().rule_set->version, "1.0.0");
}

TEST(RuleStoreTest, RetiredVersionIsListedButNotServed) {
  Spec spec;
  spec.version = "3.0.0";
  spec.status = "RETIRED";
  RuleStore store;
  ASSERT_EQ(store.AddVersion(Good("1.0.0"), "mem"), RuleSetInfo::AVAILABLE);
  EXPECT_EQ(store.AddVersion(Source(spec), "mem"), RuleSetInfo::RETIRED);
  EXPECT_EQ(store.Resolve("demo", "").value().rule_set->version, "1.0.0");
  EXPECT_EQ(store.Resolve("demo", "3.0.0").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(store.AvailableCount(), 1);
}

TEST(RuleStoreTest, ResolveUnknownIsNotFound) {
  RuleStore store;
  ASSERT_EQ(store.AddVersion(Good("1.0.0"), "mem"), RuleSetInfo::AVAILABLE);

  absl::Status status = store.Resolve("nope", "").status();
  EXPECT_EQ(status.code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(status.message(), "rule set 'nope' is not loaded");

  status = store.Resolve("demo", "9.9.9").status();
  EXPECT_EQ(status.code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(status.message(), "version '9.9.9' of rule set 'demo' is not available");

  // Caller-supplied names are capped and escaped in messages.
  status = store.Resolve(std::string(10000, 'x') + "\n", "").status();
  EXPECT_EQ(status.code(), absl::StatusCode::kNotFound);
  EXPECT_LT(status.message().size(), 200u);
  EXPECT_FALSE(absl::StrContains(status.message(), "\n"));

  EXPECT_EQ(store.Get("nope", "").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(store.Get("demo", "9.9.9").status().code(), absl::StatusCode::kNotFound);
}

TEST(RuleStoreTest, EmptyStoreIsUnavailable) {
  RuleStore store;
  EXPECT_EQ(store.AvailableCount(), 0);
  EXPECT_TRUE(store.List("").empty());
  EXPECT_EQ(store.Resolve("demo", "").status().code(), absl::StatusCode::kUnavailable);
  // Only rejected versions: still nothing to serve.
  EXPECT_EQ(store.AddVersion(Broken("1.0.0"), "mem"), RuleSetInfo::REJECTED);
  EXPECT_EQ(store.Resolve("demo", "").status().code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(store.Resolve("demo", "1.0.0").status().code(), absl::StatusCode::kUnavailable);
}

TEST(RuleStoreTest, GetDescribesServedAndRejectedVersions) {
  RuleStore store;
  ASSERT_EQ(store.AddVersion(Good("1.0.0"), "mem"), RuleSetInfo::AVAILABLE);
  ASSERT_EQ(store.AddVersion(Broken("1.1.0"), "mem"), RuleSetInfo::REJECTED);

  absl::StatusOr<cds::v1::GetRuleSetResponse> got = store.Get("demo", "");
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->info().ref().version(), "1.0.0");
  EXPECT_EQ(got->definition().hypotheses_size(), 2);

  got = store.Get("demo", "1.1.0");
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->info().state(), RuleSetInfo::REJECTED);
  EXPECT_FALSE(got->info().reason().empty());
  EXPECT_FALSE(got->has_definition());
}

TEST(RuleStoreTest, EvaluationCounterIsPerVersion) {
  RuleStore store;
  ASSERT_EQ(store.AddVersion(Good("1.0.0"), "mem"), RuleSetInfo::AVAILABLE);
  ASSERT_EQ(store.AddVersion(Good("1.1.0"), "mem"), RuleSetInfo::AVAILABLE);
  for (int i = 0; i < 3; ++i) store.Resolve("demo", "").value().evaluations->fetch_add(1);
  store.Resolve("demo", "1.0.0").value().evaluations->fetch_add(1);
  EXPECT_EQ(Find(store.List(""), "1.1.0")->evaluation_count(), 3);
  EXPECT_EQ(Find(store.List(""), "1.0.0")->evaluation_count(), 1);
}

class TempRoot {
 public:
  TempRoot() {
    std::string templ = ::testing::TempDir() + "rule_store_test_XXXXXX";
    path_ = mkdtemp(templ.data()) != nullptr ? templ : "";
  }
  ~TempRoot() { std::filesystem::remove_all(path_); }
  const std::string& path() const { return path_; }

  void Write(const std::string& relative, const std::string& content) {
    const std::filesystem::path full = std::filesystem::path(path_) / relative;
    std::filesystem::create_directories(full.parent_path());
    std::ofstream(full) << content;
  }

 private:
  std::string path_;
};

TEST(RuleStoreTest, LoadFromDirectoryServesGoodVersionsOnly) {
  TempRoot root;
  ASSERT_FALSE(root.path().empty());
  for (const compiler::SourceFile& f : Good("1.0.0").files) {
    root.Write("demo/1.0.0/" + f.path, f.content);
  }
  for (const compiler::SourceFile& f : Broken("2.0.0").files) {
    root.Write("demo/2.0.0/" + f.path, f.content);
  }
  // The directory says 3.0.0 but the file says 1.0.0: rejected, not served as either.
  for (const compiler::SourceFile& f : Good("1.0.0").files) {
    root.Write("demo/3.0.0/" + f.path, f.content);
  }

  RuleStore::Options options;
  options.allow_unsigned = true;  // plain directories, no MANIFEST
  RuleStore store(options);
  absl::StatusOr<int> available = store.LoadFromDirectory(root.path());
  ASSERT_TRUE(available.ok()) << available.status();
  EXPECT_EQ(*available, 1);
  const std::vector<RuleSetInfo> list = store.List("demo");
  ASSERT_EQ(list.size(), 3u);
  EXPECT_EQ(Find(list, "1.0.0")->state(), RuleSetInfo::AVAILABLE);
  EXPECT_EQ(Find(list, "2.0.0")->state(), RuleSetInfo::REJECTED);
  EXPECT_EQ(Find(list, "3.0.0")->state(), RuleSetInfo::REJECTED);
  EXPECT_TRUE(absl::StrContains(Find(list, "3.0.0")->reason(), "does not match"))
      << Find(list, "3.0.0")->reason();
  EXPECT_EQ(store.Resolve("demo", "").value().rule_set->version, "1.0.0");
}

TEST(RuleStoreTest, LoadFromMissingDirectoryIsAnError) {
  RuleStore store;
  absl::StatusOr<int> available = store.LoadFromDirectory("/nonexistent/cds/rules");
  EXPECT_FALSE(available.ok());
  EXPECT_TRUE(absl::StrContains(available.status().message(), "/nonexistent/cds/rules"));
}

TEST(RuleStoreTest, ReadersAreNotDisturbedByVersionsBeingAdded) {
  RuleStore store;
  ASSERT_EQ(store.AddVersion(Good("1.0.0"), "mem"), RuleSetInfo::AVAILABLE);
  std::atomic<bool> stop{false};
  std::atomic<int> failures{0};
  std::vector<std::thread> readers;
  for (int t = 0; t < 4; ++t) {
    readers.emplace_back([&] {
      while (!stop.load()) {
        absl::StatusOr<Resolved> r = store.Resolve("demo", "");
        if (!r.ok() || r->rule_set == nullptr) failures.fetch_add(1);
        store.List("");
      }
    });
  }
  for (int minor = 1; minor <= 5; ++minor) {
    store.AddVersion(Good(absl::StrCat("1.", minor, ".0")), "mem");
    store.AddVersion(Broken(absl::StrCat("2.", minor, ".0")), "mem");
  }
  stop.store(true);
  for (std::thread& t : readers) t.join();
  EXPECT_EQ(failures.load(), 0);
  EXPECT_EQ(store.Resolve("demo", "").value().rule_set->version, "1.5.0");
}

// ---- lifecycle: signed bundles, publish, labels, persistence, scans ------------------------

// A store with a state directory and one trusted key, and helpers to make bundles.
class LifecycleTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_FALSE(root_.path().empty());
    key_ = bundle::PrivateKey::Generate().value();
    root_.Write("keys/author.pub", key_.public_key().ToPem());
    store_ = std::make_unique<RuleStore>(StoreOptions());
  }

  RuleStore::Options StoreOptions() const {
    RuleStore::Options options;
    options.trusted_keys_dir = root_.path() + "/keys";
    options.state_dir = root_.path() + "/state";
    options.ontology_dir = root_.path() + "/ontology";
    return options;
  }

  cds::v1::Bundle Signed(const compiler::RuleSetSource& source, const std::string& version,
                         const bundle::PrivateKey* key = nullptr, const std::string& name = "demo") {
    return bundle::SignFiles(name, version, source.files, "test", key ? *key : key_, absl::Now())
        .value();
  }

  // Publishes and returns the refusal's reason name (the message's first word) or "OK".
  std::string PublishReason(const cds::v1::Bundle& bundle) {
    absl::StatusOr<PublishResult> result = store_->Publish(bundle);
    if (result.ok()) return "OK";
    const std::string message(result.status().message());
    return message.substr(0, message.find(':'));
  }

  TempRoot root_;
  bundle::PrivateKey key_;
  std::unique_ptr<RuleStore> store_;
};

TEST_F(LifecycleTest, PublishedBundleServesAndRepublishingIsANoOp) {
  absl::StatusOr<PublishResult> published = store_->Publish(Signed(Good("1.0.0"), "1.0.0"));
  ASSERT_TRUE(published.ok()) << published.status();
  EXPECT_TRUE(published->created);
  EXPECT_EQ(published->info.state(), RuleSetInfo::AVAILABLE);
  EXPECT_EQ(published->info.signer(), key_.public_key().key_id());
  EXPECT_EQ(published->info.origin(), "published");
  EXPECT_EQ(store_->Resolve("demo", "").value().rule_set->version, "1.0.0");
  published = store_->Publish(Signed(Good("1.0.0"), "1.0.0"));  // new signature, same files
  ASSERT_TRUE(published.ok()) << published.status();
  EXPECT_FALSE(published->created);
}

TEST_F(LifecycleTest, EachBadBundleIsRejectedWithItsOwnReasonAndServingIsUntouched) {
  ASSERT_TRUE(store_->Publish(Signed(Good("1.0.0"), "1.0.0")).ok());
  const std::string digest = store_->Resolve("demo", "1.0.0").value().rule_set->digest;

  const cds::v1::Bundle good = Signed(Good("1.1.0"), "1.1.0");
  cds::v1::Bundle bad_signature = good;
  std::string manifest = bad_signature.manifest();
  manifest[manifest.size() - 3] ^= 1;
  bad_signature.set_manifest(manifest);
  const bundle::PrivateKey stranger = bundle::PrivateKey::Generate().value();
  cds::v1::Bundle tampered = good;
  tampered.mutable_files(1)->mutable_content()->append("\n# edited after signing\n");
  cds::v1::Bundle missing = good;
  missing.mutable_files()->RemoveLast();
  cds::v1::Bundle extra = good;
  extra.add_files()->set_path("notes.txt");
  Spec failing;
  failing.version = "1.1.0";
  failing.top = "other";
  Spec changed;
  changed.version = "1.0.0";
  changed.extra = "references { id: \"r\" citation: \"changed content\" }";
  cds::v1::Bundle unsigned_bundle = good;
  unsigned_bundle.clear_signature();

  const std::vector<std::pair<std::string, cds::v1::Bundle>> cases = {
      {"BAD_SIGNATURE", bad_signature},
      {"UNKNOWN_KEY", Signed(Good("1.1.0"), "1.1.0", &stranger)},
      {"TAMPERED_FILE", tampered},
      {"MISSING_FILE", missing},
      {"EXTRA_FILE", extra},
      {"COMPILE_ERROR", Signed(Broken("1.1.0"), "1.1.0")},
      {"FAILING_TEST", Signed(Source(failing), "1.1.0")},
      {"VERSION_CONFLICT", Signed(Source(changed), "1.0.0")},
      {"MANIFEST_MISMATCH", Signed(Good("1.1.0"), "1.1.0", nullptr, "other")},
      {"EMPTY_BUNDLE", cds::v1::Bundle()},
      {"UNSIGNED", unsigned_bundle},
  };
  for (const auto& [reason, bundle] : cases) {
    EXPECT_EQ(PublishReason(bundle), reason);
    absl::StatusOr<Resolved> serving = store_->Resolve("demo", "");
    ASSERT_TRUE(serving.ok()) << reason;
    EXPECT_EQ(serving->rule_set->version, "1.0.0") << reason;
    EXPECT_EQ(serving->rule_set->digest, digest) << reason;
    EXPECT_EQ(store_->AvailableCount(), 1) << reason;
  }
  EXPECT_EQ(store_->PublishBytes("").status().message().substr(0, 12), "EMPTY_BUNDLE");
  EXPECT_EQ(store_->PublishBytes("\xff\xff garbage").status().message().substr(0, 16),
            "MALFORMED_BUNDLE");
  // Author mistakes past the signature are listed, with their reason.
  const std::vector<RuleSetInfo> list = store_->List("demo");
  const RuleSetInfo* rejected = Find(list, "1.1.0");
  ASSERT_NE(rejected, nullptr);
  EXPECT_EQ(rejected->state(), RuleSetInfo::REJECTED);
  EXPECT_NE(rejected->reject_reason(), cds::v1::REJECT_REASON_UNSPECIFIED);
  // Nothing but the good version reached the disk.
  EXPECT_TRUE(std::filesystem::exists(root_.path() + "/state/bundles/demo/1.0.0/MANIFEST.sig"));
  EXPECT_FALSE(std::filesystem::exists(root_.path() + "/state/bundles/demo/1.1.0"));
}

TEST_F(LifecycleTest, LabelsPickTheDefaultAndRollBack) {
  ASSERT_TRUE(store_->Publish(Signed(Good("1.0.0"), "1.0.0")).ok());
  ASSERT_TRUE(store_->Publish(Signed(Good("1.0.1"), "1.0.1")).ok());
  EXPECT_EQ(store_->Resolve("demo", "").value().rule_set->version, "1.0.1");  // highest
  ASSERT_TRUE(store_->SetLabel("demo", "stable", "1.0.0").ok());
  ASSERT_TRUE(store_->SetLabel("demo", "canary", "1.0.1").ok());
  Resolved by_default = store_->Resolve("demo", "").value();
  EXPECT_EQ(by_default.rule_set->version, "1.0.0");
  EXPECT_EQ(by_default.label, "stable");
  EXPECT_EQ(store_->Resolve("demo", "", "canary").value().rule_set->version, "1.0.1");
  EXPECT_EQ(store_->Resolve("demo", "", "nope").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(store_->SetLabel("demo", "stable", "1.0.1").value(), "1.0.0");  // promote
  EXPECT_EQ(store_->Resolve("demo", "").value().rule_set->version, "1.0.1");
  EXPECT_EQ(store_->SetLabel("demo", "stable", "1.0.0").value(), "1.0.1");  // roll back
  EXPECT_EQ(store_->Resolve("demo", "").value().rule_set->version, "1.0.0");
  EXPECT_EQ(store_->SetLabel("demo", "stable", "9.9.9").status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(store_->SetLabel("demo", "Bad Label", "1.0.0").status().code(),
            absl::StatusCode::kInvalidArgument);
  const std::vector<RuleSetInfo> list = store_->List("demo");
  const RuleSetInfo* info = Find(list, "1.0.1");
  ASSERT_NE(info, nullptr);
  ASSERT_EQ(info->labels_size(), 1);
  EXPECT_EQ(info->labels(0), "canary");

  // Retiring a labelled version is refused; an unlabelled one stops serving.
  EXPECT_EQ(store_->Retire("demo", "1.0.1").status().code(),
            absl::StatusCode::kFailedPrecondition);
  ASSERT_TRUE(store_->SetLabel("demo", "canary", "1.0.0").ok());
  ASSERT_TRUE(store_->Retire("demo", "1.0.1").ok());
  EXPECT_EQ(store_->Resolve("demo", "1.0.1").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(Find(store_->List("demo"), "1.0.1")->state(), RuleSetInfo::RETIRED);
  // Retiring again (a retry after a lost response) answers the same; an unknown version
  // is NOT_FOUND.
  absl::StatusOr<RuleSetInfo> again = store_->Retire("demo", "1.0.1");
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->state(), RuleSetInfo::RETIRED);
  EXPECT_EQ(store_->Retire("demo", "9.9.9").status().code(), absl::StatusCode::kNotFound);
  // A REJECTED version is not served: nothing to retire.
  ASSERT_EQ(store_->AddVersion(Broken("7.0.0"), "mem"), RuleSetInfo::REJECTED);
  EXPECT_EQ(store_->Retire("demo", "7.0.0").status().code(),
            absl::StatusCode::kFailedPrecondition);
}

TEST_F(LifecycleTest, ARestartRestoresVersionsLabelsAndRetirements) {
  ASSERT_TRUE(store_->Publish(Signed(Good("1.0.0"), "1.0.0")).ok());
  ASSERT_TRUE(store_->Publish(Signed(Good("1.0.1"), "1.0.1")).ok());
  ASSERT_TRUE(store_->Publish(Signed(Good("1.0.2"), "1.0.2")).ok());
  ASSERT_TRUE(store_->SetLabel("demo", "stable", "1.0.1").ok());
  ASSERT_TRUE(store_->Retire("demo", "1.0.2").ok());
  // Leftovers of a publish that died before its rename.
  root_.Write("state/tmp/bundle-1-2-3/ruleset.textproto", "half");

  RuleStore restarted(StoreOptions());
  ASSERT_EQ(restarted.RestoreState().value(), 2);
  EXPECT_EQ(restarted.Resolve("demo", "").value().rule_set->version, "1.0.1");
  EXPECT_EQ(Find(restarted.List("demo"), "1.0.2")->state(), RuleSetInfo::RETIRED);
  EXPECT_TRUE(std::filesystem::is_empty(root_.path() + "/state/tmp"));

  // A key no longer trusted: its bundles are not served after a restart.
  std::filesystem::remove(root_.path() + "/keys/author.pub");
  RuleStore distrustful(StoreOptions());
  EXPECT_EQ(distrustful.RestoreState().value(), 0);
}

// The gate stages a verified bundle under tmp/ while it compiles: whatever fails the rest
// of the gate (or is already there) leaves nothing behind, and only what passed is committed.
TEST_F(LifecycleTest, OnlyBundlesThatPassTheGateArePersisted) {
  ASSERT_EQ(PublishReason(Signed(Good("1.0.0"), "1.0.0")), "OK");
  Spec failing;
  failing.version = "1.1.0";
  failing.top = "other";
  Spec changed;
  changed.version = "1.0.0";
  changed.extra = "references { id: \"r\" citation: \"changed content\" }";
  EXPECT_EQ(PublishReason(Signed(Broken("1.1.0"), "1.1.0")), "COMPILE_ERROR");
  EXPECT_EQ(PublishReason(Signed(Source(failing), "1.1.0")), "FAILING_TEST");
  EXPECT_EQ(PublishReason(Signed(Source(changed), "1.0.0")), "VERSION_CONFLICT");
  EXPECT_EQ(PublishReason(Signed(Good("1.0.0"), "1.0.0")), "OK");  // the same content again
  EXPECT_TRUE(std::filesystem::is_empty(root_.path() + "/state/tmp"));
  std::vector<std::string> persisted;
  for (const auto& entry :
       std::filesystem::directory_iterator(root_.path() + "/state/bundles/demo")) {
    persisted.push_back(entry.path().filename().string());
  }
  EXPECT_EQ(persisted, std::vector<std::string>{"1.0.0"});
  EXPECT_TRUE(std::filesystem::exists(root_.path() + "/state/bundles/demo/1.0.0/MANIFEST.sig"));
}

// A published version whose bundle no longer passes the gate at a restart (here: its key is
// no longer trusted) is listed REJECTED, but it was published: other content under the
// same name@version is still a VERSION_CONFLICT and its bundle is not replaced. Its own
// content, signed with a trusted key, brings it back; a version whose publish was refused
// (never persisted) can still be published fixed.
TEST_F(LifecycleTest, AVersionRejectedAtRestartIsNeverRepublishedWithOtherContent) {
  const bundle::PrivateKey other = bundle::PrivateKey::Generate().value();
  root_.Write("keys/other.pub", other.public_key().ToPem());
  ASSERT_EQ(PublishReason(Signed(Good("1.0.0"), "1.0.0", &other)), "OK");
  ASSERT_EQ(PublishReason(Signed(Good("1.0.1"), "1.0.1")), "OK");
  const std::string dir = root_.path() + "/state/bundles/demo/1.0.0";
  const std::string persisted = bundle::ReadBundleDir(dir).value().manifest();
  std::filesystem::remove(root_.path() + "/keys/other.pub");
  store_ = std::make_unique<RuleStore>(StoreOptions());
  ASSERT_EQ(store_->RestoreState().value(), 1);
  ASSERT_EQ(Find(store_->List("demo"), "1.0.0")->state(), RuleSetInfo::REJECTED);

  Spec changed;
  changed.extra = "references { id: \"r\" citation: \"changed content\" }";
  absl::Status conflict = store_->Publish(Signed(Source(changed), "1.0.0")).status();
  EXPECT_EQ(conflict.code(), absl::StatusCode::kAlreadyExists) << conflict;
  EXPECT_TRUE(absl::StartsWith(conflict.message(), "VERSION_CONFLICT")) << conflict;
  EXPECT_EQ(bundle::ReadBundleDir(dir).value().manifest(), persisted);
  EXPECT_EQ(store_->Resolve("demo", "1.0.0").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(Find(store_->List("demo"), "1.0.0")->state(), RuleSetInfo::REJECTED);

  absl::StatusOr<PublishResult> resigned = store_->Publish(Signed(Good("1.0.0"), "1.0.0"));
  ASSERT_TRUE(resigned.ok()) << resigned.status();
  EXPECT_EQ(resigned->info.state(), RuleSetInfo::AVAILABLE);
  EXPECT_EQ(resigned->info.signer(), key_.public_key().key_id());

  Spec failing;
  failing.version = "1.1.0";
  failing.top = "other";
  EXPECT_EQ(PublishReason(Signed(Source(failing), "1.1.0")), "FAILING_TEST");
  EXPECT_EQ(PublishReason(Signed(Good("1.1.0"), "1.1.0")), "OK");
}

// Keys are parsed again only when the directory changes, and every change is seen by the
// next publish: a key added, one replaced in place (same name and size), one removed.
TEST_F(LifecycleTest, TrustedKeyChangesApplyToTheNextPublish) {
  const bundle::PrivateKey other = bundle::PrivateKey::Generate().value();
  ASSERT_EQ(PublishReason(Signed(Good("1.0.0"), "1.0.0")), "OK");
  EXPECT_EQ(PublishReason(Signed(Good("1.0.1"), "1.0.1", &other)), "UNKNOWN_KEY");
  root_.Write("keys/other.pub", other.public_key().ToPem());
  EXPECT_EQ(PublishReason(Signed(Good("1.0.1"), "1.0.1", &other)), "OK");
  std::filesystem::remove(root_.path() + "/keys/author.pub");
  EXPECT_EQ(PublishReason(Signed(Good("1.0.2"), "1.0.2")), "UNKNOWN_KEY");
  // other.pub now holds the first key instead (PEM Ed25519 keys all have the same size).
  root_.Write("keys/other.pub", key_.public_key().ToPem());
  EXPECT_EQ(PublishReason(Signed(Good("1.0.2"), "1.0.2")), "OK");
  EXPECT_EQ(PublishReason(Signed(Good("1.0.3"), "1.0.3", &other)), "UNKNOWN_KEY");
}

// ---- retention (Options::keep_versions) -----------------------------------------------------

class RetentionTest : public LifecycleTest {
 protected:
  void SetUp() override {
    LifecycleTest::SetUp();
    store_ = std::make_unique<RuleStore>(Options());
  }
  RuleStore::Options Options() const {
    RuleStore::Options options = StoreOptions();
    options.keep_versions = 2;
    return options;
  }
  void Publish(const std::string& version) {
    absl::StatusOr<PublishResult> result = store_->Publish(Signed(Good(version), version));
    ASSERT_TRUE(result.ok()) << version << ": " << result.status();
  }
  static std::map<std::string, RuleSetInfo::State> States(const RuleStore& store) {
    std::map<std::string, RuleSetInfo::State> states;
    for (const RuleSetInfo& info : store.List("demo")) states[info.ref().version()] = info.state();
    return states;
  }
};

TEST_F(RetentionTest, KeepsLabelledAndNewestVersionsAndUnloadsTheRest) {
  Publish("1.0.0");
  ASSERT_TRUE(store_->SetLabel("demo", "stable", "1.0.0").ok());
  for (const char* version : {"1.0.1", "1.0.2", "1.0.3", "1.0.4"}) Publish(version);

  using S = RuleSetInfo;
  EXPECT_EQ(States(*store_), (std::map<std::string, S::State>{{"1.0.0", S::AVAILABLE},
                                                               {"1.0.1", S::UNLOADED},
                                                               {"1.0.2", S::UNLOADED},
                                                               {"1.0.3", S::AVAILABLE},
                                                               {"1.0.4", S::AVAILABLE}}));
  EXPECT_EQ(store_->LoadedCount(), 3);
  EXPECT_EQ(store_->AvailableCount(), 3);
  EXPECT_EQ(store_->Resolve("demo", "").value().rule_set->version, "1.0.0");  // stable
  absl::Status pinned = store_->Resolve("demo", "1.0.1").status();
  EXPECT_EQ(pinned.code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(absl::StrContains(pinned.message(), "unloaded by the retention policy")) << pinned;
  // An unloaded version is still described (from what it was when loaded).
  const std::vector<RuleSetInfo> list = store_->List("demo");
  const RuleSetInfo* unloaded = Find(list, "1.0.1");
  ASSERT_NE(unloaded, nullptr);
  EXPECT_EQ(unloaded->title(), "Demo");
  EXPECT_EQ(unloaded->hypothesis_count(), 2);
  EXPECT_TRUE(absl::StartsWith(unloaded->ref().digest(), "sha256:"));
  absl::StatusOr<cds::v1::GetRuleSetResponse> got = store_->Get("demo", "1.0.1");
  ASSERT_TRUE(got.ok());
  EXPECT_EQ(got->info().state(), RuleSetInfo::UNLOADED);
  EXPECT_FALSE(got->has_definition());

  // The label moves on: the version it left is neither labelled nor among the newest.
  ASSERT_TRUE(store_->SetLabel("demo", "stable", "1.0.4").ok());
  EXPECT_EQ(States(*store_)["1.0.0"], RuleSetInfo::UNLOADED);
  EXPECT_EQ(store_->LoadedCount(), 2);
  EXPECT_EQ(store_->Resolve("demo", "").value().rule_set->version, "1.0.4");
  // A published version is still never edited.
  absl::StatusOr<PublishResult> again = store_->Publish(Signed(Good("1.0.1"), "1.0.1"));
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_FALSE(again->created);
  Spec changed;
  changed.version = "1.0.1";
  changed.extra = R"pb(hypotheses {
    id: "third"
    title: "Third"
    code { system: "OMIM" code: "OMIM:100001" }
    pretest_probability: 0.01
    pretest_provenance { assumption: true note: "test" }
  })pb";
  EXPECT_EQ(PublishReason(Signed(Source(changed), "1.0.1")), "VERSION_CONFLICT");
}

TEST_F(RetentionTest, ACallInFlightKeepsItsVersionUntilItFinishes) {
  Publish("1.0.0");
  Resolved in_flight = store_->Resolve("demo", "1.0.0").value();
  std::weak_ptr<const compiler::CompiledRuleSet> watch = in_flight.rule_set;
  for (const char* version : {"1.0.1", "1.0.2"}) Publish(version);
  EXPECT_EQ(States(*store_)["1.0.0"], RuleSetInfo::UNLOADED);
  // Still whole for the call that holds it, and held by nothing else...
  ASSERT_FALSE(watch.expired());
  EXPECT_EQ(in_flight.rule_set->version, "1.0.0");
  EXPECT_EQ(in_flight.rule_set.use_count(), 1);
  // ...so it is freed when that call ends.
  in_flight = Resolved();
  EXPECT_TRUE(watch.expired());
}

TEST_F(RetentionTest, RetiredVersionsBeyondTheNewestDropTheirDefinition) {
  for (const char* version : {"1.0.0", "1.0.1", "1.0.2"}) Publish(version);
  EXPECT_EQ(States(*store_)["1.0.0"], RuleSetInfo::UNLOADED);
  ASSERT_TRUE(store_->Retire("demo", "1.0.2").ok());
  // 1.0.3 and 1.0.1 are the two highest served; the retired 1.0.2 is among the two highest.
  Publish("1.0.3");
  EXPECT_EQ(store_->LoadedCount(), 3);
  EXPECT_TRUE(store_->Get("demo", "1.0.2").value().has_definition());
  Publish("1.0.4");
  EXPECT_EQ(States(*store_)["1.0.2"], RuleSetInfo::RETIRED);
  EXPECT_FALSE(store_->Get("demo", "1.0.2").value().has_definition());
  EXPECT_EQ(States(*store_)["1.0.1"], RuleSetInfo::UNLOADED);
  EXPECT_EQ(store_->LoadedCount(), 2);  // 1.0.4 and 1.0.3
  EXPECT_EQ(store_->Resolve("demo", "").value().rule_set->version, "1.0.4");
}

// bench/soak.sh's pattern: `stable` flips between two old versions while newer ones are
// published and retired. Three versions are served at any time; retired versions never
// push a served one out.
TEST_F(RetentionTest, LabelFlipsBetweenOldVersionsSurviveNewerRetiredOnes) {
  RuleStore::Options options = Options();
  options.keep_versions = 3;
  store_ = std::make_unique<RuleStore>(options);
  Publish("1.0.0");
  Publish("1.1.0");
  ASSERT_TRUE(store_->SetLabel("demo", "stable", "1.0.0").ok());
  std::string previous;
  for (int patch = 1; patch <= 6; ++patch) {
    const std::string version = absl::StrCat("1.1.", 100 + patch);
    Publish(version);
    if (!previous.empty()) {
      ASSERT_TRUE(store_->Retire("demo", previous).ok());
    }
    previous = version;
    for (const char* target : {"1.1.0", "1.0.0"}) {
      absl::StatusOr<std::string> moved = store_->SetLabel("demo", "stable", target);
      ASSERT_TRUE(moved.ok()) << target << " after " << version << ": " << moved.status();
    }
  }
  EXPECT_EQ(States(*store_)["1.1.0"], RuleSetInfo::AVAILABLE);
  EXPECT_EQ(States(*store_)["1.1.101"], RuleSetInfo::RETIRED);
  // 1.0.0, 1.1.0, 1.1.106, and the retired 1.1.105 and 1.1.104 (among the 3 highest).
  EXPECT_EQ(store_->LoadedCount(), 5);
  EXPECT_FALSE(store_->Get("demo", "1.1.103").value().has_definition());
}

TEST_F(RetentionTest, RetiringTheLastServedVersionIsRefusedOnceOlderOnesAreUnloaded) {
  RuleStore::Options options = Options();
  options.keep_versions = 1;
  store_ = std::make_unique<RuleStore>(options);
  Publish("1.0.0");
  Publish("1.0.1");
  ASSERT_EQ(States(*store_)["1.0.0"], RuleSetInfo::UNLOADED);
  // Without retention 1.0.0 would take over; here nothing would be left to serve.
  absl::Status retired = store_->Retire("demo", "1.0.1").status();
  EXPECT_EQ(retired.code(), absl::StatusCode::kFailedPrecondition) << retired;
  EXPECT_EQ(store_->Resolve("demo", "").value().rule_set->version, "1.0.1");
  // With a newer version served, 1.0.1 is unloaded in turn.
  Publish("1.0.2");
  EXPECT_EQ(States(*store_)["1.0.1"], RuleSetInfo::UNLOADED);
  EXPECT_EQ(store_->Resolve("demo", "").value().rule_set->version, "1.0.2");
}

TEST_F(RetentionTest, ARestartUnloadsTheSameVersionsAgain) {
  Publish("1.0.0");
  ASSERT_TRUE(store_->SetLabel("demo", "stable", "1.0.0").ok());
  for (const char* version : {"1.0.1", "1.0.2", "1.0.3"}) Publish(version);
  const std::map<std::string, RuleSetInfo::State> before = States(*store_);
  ASSERT_EQ(before.at("1.0.1"), RuleSetInfo::UNLOADED);

  RuleStore restarted(Options());
  ASSERT_TRUE(restarted.RestoreState().ok());
  EXPECT_EQ(States(restarted), before);
  EXPECT_EQ(restarted.LoadedCount(), 3);
  EXPECT_EQ(restarted.Resolve("demo", "").value().rule_set->version, "1.0.0");
}

// A rollback to an unloaded version: the label loads it again (through the gate) and then
// keeps it; once the label moves on, retention unloads it again.
TEST_F(RetentionTest, LabellingAnUnloadedVersionLoadsItAgain) {
  for (const char* version : {"1.0.0", "1.0.1", "1.0.2", "1.0.3"}) Publish(version);
  ASSERT_EQ(States(*store_)["1.0.1"], RuleSetInfo::UNLOADED);
  const std::string digest = Find(store_->List("demo"), "1.0.1")->ref().digest();
  // Evaluating it does not load it: only a label does.
  absl::Status pinned = store_->Resolve("demo", "1.0.1").status();
  EXPECT_EQ(pinned.code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(absl::StrContains(pinned.message(), "labelling it loads it again")) << pinned;
  EXPECT_EQ(store_->LoadedCount(), 2);

  const int64_t compiles = store_->CompileCount();
  absl::StatusOr<std::string> previous = store_->SetLabel("demo", "canary", "1.0.1");
  ASSERT_TRUE(previous.ok()) << previous.status();
  EXPECT_EQ(*previous, "");
  EXPECT_EQ(store_->CompileCount(), compiles + 1);
  EXPECT_EQ(States(*store_)["1.0.1"], RuleSetInfo::AVAILABLE);
  EXPECT_EQ(store_->LoadedCount(), 3);  // labelled, and the two newest
  EXPECT_EQ(store_->Resolve("demo", "", "canary").value().rule_set->version, "1.0.1");
  EXPECT_EQ(store_->Resolve("demo", "1.0.1").value().rule_set->digest, digest);
  EXPECT_EQ(store_->Resolve("demo", "").value().rule_set->version, "1.0.3");  // no stable
  const std::vector<RuleSetInfo> list = store_->List("demo");
  EXPECT_EQ(Find(list, "1.0.1")->ref().digest(), digest);
  EXPECT_EQ(Find(list, "1.0.1")->signer(), key_.public_key().key_id());

  ASSERT_TRUE(store_->SetLabel("demo", "canary", "1.0.3").ok());
  EXPECT_EQ(States(*store_)["1.0.1"], RuleSetInfo::UNLOADED);
  EXPECT_EQ(store_->LoadedCount(), 2);
  // A version that is not there at all is still NOT_FOUND.
  EXPECT_EQ(store_->SetLabel("demo", "canary", "0.9.0").status().code(),
            absl::StatusCode::kNotFound);
}

// The persisted bundle of an unloaded version was damaged: labelling it is refused with
// the reason, the label stays where it was, and the version is listed REJECTED.
TEST_F(RetentionTest, ACorruptedUnloadedBundleIsRefusedWhenLabelled) {
  for (const char* version : {"1.0.0", "1.0.1", "1.0.2"}) Publish(version);
  ASSERT_TRUE(store_->SetLabel("demo", "stable", "1.0.2").ok());
  ASSERT_EQ(States(*store_)["1.0.0"], RuleSetInfo::UNLOADED);
  std::ofstream(root_.path() + "/state/bundles/demo/1.0.0/ruleset.textproto", std::ios::app)
      << "\n# edited on disk\n";

  absl::Status labelled = store_->SetLabel("demo", "stable", "1.0.0").status();
  EXPECT_EQ(labelled.code(), absl::StatusCode::kFailedPrecondition) << labelled;
  EXPECT_TRUE(absl::StrContains(labelled.message(), "demo@1.0.0")) << labelled;
  EXPECT_TRUE(absl::StrContains(labelled.message(), "TAMPERED_FILE")) << labelled;
  Resolved serving = store_->Resolve("demo", "").value();
  EXPECT_EQ(serving.rule_set->version, "1.0.2");
  EXPECT_EQ(serving.label, "stable");
  const std::vector<RuleSetInfo> list = store_->List("demo");
  const RuleSetInfo* rejected = Find(list, "1.0.0");
  EXPECT_EQ(rejected->state(), RuleSetInfo::REJECTED);
  EXPECT_EQ(rejected->reject_reason(), cds::v1::TAMPERED_FILE);
  EXPECT_EQ(store_->LoadedCount(), 2);
  // The label's persisted state did not move either.
  RuleStore restarted(Options());
  ASSERT_TRUE(restarted.RestoreState().ok());
  EXPECT_EQ(restarted.Resolve("demo", "").value().rule_set->version, "1.0.2");
}

// The same when the version was unloaded and its bundle failed the gate when a label tried
// to load it again: still VERSION_CONFLICT for other content, the damaged bundle is left as
// it is, and the version's own content repairs it.
TEST_F(RetentionTest, AVersionRejectedOnReloadIsNeverRepublishedWithOtherContent) {
  for (const char* version : {"1.0.0", "1.0.1", "1.0.2"}) Publish(version);
  ASSERT_EQ(States(*store_)["1.0.0"], RuleSetInfo::UNLOADED);
  const std::string digest = Find(store_->List("demo"), "1.0.0")->ref().digest();
  const std::string dir = root_.path() + "/state/bundles/demo/1.0.0";
  std::ofstream(dir + "/ruleset.textproto", std::ios::app) << "\n# edited on disk\n";
  auto edited = [&dir] {
    return absl::StrContains(bundle::ReadBundleDir(dir).value().DebugString(), "edited on disk");
  };
  ASSERT_EQ(store_->SetLabel("demo", "canary", "1.0.0").status().code(),
            absl::StatusCode::kFailedPrecondition);
  ASSERT_EQ(States(*store_)["1.0.0"], RuleSetInfo::REJECTED);

  Spec changed;
  changed.extra = "references { id: \"r\" citation: \"changed content\" }";
  EXPECT_EQ(PublishReason(Signed(Source(changed), "1.0.0")), "VERSION_CONFLICT");
  EXPECT_TRUE(edited());
  const std::vector<RuleSetInfo> list = store_->List("demo");
  EXPECT_EQ(Find(list, "1.0.0")->state(), RuleSetInfo::REJECTED);
  EXPECT_EQ(Find(list, "1.0.0")->ref().digest(), digest);

  absl::StatusOr<PublishResult> repaired = store_->Publish(Signed(Good("1.0.0"), "1.0.0"));
  ASSERT_TRUE(repaired.ok()) << repaired.status();
  EXPECT_TRUE(repaired->created);
  EXPECT_FALSE(edited());
  ASSERT_TRUE(store_->SetLabel("demo", "canary", "1.0.0").ok());
  EXPECT_EQ(store_->Resolve("demo", "", "canary").value().rule_set->digest, digest);
}

// An unloaded version is still a version the server holds: retiring it lists it RETIRED
// without loading it, even when only one version is left serving, and a restart keeps it so.
TEST_F(RetentionTest, RetiringAnUnloadedVersionRetiresItWithoutLoadingIt) {
  RuleStore::Options options = Options();
  options.keep_versions = 1;
  store_ = std::make_unique<RuleStore>(options);
  for (const char* version : {"1.0.0", "1.0.1", "1.0.2"}) Publish(version);
  ASSERT_EQ(States(*store_)["1.0.0"], RuleSetInfo::UNLOADED);
  const int64_t compiles = store_->CompileCount();

  absl::StatusOr<RuleSetInfo> retired = store_->Retire("demo", "1.0.0");
  ASSERT_TRUE(retired.ok()) << retired.status();
  EXPECT_EQ(retired->state(), RuleSetInfo::RETIRED);
  EXPECT_EQ(retired->title(), "Demo");
  EXPECT_EQ(store_->CompileCount(), compiles);
  EXPECT_EQ(store_->LoadedCount(), 1);
  EXPECT_EQ(store_->Resolve("demo", "").value().rule_set->version, "1.0.2");
  EXPECT_EQ(store_->Resolve("demo", "1.0.0").status().code(), absl::StatusCode::kNotFound);
  // The last served one (1.0.1 is still unloaded): refused as before.
  EXPECT_EQ(store_->Retire("demo", "1.0.2").status().code(),
            absl::StatusCode::kFailedPrecondition);

  RuleStore restarted(options);
  ASSERT_TRUE(restarted.RestoreState().ok());
  EXPECT_EQ(States(restarted)["1.0.0"], RuleSetInfo::RETIRED);
  EXPECT_EQ(States(restarted)["1.0.1"], RuleSetInfo::UNLOADED);
  EXPECT_EQ(restarted.Resolve("demo", "").value().rule_set->version, "1.0.2");
}

// A server with a long history compiles, at start-up, only the versions it keeps: labelled
// ones and the newest. The others are listed UNLOADED straight away and loaded only when
// labelled; a bundle damaged on disk among them is found out then.
TEST_F(RetentionTest, ARestartGatesOnlyTheVersionsItKeeps) {
  Publish("1.0.0");
  ASSERT_TRUE(store_->SetLabel("demo", "stable", "1.0.0").ok());
  for (int patch = 1; patch <= 11; ++patch) Publish(absl::StrCat("1.0.", patch));
  ASSERT_TRUE(store_->SetLabel("demo", "canary", "1.0.4").ok());
  const std::map<std::string, RuleSetInfo::State> before = States(*store_);
  ASSERT_EQ(before.at("1.0.3"), RuleSetInfo::UNLOADED);
  std::ofstream(root_.path() + "/state/bundles/demo/1.0.2/ruleset.textproto", std::ios::app)
      << "\n# edited on disk\n";

  RuleStore restarted(Options());
  ASSERT_EQ(restarted.RestoreState().value(), 4);
  // 1.0.0 (stable), 1.0.4 (canary), 1.0.11 and 1.0.10: four compiles, not twelve.
  EXPECT_EQ(restarted.CompileCount(), 4);
  EXPECT_EQ(restarted.LoadedCount(), 4);
  EXPECT_EQ(States(restarted), before);
  Resolved by_default = restarted.Resolve("demo", "").value();
  EXPECT_EQ(by_default.rule_set->version, "1.0.0");
  EXPECT_EQ(by_default.label, "stable");
  EXPECT_EQ(restarted.Resolve("demo", "", "canary").value().rule_set->version, "1.0.4");
  // Listed from the directory alone: the digest (which republishing compares with), no
  // load time, no signer or title until it is loaded.
  const std::vector<RuleSetInfo> before_list = store_->List("demo");
  const std::vector<RuleSetInfo> list = restarted.List("demo");
  const RuleSetInfo* listed = Find(list, "1.0.3");
  EXPECT_EQ(listed->ref().digest(), Find(before_list, "1.0.3")->ref().digest());
  EXPECT_FALSE(listed->has_loaded_at());
  EXPECT_EQ(listed->signer(), "");
  EXPECT_TRUE(Find(list, "1.0.4")->has_loaded_at());
  absl::StatusOr<PublishResult> again = restarted.Publish(Signed(Good("1.0.3"), "1.0.3"));
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_FALSE(again->created);
  EXPECT_EQ(restarted.CompileCount(), 5);  // the republish's own gate

  // Labelling one loads it (one more compile) and serves it.
  ASSERT_TRUE(restarted.SetLabel("demo", "canary", "1.0.3").ok());
  EXPECT_EQ(restarted.CompileCount(), 6);
  EXPECT_EQ(restarted.Resolve("demo", "", "canary").value().rule_set->version, "1.0.3");
  const std::vector<RuleSetInfo> loaded_list = restarted.List("demo");
  listed = Find(loaded_list, "1.0.3");
  EXPECT_EQ(listed->state(), RuleSetInfo::AVAILABLE);
  EXPECT_EQ(listed->title(), "Demo");
  EXPECT_EQ(listed->signer(), key_.public_key().key_id());
  EXPECT_EQ(States(restarted)["1.0.4"], RuleSetInfo::UNLOADED);  // the label left it
  // The damaged one is refused; canary stays on 1.0.3.
  EXPECT_EQ(restarted.SetLabel("demo", "canary", "1.0.2").status().code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(restarted.Resolve("demo", "", "canary").value().rule_set->version, "1.0.3");
  EXPECT_EQ(States(restarted)["1.0.2"], RuleSetInfo::REJECTED);
}

// The newest bundles no longer pass the gate (here: their key is no longer trusted): the
// next ones down are loaded in their place, as when every bundle was gated.
TEST_F(RetentionTest, ARestartLoadsOlderVersionsWhenTheNewestFailTheGate) {
  for (const char* version : {"1.0.0", "1.0.1", "1.0.2"}) Publish(version);
  const bundle::PrivateKey other = bundle::PrivateKey::Generate().value();
  root_.Write("keys/other.pub", other.public_key().ToPem());
  for (const char* version : {"1.0.3", "1.0.4"}) {
    ASSERT_TRUE(store_->Publish(Signed(Good(version), version, &other)).ok());
  }
  std::filesystem::remove(root_.path() + "/keys/other.pub");

  RuleStore restarted(Options());
  ASSERT_EQ(restarted.RestoreState().value(), 2);
  using S = RuleSetInfo;
  EXPECT_EQ(States(restarted), (std::map<std::string, S::State>{{"1.0.0", S::UNLOADED},
                                                                {"1.0.1", S::AVAILABLE},
                                                                {"1.0.2", S::AVAILABLE},
                                                                {"1.0.3", S::REJECTED},
                                                                {"1.0.4", S::REJECTED}}));
  EXPECT_EQ(restarted.CompileCount(), 2);  // the rejected ones failed before compiling
  EXPECT_EQ(restarted.Resolve("demo", "").value().rule_set->version, "1.0.2");
}

TEST_F(RetentionTest, ZeroKeepsEveryVersion) {
  RuleStore::Options options = Options();
  options.keep_versions = 0;
  store_ = std::make_unique<RuleStore>(options);
  for (const char* version : {"1.0.0", "1.0.1", "1.0.2", "1.0.3"}) Publish(version);
  EXPECT_EQ(store_->LoadedCount(), 4);
}

// The TSan test of retention: readers resolving through the label and pinning versions
// while versions are published, labelled and unloaded.
TEST_F(RetentionTest, ReadersNeverFailWhileVersionsAreUnloaded) {
  RuleStore::Options options = Options();
  options.keep_versions = 1;
  store_ = std::make_unique<RuleStore>(options);
  Publish("1.0.0");
  ASSERT_TRUE(store_->SetLabel("demo", "stable", "1.0.0").ok());
  std::atomic<bool> stop{false};
  std::atomic<int> failures{0}, evaluated{0};
  std::vector<std::thread> readers;
  for (int t = 0; t < 4; ++t) {
    readers.emplace_back([&] {
      while (!stop.load()) {
        absl::StatusOr<Resolved> r = store_->Resolve("demo", "");
        if (!r.ok() || r->rule_set == nullptr) {
          failures.fetch_add(1);
          continue;
        }
        // Use the version after the store may have unloaded it.
        std::this_thread::yield();
        if (r->rule_set->hypotheses.size() != 2) failures.fetch_add(1);
        evaluated.fetch_add(1);
        store_->List("demo");
      }
    });
  }
  for (int patch = 1; patch <= 6; ++patch) {
    const std::string version = absl::StrCat("1.0.", patch);
    Publish(version);
    ASSERT_TRUE(store_->SetLabel("demo", "stable", version).ok());
  }
  // Rollbacks to unloaded versions: each is loaded again under the readers' feet.
  for (const char* version : {"1.0.2", "1.0.4"}) {
    ASSERT_EQ(States(*store_)[version], RuleSetInfo::UNLOADED);
    ASSERT_TRUE(store_->SetLabel("demo", "stable", version).ok());
  }
  stop.store(true);
  for (std::thread& t : readers) t.join();
  EXPECT_EQ(failures.load(), 0);
  EXPECT_GT(evaluated.load(), 0);
  EXPECT_EQ(store_->LoadedCount(), 2);  // 1.0.4 (stable) and 1.0.6 (newest)
}

TEST_F(LifecycleTest, ScanTakesOnlyCompleteSignedDirectories) {
  const std::string rules = root_.path() + "/rules";
  std::filesystem::create_directories(rules);
  ASSERT_EQ(store_->LoadFromDirectory(rules).value(), 0);
  const cds::v1::Bundle bundle = Signed(Good("2.0.0"), "2.0.0");
  // Half-copied: one file, no signature yet. Not even looked at.
  root_.Write("rules/demo/2.0.0/ruleset.textproto", bundle.files(0).content());
  EXPECT_EQ(store_->ScanRulesDir(), 0);
  EXPECT_TRUE(store_->List("demo").empty());
  // Signature copied before the last file: fails its hashes, never served.
  root_.Write("rules/demo/2.0.0/MANIFEST", bundle.manifest());
  root_.Write("rules/demo/2.0.0/MANIFEST.sig", bundle.signature());
  EXPECT_EQ(store_->ScanRulesDir(), 0);
  EXPECT_EQ(store_->Resolve("demo", "2.0.0").status().code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(Find(store_->List("demo"), "2.0.0")->reject_reason(), cds::v1::MISSING_FILE);
  // Complete: served at the next scan.
  root_.Write("rules/demo/2.0.0/tests.textproto", bundle.files(1).content());
  EXPECT_EQ(store_->ScanRulesDir(), 1);
  EXPECT_EQ(store_->Resolve("demo", "").value().rule_set->version, "2.0.0");
  EXPECT_EQ(store_->ScanRulesDir(), 0);
}

TEST_F(LifecycleTest, AdminCallsNeedAStateDirectory) {
  RuleStore::Options options = StoreOptions();
  options.state_dir.clear();
  RuleStore store(options);
  EXPECT_EQ(store.Publish(Signed(Good("1.0.0"), "1.0.0")).status().code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(store.SetLabel("demo", "stable", "1.0.0").status().code(),
            absl::StatusCode::kFailedPrecondition);
}

TEST(SemverLessTest, Ordering) {
  const std::vector<std::string> ordered = {
      "0.9.9",       "1.0.0-alpha", "1.0.0-alpha.1", "1.0.0-alpha.beta", "1.0.0-beta",
      "1.0.0-beta.2", "1.0.0-beta.11", "1.0.0-rc.1",  "1.0.0",           "1.0.1",
      "1.2.0",       "1.10.0",      "2.0.0",         "10.0.0",
      // Not semantic versions: after all of them, lexically.
      "1..2",        "1.0",         "1.2.",          "1.2.3.4",          "latest",
  };
  for (size_t i = 0; i < ordered.size(); ++i) {
    EXPECT_FALSE(SemverLess(ordered[i], ordered[i])) << ordered[i];
    for (size_t j = i + 1; j < ordered.size(); ++j) {
      EXPECT_TRUE(SemverLess(ordered[i], ordered[j])) << ordered[i] << " < " << ordered[j];
      EXPECT_FALSE(SemverLess(ordered[j], ordered[i])) << ordered[j] << " < " << ordered[i];
    }
  }
}

}  // namespace
}  // namespace cds::store
