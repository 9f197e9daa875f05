#pragma once

// Compiles a rule set's source files into a CompiledRuleSet, collecting every problem
// (with file, line and rule id) instead of stopping at the first. Pure: no file I/O
// (see source_loader.h for reading a directory).

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "server/compiler/compiled_rule_set.h"
#include "server/ontology/ontology.h"

namespace cds::compiler {

struct SourceFile {
  std::string path;  // relative to the rule-set directory, e.g. "ruleset.textproto"
  std::string content;
};

// Supplies the ontology release a rule set names (metadata.ontology).
using OntologyProvider = std::function<absl::StatusOr<std::shared_ptr<const ontology::Ontology>>(
    const std::string& release)>;

// The files of one rule-set version. `expected_name` / `expected_version` come from the
// directory layout (rules/<name>/<version>/); empty to skip that check.
struct RuleSetSource {
  std::string expected_name;
  std::string expected_version;
  std::vector<SourceFile> files;
  // Needed only when the rule set names an ontology.
  OntologyProvider ontology_provider;
};

// The rule set's main file and its test cases, by convention.
inline constexpr char kRuleSetFile[] = "ruleset.textproto";
inline constexpr char kTestsFile[] = "tests.textproto";

struct Issue {
  enum class Severity { kError, kWarning };
  Severity severity = Severity::kError;
  std::string file;
  int line = 0;    // 1-based; 0 when unknown
  int column = 0;  // 1-based; 0 when unknown
  std::string rule_id;
  std::string message;

  // "file:line:col: error: [rule] message"
  std::string ToString() const;
};

struct CompileResult {
  // Null when any issue is an error.
  std::shared_ptr<const CompiledRuleSet> rule_set;
  std::vector<Issue> issues;

  bool ok() const { return rule_set != nullptr; }
  // All issues, one per line.
  std::string IssuesToString() const;
};

CompileResult Compile(const RuleSetSource& source);

// "sha256:<hex>" over the files sorted by path: for each, the path, a NUL, the content
// length in decimal, a NUL, the content.
std::string DigestFiles(const std::vector<SourceFile>& files);

}  // namespace cds::compiler
