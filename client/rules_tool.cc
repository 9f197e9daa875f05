#include "client/rules_tool.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <system_error>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "cds/v1/rules.pb.h"
#include "client/cli.h"
#include "client/input.h"
#include "google/protobuf/io/tokenizer.h"
#include "google/protobuf/text_format.h"
#include "server/bundle/bundle.h"
#include "server/compiler/compiler.h"
#include "server/compiler/source_loader.h"
#include "server/engine/case_runner.h"
#include "server/engine/engine.h"

namespace cds::cli {
namespace {

namespace fs = std::filesystem;
using RuleSetPtr = std::shared_ptr<const compiler::CompiledRuleSet>;

// Reads DIR as the server would: the rule-set files, without MANIFEST and MANIFEST.sig.
absl::StatusOr<compiler::RuleSetSource> LoadSource(const std::string& dir) {
  absl::StatusOr<compiler::RuleSetSource> source = compiler::LoadRuleSetDir(dir);
  if (source.ok()) bundle::RemoveBundleFiles(&source->files);
  return source;
}

// Compiles DIR, printing issues when `issues` is set. Null (with *exit_code) on failure.
RuleSetPtr Compile(const std::string& dir, std::ostream* issues, std::ostream& err,
                   int* exit_code, int* warnings_out = nullptr) {
  absl::StatusOr<compiler::RuleSetSource> source = LoadSource(dir);
  if (!source.ok()) {
    err << "cdsctl: " << source.status().message() << "\n";
    *exit_code = kBadInput;
    return nullptr;
  }
  const compiler::CompileResult result = compiler::Compile(*source);
  int errors = 0, warnings = 0;
  for (const compiler::Issue& issue : result.issues) {
    (issue.severity == compiler::Issue::Severity::kError ? errors : warnings)++;
    if (issues != nullptr) *issues << issue.ToString() << "\n";
  }
  if (warnings_out != nullptr) *warnings_out = warnings;
  if (!result.ok()) {
    std::ostream& where = issues != nullptr ? *issues : err;
    if (issues == nullptr) where << result.IssuesToString();
    where << dir << ": " << errors << " error(s), " << warnings << " warning(s): not servable\n";
    *exit_code = kFailed;
    return nullptr;
  }
  *exit_code = kOk;
  return result.rule_set;
}

absl::StatusOr<std::string> ReadAll(const fs::path& path) { return ReadFile(path.string()); }

// Parses text format quietly (a file of another message type is not an error here).
class SilentErrors : public google::protobuf::io::ErrorCollector {
 public:
  void AddError(int, google::protobuf::io::ColumnNumber, const std::string&) override {}
};

bool ParseQuietly(const std::string& text, google::protobuf::Message* message) {
  SilentErrors errors;
  google::protobuf::TextFormat::Parser parser;
  parser.RecordErrorsTo(&errors);
  return parser.ParseFromString(text, message);
}

bool IsTextProto(const fs::path& path) {
  const std::string ext = path.extension().string();
  return ext == ".textproto" || ext == ".txtpb" || ext == ".pbtxt";
}

// Every regular file of `dir`, sorted.
std::vector<fs::path> FilesIn(const std::string& dir, std::error_code* ec) {
  std::vector<fs::path> paths;
  for (const auto& entry : fs::directory_iterator(dir, *ec)) {
    if (entry.is_regular_file()) paths.push_back(entry.path());
  }
  std::sort(paths.begin(), paths.end());
  return paths;
}

// The RuleSetTests files of `cases_dir` (*.textproto holding `cases`), merged.
absl::StatusOr<cds::v1::RuleSetTests> LoadCaseFiles(const std::string& cases_dir) {
  cds::v1::RuleSetTests all;
  std::error_code ec;
  const std::vector<fs::path> paths = FilesIn(cases_dir, &ec);
  if (ec) return absl::NotFoundError(absl::StrCat("cannot list ", cases_dir, ": ", ec.message()));
  for (const fs::path& path : paths) {
    if (!IsTextProto(path)) continue;
    absl::StatusOr<std::string> text = ReadAll(path);
    if (!text.ok()) return text.status();
    cds::v1::RuleSetTests tests;
    if (!google::protobuf::TextFormat::ParseFromString(*text, &tests)) {
      return absl::InvalidArgumentError(
          absl::StrCat(path.string(), ": not a cds.v1.RuleSetTests text file"));
    }
    for (cds::v1::RuleSetTestCase& c : *tests.mutable_cases()) {
      if (c.name().empty()) c.set_name(path.filename().string());
      *all.add_cases() = std::move(c);
    }
  }
  return all;
}

// ---- diff ---------------------------------------------------------------------------------

struct DiffCase {
  std::string name;
  cds::v1::Patient patient;
};

struct Outcome {
  bool ok = false;
  std::string error;
  // Diagnoses by rule id: rank among diagnoses (1-based) and probability.
  std::map<std::string, std::pair<int, double>> diagnoses;
  std::string top;
  std::vector<std::string> actions;  // non-diagnosis suggestions, in order
};

Outcome Run(const compiler::CompiledRuleSet& rule_set, const cds::v1::Patient& patient) {
  Outcome outcome;
  cds::v1::EvaluateResponse response;
  const absl::Status status =
      engine::Evaluate(rule_set, patient, engine::EvaluateOptions{}, &response);
  if (!status.ok()) {
    outcome.error = std::string(status.message());
    return outcome;
  }
  outcome.ok = true;
  int rank = 0;
  for (const cds::v1::Suggestion& s : response.suggestions()) {
    if (s.kind() == cds::v1::DIAGNOSIS) {
      outcome.diagnoses[s.rule_id()] = {++rank, s.probability()};
      if (rank == 1) outcome.top = s.rule_id();
    } else {
      outcome.actions.push_back(absl::StrCat(cds::v1::SuggestionKind_Name(s.kind()), ":",
                                             s.rule_id()));
    }
  }
  return outcome;
}

std::string Cell(const Outcome& o, const std::string& id) {
  auto it = o.diagnoses.find(id);
  if (it == o.diagnoses.end()) return "-";
  return absl::StrFormat("#%d %.3f", it->second.first, it->second.second);
}

}  // namespace

int RulesCheck(const std::string& dir, const std::string& keys_dir, std::ostream& out,
               std::ostream& err) {
  int exit_code = kOk;
  int warnings = 0;
  RuleSetPtr rule_set = Compile(dir, &out, err, &exit_code, &warnings);
  if (rule_set == nullptr) return exit_code;
  out << "OK " << rule_set->name << "@" << rule_set->version << " " << rule_set->digest << ": "
      << rule_set->hypotheses.size() << " hypotheses, " << rule_set->actions.size()
      << " actions, " << rule_set->tests.cases_size() << " test cases, " << warnings
      << " warning(s)\n";

  // The manifest, when there is one: does it still describe these files?
  absl::StatusOr<cds::v1::Bundle> bundle = bundle::ReadBundleDir(dir);
  if (!bundle.ok() || bundle->manifest().empty()) {
    out << "MANIFEST: none (unsigned; sign with `cdsctl rules sign " << dir << " --key KEY`)\n";
    return kOk;
  }
  bundle::TrustedKeys keys;
  const bool check_signature = !keys_dir.empty();
  if (check_signature) {
    absl::StatusOr<bundle::TrustedKeys> loaded = bundle::TrustedKeys::LoadDirectory(keys_dir);
    if (!loaded.ok()) {
      err << "cdsctl: " << loaded.status().message() << "\n";
      return kBadInput;
    }
    keys = *std::move(loaded);
  } else {
    bundle->clear_signature();  // hashes only
  }
  bundle::VerifyOptions verify;
  verify.allow_unsigned = !check_signature;
  verify.expected_name = rule_set->name;
  verify.expected_version = rule_set->version;
  bundle::VerifiedBundle verified;
  if (std::optional<bundle::Rejection> rejection =
          bundle::VerifyBundle(*bundle, keys, verify, &verified);
      rejection.has_value()) {
    out << "MANIFEST: " << rejection->ToString()
        << "\n  (a server would refuse this bundle; re-sign after editing: cdsctl rules sign)\n";
    return kFailed;
  }
  out << "MANIFEST: " << verified.files.size() << " files match, key "
      << verified.manifest.key_id()
      << (check_signature ? ", signature valid" : " (signature not checked: pass --keys DIR)")
      << "\n";
  return kOk;
}

int RulesTest(const std::string& dir, const std::string& cases_dir, std::ostream& out,
              std::ostream& err) {
  int exit_code = kOk;
  RuleSetPtr rule_set = Compile(dir, &out, err, &exit_code);
  if (rule_set == nullptr) return exit_code;
  cds::v1::RuleSetTests tests = rule_set->tests;
  if (!cases_dir.empty()) {
    absl::StatusOr<cds::v1::RuleSetTests> extra = LoadCaseFiles(cases_dir);
    if (!extra.ok()) {
      err << "cdsctl: " << extra.status().message() << "\n";
      return kBadInput;
    }
    out << "plus " << extra->cases_size() << " case(s) from " << cases_dir << "\n";
    for (const cds::v1::RuleSetTestCase& c : extra->cases()) *tests.add_cases() = c;
  }
  const std::vector<engine::CaseResult> results = engine::RunCases(*rule_set, tests);
  int failed = 0;
  for (const engine::CaseResult& result : results) {
    out << (result.passed ? "PASS " : "FAIL ") << result.name << "\n";
    for (const std::string& failure : result.failures) out << "    " << failure << "\n";
    failed += result.passed ? 0 : 1;
  }
  if (results.empty()) {
    // The server serves a rule set without cases; the author should still hear about it.
    out << "no test cases (add " << compiler::kTestsFile << ")\n";
  }
  out << results.size() - failed << " passed, " << failed << " failed\n";
  return failed == 0 ? kOk : kFailed;
}

int RulesDiff(const std::string& old_dir, const std::string& new_dir,
              const std::string& cases_dir, std::ostream& out, std::ostream& err) {
  int exit_code = kOk;
  RuleSetPtr old_rs = Compile(old_dir, nullptr, err, &exit_code);
  if (old_rs == nullptr) return exit_code;
  RuleSetPtr new_rs = Compile(new_dir, nullptr, err, &exit_code);
  if (new_rs == nullptr) return exit_code;

  std::vector<DiffCase> cases;
  std::set<std::string> names;
  auto add_tests = [&](const cds::v1::RuleSetTests& tests, const std::string& prefix) {
    for (const cds::v1::RuleSetTestCase& c : tests.cases()) {
      const std::string name = prefix + c.name();
      if (names.insert(name).second) cases.push_back({name, c.patient()});
    }
  };
  add_tests(old_rs->tests, "");
  add_tests(new_rs->tests, "");
  if (!cases_dir.empty()) {
    std::error_code ec;
    const std::vector<fs::path> paths = FilesIn(cases_dir, &ec);
    if (ec) {
      err << "cdsctl: cannot list " << cases_dir << ": " << ec.message() << "\n";
      return kBadInput;
    }
    for (const fs::path& path : paths) {
      const std::string ext = path.extension().string();
      if (ext != ".json" && !IsTextProto(path)) continue;
      absl::StatusOr<std::string> text = ReadAll(path);
      if (!text.ok()) continue;
      cds::v1::RuleSetTests tests;
      if (IsTextProto(path) && ParseQuietly(*text, &tests) &&
          tests.cases_size() > 0) {
        add_tests(tests, path.filename().string() + ":");
        continue;
      }
      absl::StatusOr<cds::v1::EvaluateRequest> request = ParseEvaluateInput(path.string(), *text);
      if (!request.ok()) {
        err << "cdsctl: note: skipping " << path.filename().string()
            << " (neither a patient, a request nor RuleSetTests)\n";
        continue;
      }
      const std::string name = path.filename().string();
      if (names.insert(name).second) cases.push_back({name, request->patient()});
    }
  }

  out << "diff " << old_rs->name << "@" << old_rs->version << " -> " << new_rs->name << "@"
      << new_rs->version << " on " << cases.size() << " case(s)\n";
  int changed = 0, top_changed = 0;
  double largest = 0;
  std::string largest_where;
  for (const DiffCase& c : cases) {
    const Outcome a = Run(*old_rs, c.patient);
    const Outcome b = Run(*new_rs, c.patient);
    if (!a.ok || !b.ok) {
      out << "\ncase " << c.name << ": not evaluated: " << (a.ok ? b.error : a.error) << "\n";
      continue;
    }
    std::set<std::string> ids;
    for (const auto& [id, unused] : a.diagnoses) ids.insert(id);
    for (const auto& [id, unused] : b.diagnoses) ids.insert(id);
    // Diagnoses in the new ranking's order, then those that dropped out.
    std::vector<std::string> order(ids.begin(), ids.end());
    auto rank_of = [](const Outcome& o, const std::string& id) {
      auto it = o.diagnoses.find(id);
      return it == o.diagnoses.end() ? 1 << 20 : it->second.first;
    };
    std::sort(order.begin(), order.end(), [&](const std::string& x, const std::string& y) {
      return std::make_pair(rank_of(b, x), rank_of(a, x)) < std::make_pair(rank_of(b, y), rank_of(a, y));
    });
    bool differs = a.actions != b.actions;
    std::vector<std::string> lines;
    for (const std::string& id : order) {
      const std::string before = Cell(a, id), after = Cell(b, id);
      double delta = 0;
      auto ia = a.diagnoses.find(id), ib = b.diagnoses.find(id);
      const double pa = ia == a.diagnoses.end() ? 0 : ia->second.second;
      const double pb = ib == b.diagnoses.end() ? 0 : ib->second.second;
      delta = pb - pa;
      const bool same_rank = rank_of(a, id) == rank_of(b, id);
      const bool moved = !same_rank || std::fabs(delta) >= 0.0005;
      differs |= moved;
      if (std::fabs(delta) > std::fabs(largest)) {
        largest = delta;
        largest_where = absl::StrCat(id, " in ", c.name);
      }
      lines.push_back(absl::StrFormat("  %-28s %-12s %-12s %s", id, before, after,
                                      moved ? absl::StrFormat("%+.3f%s", delta,
                                                              same_rank ? "" : "  rank changed")
                                            : "="));
    }
    if (!differs) {
      out << "\ncase " << c.name << ": no change (top: " << (a.top.empty() ? "-" : a.top) << ")\n";
      continue;
    }
    ++changed;
    const bool top_moved = a.top != b.top;
    top_changed += top_moved ? 1 : 0;
    out << "\ncase " << c.name
        << (top_moved ? absl::StrCat(": TOP DIAGNOSIS CHANGED ", a.top, " -> ", b.top) : "")
        << "\n";
    out << absl::StrFormat("  %-28s %-12s %-12s %s\n", "diagnosis", "old", "new", "change");
    for (const std::string& line : lines) out << line << "\n";
    if (a.actions != b.actions) {
      std::set<std::string> sa(a.actions.begin(), a.actions.end());
      std::set<std::string> sb(b.actions.begin(), b.actions.end());
      std::vector<std::string> added, removed;
      for (const std::string& x : sb) {
        if (sa.count(x) == 0) added.push_back(x);
      }
      for (const std::string& x : sa) {
        if (sb.count(x) == 0) removed.push_back(x);
      }
      out << "  actions:";
      if (!added.empty()) out << " added " << absl::StrJoin(added, ", ") << ";";
      if (!removed.empty()) out << " removed " << absl::StrJoin(removed, ", ") << ";";
      if (added.empty() && removed.empty()) out << " same actions, new order;";
      out << "\n";
    }
  }
  out << "\nsummary: " << cases.size() << " case(s), " << changed << " changed, " << top_changed
      << " with a different top diagnosis";
  if (!largest_where.empty()) {
    out << absl::StrFormat("; largest probability change %+.3f (%s)", largest, largest_where);
  }
  out << "\n";
  return kOk;
}

int RulesKeygen(const std::string& prefix, std::ostream& out, std::ostream& err) {
  absl::StatusOr<bundle::PrivateKey> key = bundle::PrivateKey::Generate();
  if (!key.ok()) {
    err << "cdsctl: " << key.status().message() << "\n";
    return kFailed;
  }
  const std::string private_path = prefix + ".key";
  const std::string public_path = prefix + ".pub";
  std::error_code ec;
  if (fs::exists(private_path, ec) || fs::exists(public_path, ec)) {
    err << "cdsctl: " << private_path << " or " << public_path << " exists: not overwriting\n";
    return kUsage;
  }
  if (fs::path parent = fs::path(private_path).parent_path(); !parent.empty()) {
    fs::create_directories(parent, ec);
  }
  // The private key is created 0600 from the start, never world-readable.
  const std::string pem = key->ToPem();
  const int fd = open(private_path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd < 0 || write(fd, pem.data(), pem.size()) != static_cast<ssize_t>(pem.size()) ||
      fsync(fd) != 0) {
    if (fd >= 0) close(fd);
    err << "cdsctl: cannot write " << private_path << "\n";
    return kBadInput;
  }
  close(fd);
  {
    const std::string pub = key->public_key().ToPem();
    FILE* f = fopen(public_path.c_str(), "wx");
    if (f == nullptr || fwrite(pub.data(), 1, pub.size(), f) != pub.size()) {
      if (f != nullptr) fclose(f);
      err << "cdsctl: cannot write " << public_path << "\n";
      return kBadInput;
    }
    fclose(f);
  }
  out << "key id " << key->public_key().key_id() << "\n"
      << "private key: " << private_path
      << " (keep it secret and out of the repository)\n"
      << "public key:  " << public_path
      << " (servers trust it once it is in their --trusted_keys_dir, e.g. rules/keys/)\n";
  return kOk;
}

int RulesSign(const std::string& dir, const std::string& key_path, const std::string& author,
              std::ostream& out, std::ostream& err) {
  absl::StatusOr<std::string> key_text = ReadFile(key_path);
  if (!key_text.ok()) {
    err << "cdsctl: " << key_text.status().message() << "\n";
    return kBadInput;
  }
  absl::StatusOr<bundle::PrivateKey> key = bundle::PrivateKey::Parse(*key_text);
  if (!key.ok()) {
    err << "cdsctl: " << key_path << ": " << key.status().message() << "\n";
    return kBadInput;
  }
  // Only what would pass the server's gate gets signed.
  int exit_code = kOk;
  RuleSetPtr rule_set = Compile(dir, nullptr, err, &exit_code);
  if (rule_set == nullptr) return exit_code;
  const std::vector<engine::CaseResult> results = engine::RunCases(*rule_set, rule_set->tests);
  if (!engine::AllPassed(results)) {
    err << "cdsctl: " << dir << ": embedded test cases fail (see `cdsctl rules test " << dir
        << "`): not signing\n";
    return kFailed;
  }
  absl::StatusOr<compiler::RuleSetSource> source = LoadSource(dir);
  if (!source.ok()) {
    err << "cdsctl: " << source.status().message() << "\n";
    return kBadInput;
  }
  absl::StatusOr<cds::v1::Bundle> bundle = bundle::SignFiles(
      rule_set->name, rule_set->version, source->files, author, *key, absl::Now());
  if (!bundle.ok()) {
    err << "cdsctl: " << bundle.status().message() << "\n";
    return kFailed;
  }
  // MANIFEST first, MANIFEST.sig last: a poller takes a directory only once it is signed.
  const fs::path base(dir);
  std::error_code ec;
  fs::remove(base / bundle::kSignatureFile, ec);
  for (const auto& [name, content] :
       {std::pair<const char*, const std::string*>{bundle::kManifestFile, &bundle->manifest()},
        {bundle::kSignatureFile, &bundle->signature()}}) {
    const fs::path tmp = base / absl::StrCat(".", name, ".tmp");
    FILE* f = fopen(tmp.c_str(), "w");
    if (f == nullptr || fwrite(content->data(), 1, content->size(), f) != content->size() ||
        fflush(f) != 0 || fsync(fileno(f)) != 0) {
      if (f != nullptr) fclose(f);
      err << "cdsctl: cannot write " << tmp.string() << "\n";
      return kBadInput;
    }
    fclose(f);
    fs::rename(tmp, base / name, ec);
    if (ec) {
      err << "cdsctl: cannot write " << (base / name).string() << ": " << ec.message() << "\n";
      return kBadInput;
    }
  }
  out << "signed " << rule_set->name << "@" << rule_set->version << " (" << source->files.size()
      << " files, " << rule_set->digest << ") with key " << key->public_key().key_id()
      << ": wrote " << (base / bundle::kManifestFile).string() << " and "
      << (base / bundle::kSignatureFile).string() << "\n";
  return kOk;
}

}  // namespace cds::cli
