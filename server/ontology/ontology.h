#pragma once

// A phenotype ontology (the Human Phenotype Ontology) loaded once and shared read-only:
// term ids, labels, is_a parents, alternative ids and obsolete terms with their
// replacements. The compiler uses it to let a rule's concept match a term and all its
// descendants; it is not consulted on the request path except through compiled indices.

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "server/ontology/hpo_number.h"

namespace cds::ontology {

class Ontology {
 public:
  // Parses the reduced HPO table (columns: id, label, parents, alt_ids, status; '#' lines
  // are comments; see rules/ontology/README.md). `release` names it, e.g. "hp-2025-03-03".
  static absl::StatusOr<std::shared_ptr<const Ontology>> Parse(absl::string_view tsv,
                                                               const std::string& release);
  // Reads and parses `path`; the release is the file name without ".tsv".
  static absl::StatusOr<std::shared_ptr<const Ontology>> Load(const std::string& path);

  const std::string& release() const { return release_; }
  size_t size() const { return ids_.size(); }

  // The live term an id stands for: the term itself, the primary term of an alternative
  // id, or the replacement of an obsolete term. nullopt when the id is unknown, or obsolete
  // without a replacement.
  std::optional<int32_t> Resolve(absl::string_view id) const;
  // True when the id is in the ontology at all (live, alternative or obsolete).
  bool Knows(absl::string_view id) const;
  // True when `id` is a live primary id.
  bool IsLive(absl::string_view id) const;

  const std::string& Id(int32_t term) const { return ids_[term]; }
  const std::string& Label(int32_t term) const { return labels_[term]; }

  // The term and everything below it (is_a, transitively), each once.
  std::vector<int32_t> DescendantsOrSelf(int32_t term) const;
  // The term and everything above it, each once.
  std::vector<int32_t> AncestorsOrSelf(int32_t term) const;
  // Ids (including alternative and obsolete ones) that resolve to `term`.
  const std::vector<std::string>& AliasesOf(int32_t term) const { return aliases_[term]; }

 private:
  Ontology() = default;

  std::string release_;
  std::vector<std::string> ids_;
  std::vector<std::string> labels_;
  std::vector<std::vector<int32_t>> parents_;
  std::vector<std::vector<int32_t>> children_;
  std::vector<std::vector<std::string>> aliases_;
  // Primary id -> term.
  absl::flat_hash_map<std::string, int32_t> by_id_;
  // Alternative or obsolete id -> live term (-1 for obsolete without replacement).
  absl::flat_hash_map<std::string, int32_t> redirects_;
  // The ids of both maps spelled "HP:" and seven digits, by number (Knows per patient code).
  HpoNumberMap known_numbers_;
};

}  // namespace cds::ontology
