#include "server/ontology/ontology.h"

#include <filesystem>
#include <fstream>
#include <sstream>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"

namespace cds::ontology {
namespace {

struct Row {
  std::string id;
  std::string label;
  std::vector<std::string> parents;
  std::vector<std::string> alt_ids;
  std::string status;
};

std::vector<std::string> SplitList(absl::string_view field) {
  std::vector<std::string> out;
  for (absl::string_view part : absl::StrSplit(field, ',', absl::SkipWhitespace())) {
    out.emplace_back(part);
  }
  return out;
}

}  // namespace

absl::StatusOr<std::shared_ptr<const Ontology>> Ontology::Parse(absl::string_view tsv,
                                                                const std::string& release) {
  std::vector<Row> rows;
  int line_number = 0;
  bool header_seen = false;
  for (absl::string_view line : absl::StrSplit(tsv, '\n')) {
    ++line_number;
    line = absl::StripSuffix(line, "\r");
    if (line.empty() || absl::StartsWith(line, "#")) continue;
    std::vector<absl::string_view> cols = absl::StrSplit(line, '\t');
    if (!header_seen && !cols.empty() && cols[0] == "id") {
      header_seen = true;
      continue;
    }
    if (cols.size() != 5) {
      return absl::InvalidArgumentError(
          absl::StrCat("ontology line ", line_number, ": expected 5 tab-separated columns, got ",
                       cols.size()));
    }
    rows.push_back(Row{std::string(cols[0]), std::string(cols[1]), SplitList(cols[2]),
                       SplitList(cols[3]), std::string(cols[4])});
  }
  std::shared_ptr<Ontology> onto(new Ontology());
  onto->release_ = release;
  // Live terms get dense indices; obsolete ones become redirects.
  for (const Row& row : rows) {
    if (row.status != "live") continue;
    const int32_t index = static_cast<int32_t>(onto->ids_.size());
    if (!onto->by_id_.emplace(row.id, index).second) {
      return absl::InvalidArgumentError(absl::StrCat("ontology: duplicate id ", row.id));
    }
    onto->ids_.push_back(row.id);
    onto->labels_.push_back(row.label);
  }
  const size_t n = onto->ids_.size();
  onto->parents_.assign(n, {});
  onto->children_.assign(n, {});
  onto->aliases_.assign(n, {});
  for (const Row& row : rows) {
    if (row.status == "live") {
      const int32_t term = onto->by_id_.at(row.id);
      for (const std::string& parent : row.parents) {
        auto it = onto->by_id_.find(parent);
        if (it == onto->by_id_.end()) {
          return absl::InvalidArgumentError(
              absl::StrCat("ontology: ", row.id, " has unknown parent ", parent));
        }
        onto->parents_[term].push_back(it->second);
        onto->children_[it->second].push_back(term);
      }
      for (const std::string& alt : row.alt_ids) {
        onto->redirects_.emplace(alt, term);
        onto->aliases_[term].push_back(alt);
      }
      continue;
    }
    // "obsolete>HP:x" or "obsolete".
    int32_t target = -1;
    if (absl::StartsWith(row.status, "obsolete>")) {
      auto it = onto->by_id_.find(row.status.substr(strlen("obsolete>")));
      if (it != onto->by_id_.end()) target = it->second;
    } else if (row.status != "obsolete") {
      return absl::InvalidArgumentError(
          absl::StrCat("ontology: ", row.id, " has unknown status ", row.status));
    }
    onto->redirects_.emplace(row.id, target);
    if (target >= 0) onto->aliases_[target].push_back(row.id);
    for (const std::string& alt : row.alt_ids) {
      onto->redirects_.emplace(alt, target);
      if (target >= 0) onto->aliases_[target].push_back(alt);
    }
  }
  for (const auto* ids : {&onto->by_id_, &onto->redirects_}) {
    for (const auto& [id, term] : *ids) {
      if (const int32_t number = HpoNumber(id); number >= 0) onto->known_numbers_.Insert(number, 0);
    }
  }
  return std::shared_ptr<const Ontology>(std::move(onto));
}

absl::StatusOr<std::shared_ptr<const Ontology>> Ontology::Load(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read ontology file ", path));
  std::ostringstream content;
  content << in.rdbuf();
  return Parse(content.str(), std::filesystem::path(path).stem().string());
}

std::optional<int32_t> Ontology::Resolve(absl::string_view id) const {
  if (auto it = by_id_.find(id); it != by_id_.end()) return it->second;
  if (auto it = redirects_.find(id); it != redirects_.end() && it->second >= 0) return it->second;
  return std::nullopt;
}

bool Ontology::Knows(absl::string_view id) const {
  if (const int32_t number = HpoNumber(id); number >= 0) {
    return known_numbers_.Find(number) != nullptr;
  }
  return by_id_.contains(id) || redirects_.contains(id);
}

bool Ontology::IsLive(absl::string_view id) const { return by_id_.contains(id); }

namespace {

std::vector<int32_t> Closure(int32_t start, const std::vector<std::vector<int32_t>>& edges) {
  std::vector<int32_t> out = {start};
  std::vector<bool> seen(edges.size(), false);
  seen[start] = true;
  for (size_t i = 0; i < out.size(); ++i) {
    for (int32_t next : edges[out[i]]) {
      if (!seen[next]) {
        seen[next] = true;
        out.push_back(next);
      }
    }
  }
  return out;
}

}  // namespace

std::vector<int32_t> Ontology::DescendantsOrSelf(int32_t term) const {
  return Closure(term, children_);
}

std::vector<int32_t> Ontology::AncestorsOrSelf(int32_t term) const {
  return Closure(term, parents_);
}

}  // namespace cds::ontology
