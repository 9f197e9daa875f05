#pragma once

// Reads rule-set directories from disk into RuleSetSource values for the compiler.

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "server/compiler/compiler.h"

namespace cds::compiler {

// Reads every regular file directly in `dir` (a rules/<name>/<version>/ directory), except
// the bundle's MANIFEST and MANIFEST.sig.
// The expected name and version are taken from the last two path components. Ontologies
// named by the rule set are read from `<dir>/../../ontology/<release>.tsv` (rules/ontology/),
// once per process.
absl::StatusOr<RuleSetSource> LoadRuleSetDir(const std::string& dir);

// The ontology release `<ontology_dir>/<release>.tsv`, loaded once per process and shared.
absl::StatusOr<std::shared_ptr<const ontology::Ontology>> LoadOntologyCached(
    const std::string& ontology_dir, const std::string& release);

// Lists the <root>/<name>/<version>/ directories that hold a ruleset.textproto, sorted.
absl::StatusOr<std::vector<std::string>> FindRuleSetDirs(const std::string& root);

}  // namespace cds::compiler
