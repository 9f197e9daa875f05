#include "server/compiler/compiled_rule_set.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace cds::compiler {
namespace {

// Day lengths of ISO 8601 duration designators (a month is 30.44 days, a year 365.25,
// as in the validation corpus and the clinical brief).
double DaysPerUnit(char designator, bool in_time_part) {
  if (in_time_part) {
    switch (designator) {
      case 'H': return 1.0 / 24;
      case 'M': return 1.0 / (24 * 60);
      case 'S': return 1.0 / (24 * 3600);
    }
    return -1;
  }
  switch (designator) {
    case 'Y': return 365.25;
    case 'M': return 30.44;
    case 'W': return 7;
    case 'D': return 1;
  }
  return -1;
}

// Parses "P1Y2M3W4DT5H" into days; false when malformed.
bool ParseIsoDuration(const std::string& text, double* days) {
  if (text.size() < 2 || text[0] != 'P') return false;
  double total = 0;
  bool in_time = false;
  bool any = false;
  size_t i = 1;
  while (i < text.size()) {
    if (text[i] == 'T') {
      if (in_time) return false;
      in_time = true;
      ++i;
      continue;
    }
    size_t start = i;
    while (i < text.size() && (std::isdigit(static_cast<unsigned char>(text[i])) || text[i] == '.')) {
      ++i;
    }
    if (start == i || i >= text.size()) return false;
    char* end = nullptr;
    const std::string number = text.substr(start, i - start);
    const double value = std::strtod(number.c_str(), &end);
    if (end == nullptr || *end != '\0' || !std::isfinite(value)) return false;
    const double unit = DaysPerUnit(text[i], in_time);
    if (unit < 0) return false;
    total += value * unit;
    any = true;
    ++i;
  }
  if (!any) return false;
  *days = total;
  return true;
}

// Mirrors the engine's evaluation of sex, age and connective conditions, for a patient of
// sex `sex` (UNKNOWN_SEX: unknown) and age `age_days` (NaN: unknown).
// REQUIRES: `id` is demographic (IsDemographic).
Truth EvalDemographic(const CompiledRuleSet& rs, ConditionId id, int32_t sex, double age_days) {
  const CompiledCondition& c = rs.conditions[id];
  using K = CompiledCondition::Kind;
  switch (c.kind) {
    case K::kSex:
      if (sex == cds::v1::UNKNOWN_SEX) return Truth::kUnknown;
      return sex == c.count ? Truth::kTrue : Truth::kFalse;
    case K::kAge:
      if (std::isnan(age_days)) return Truth::kUnknown;
      return c.ages.Contains(age_days) ? Truth::kTrue : Truth::kFalse;
    default:
      return CombineChildren(
          c, [&](ConditionId child) { return EvalDemographic(rs, child, sex, age_days); });
  }
}

// Leaves of a condition tree, by kind.
struct LeafKinds {
  bool sex = false;
  bool age = false;
  bool other = false;  // any leaf that is neither
};

void CollectLeafKinds(const CompiledRuleSet& rs, ConditionId id, LeafKinds* kinds) {
  const CompiledCondition& c = rs.conditions[id];
  using K = CompiledCondition::Kind;
  switch (c.kind) {
    case K::kSex: kinds->sex = true; return;
    case K::kAge: kinds->age = true; return;
    case K::kAll:
    case K::kAny:
    case K::kNot:
    case K::kAtLeast:
      for (ConditionId child : c.children) CollectLeafKinds(rs, child, kinds);
      return;
    default:
      kinds->other = true;
      return;
  }
}

// Sex values and age bounds of the leaves under `id`.
void CollectDemographicBounds(const CompiledRuleSet& rs, ConditionId id,
                              std::vector<int32_t>* sexes, std::vector<double>* bounds) {
  const CompiledCondition& c = rs.conditions[id];
  if (c.kind == CompiledCondition::Kind::kSex) sexes->push_back(c.count);
  if (c.kind == CompiledCondition::Kind::kAge) {
    bounds->push_back(c.ages.from);
    bounds->push_back(c.ages.to);
  }
  for (ConditionId child : c.children) CollectDemographicBounds(rs, child, sexes, bounds);
}

// The folded items of one (sex, age) context, as the engine would apply them: candidates
// only when a fact their condition reads is known, in evidence order, capped within
// correlated groups (the strongest |log LR| counts; on a tie the earlier item).
DemographicContext BuildContext(const CompiledRuleSet& rs, const std::vector<int32_t>& folded,
                                const std::vector<LeafKinds>& kinds, int32_t sex,
                                double age_days) {
  DemographicContext context;
  const bool sex_known = sex != cds::v1::UNKNOWN_SEX;
  const bool age_known = !std::isnan(age_days);
  std::vector<std::pair<int32_t, size_t>> group_best;  // (group, item index), one hypothesis
  int32_t group_hypothesis = -1;
  for (size_t f = 0; f < folded.size(); ++f) {
    const int32_t e = folded[f];
    const EvidenceScore& ev = rs.evidence_scores[e];
    if (!(sex_known && kinds[f].sex) && !(age_known && kinds[f].age)) continue;
    const Truth t = EvalDemographic(rs, ev.condition, sex, age_days);
    if (t == Truth::kUnknown) continue;
    if ((t == Truth::kTrue ? ev.log_lr_positive : ev.log_lr_negative) == 0) continue;  // LR 1
    ApplyEvidence(e, ev, t == Truth::kTrue, context.items.emplace_back());
    context.items.back().explain_rank = ExplainRank(rs.evidence[e], t == Truth::kTrue);
    if (ev.group < 0) continue;
    if (ev.hypothesis != group_hypothesis) {
      group_best.clear();
      group_hypothesis = ev.hypothesis;
    }
    auto it = std::find_if(group_best.begin(), group_best.end(),
                           [&](const auto& g) { return g.first == ev.group; });
    if (it == group_best.end()) {
      group_best.emplace_back(ev.group, context.items.size() - 1);
    } else {
      AppliedEvidence& best = context.items[it->second];
      if (std::fabs(context.items.back().log_lr) > std::fabs(best.log_lr)) {
        best.superseded = true;
        it->second = context.items.size() - 1;
      } else {
        context.items.back().superseded = true;
      }
    }
  }
  const auto& items = context.items;
  for (size_t i = 0; i < items.size();) {
    const int32_t h = rs.evidence[items[i].evidence].hypothesis;
    double sum = 0;
    size_t j = i;
    for (; j < items.size() && rs.evidence[items[j].evidence].hypothesis == h; ++j) {
      if (!items[j].superseded) sum += items[j].log_lr;
    }
    DemographicHypothesis entry;
    entry.hypothesis = h;
    entry.begin = static_cast<uint32_t>(i);
    entry.end = static_cast<uint32_t>(j);
    entry.weight = rs.hypotheses[h].pretest_probability * std::exp(sum);
    if (!rs.hypotheses[h].max_probability) {
      context.order.push_back(static_cast<int32_t>(context.hypotheses.size()));
    }
    context.hypotheses.push_back(entry);
    i = j;
  }
  std::sort(context.order.begin(), context.order.end(), [&](int32_t a, int32_t b) {
    const DemographicHypothesis& x = context.hypotheses[a];
    const DemographicHypothesis& y = context.hypotheses[b];
    if (x.weight != y.weight) return x.weight > y.weight;
    return rs.hypotheses[x.hypothesis].id_rank < rs.hypotheses[y.hypothesis].id_rank;
  });
  return context;
}

}  // namespace

double BernoulliEntropyBits(double p) {
  if (p <= 0 || p >= 1) return 0;
  return -(p * std::log2(p) + (1 - p) * std::log2(1 - p));
}

void HpoConceptIndex::Build(
    const absl::flat_hash_map<std::string, std::vector<int32_t>>& by_code) {
  for (const auto& [key, concepts] : by_code) {
    if (!absl::StartsWith(key, "HPO|")) continue;
    const int32_t number = ontology::HpoNumber(absl::string_view(key).substr(4));
    if (number < 0) continue;
    if (concepts.size() == 1) {
      map_.Insert(number, concepts[0]);
      continue;
    }
    map_.Insert(number, ~static_cast<int32_t>(lists_.size()));
    lists_.push_back(static_cast<int32_t>(concepts.size()));
    lists_.insert(lists_.end(), concepts.begin(), concepts.end());
  }
}

std::string CodeKey(const std::string& system, const std::string& code) {
  return absl::StrCat(system, "|", code);
}

bool IsCanonicalSystem(absl::string_view s) {
  switch (s.size()) {
    case 3: return s == "HPO";
    case 4: return s == "OMIM" || s == "HGNC";
    case 5: return s == "LOINC" || s == "ORPHA" || s == "ICD10" || s == "LOCAL";
    case 8: return s == "SNOMEDCT";
    default: return false;
  }
}

std::string NormalizeSystem(const std::string& system, const std::string& code) {
  // Fast path: already canonical (what the rules and most callers send).
  if (IsCanonicalSystem(system)) return system;
  std::string upper = absl::AsciiStrToUpper(absl::StripAsciiWhitespace(system));
  if (upper == "HP" || upper == "HUMAN PHENOTYPE ONTOLOGY") upper = "HPO";
  if (upper == "SNOMED" || upper == "SNOMED CT" || upper == "SNOMED-CT" || upper == "SCT") {
    upper = "SNOMEDCT";
  }
  if (upper == "ICD-10" || upper == "ICD10CM" || upper == "ICD-10-CM") upper = "ICD10";
  if (upper == "ORPHANET") upper = "ORPHA";
  if (upper == "HGNC:SYMBOL" || upper == "GENE") upper = "HGNC";
  if (!upper.empty()) return upper;
  if (absl::StartsWith(code, "HP:")) return "HPO";
  if (absl::StartsWith(code, "OMIM:")) return "OMIM";
  if (absl::StartsWith(code, "ORPHA:")) return "ORPHA";
  if (absl::StartsWith(code, "LOINC:")) return "LOINC";
  return "";
}

AgeDays ToDays(const cds::v1::Age& age) {
  AgeDays result;
  switch (age.value_case()) {
    case cds::v1::Age::VALUE_NOT_SET:
      return result;
    case cds::v1::Age::kDays:
      result.set = true;
      result.days = age.days();
      if (!std::isfinite(age.days())) {
        result.error = "must be a finite number of days";
      } else if (age.days() < 0) {
        result.error = "must not be negative";
      } else if (age.days() > 150 * 365.25) {
        result.error = "is beyond a plausible human age";
      }
      return result;
    case cds::v1::Age::kIso8601Duration:
      result.set = true;
      if (!ParseIsoDuration(age.iso8601_duration(), &result.days)) {
        result.error = "is not an ISO 8601 duration such as \"P3M\" or \"P1Y2M\"";
      } else if (result.days > 150 * 365.25) {
        result.error = "is beyond a plausible human age";
      }
      return result;
  }
  return result;
}

const DemographicContext* CompiledRuleSet::DemographicContextFor(int32_t sex,
                                                                  double age_days) const {
  if (demographic_contexts.empty()) return nullptr;
  size_t sex_slot = 0;
  if (sex != cds::v1::UNKNOWN_SEX) {
    sex_slot = static_cast<size_t>(
                   std::find(demographic_sexes.begin(), demographic_sexes.end(), sex) -
                   demographic_sexes.begin()) +
               1;
  }
  const size_t age_slots = demographic_age_bounds.size() + 2;
  const size_t age_slot =
      std::isnan(age_days)
          ? age_slots - 1
          : static_cast<size_t>(std::upper_bound(demographic_age_bounds.begin(),
                                                 demographic_age_bounds.end(), age_days) -
                                demographic_age_bounds.begin());
  return &demographic_contexts[demographic_context_of[sex_slot * age_slots + age_slot]];
}

void FoldDemographicEvidence(CompiledRuleSet* rs) {
  rs->demographic_sexes.clear();
  rs->demographic_age_bounds.clear();
  rs->demographic_context_of.clear();
  rs->demographic_contexts.clear();
  // Which items fold: sex/age leaves only, and so is the rest of their correlated group.
  std::vector<LeafKinds> kinds(rs->evidence.size());
  std::vector<bool> demographic(rs->evidence.size());
  for (size_t e = 0; e < rs->evidence.size(); ++e) {
    CollectLeafKinds(*rs, rs->evidence[e].condition, &kinds[e]);
    demographic[e] = !kinds[e].other && (kinds[e].sex || kinds[e].age);
  }
  // (hypothesis, group) -> every item of it demographic.
  absl::flat_hash_map<std::pair<int32_t, int32_t>, bool> group_demographic;
  for (size_t e = 0; e < rs->evidence.size(); ++e) {
    const CompiledEvidence& ev = rs->evidence[e];
    if (ev.group < 0) continue;
    auto [it, inserted] = group_demographic.emplace(std::make_pair(ev.hypothesis, ev.group), true);
    it->second = it->second && demographic[e];
  }
  std::vector<int32_t> folded;
  std::vector<LeafKinds> folded_kinds;
  std::vector<bool> is_folded(rs->evidence.size());
  for (size_t e = 0; e < rs->evidence.size(); ++e) {
    const CompiledEvidence& ev = rs->evidence[e];
    if (!demographic[e]) continue;
    if (ev.group >= 0 && !group_demographic[{ev.hypothesis, ev.group}]) continue;
    folded.push_back(static_cast<int32_t>(e));
    folded_kinds.push_back(kinds[e]);
    is_folded[e] = true;
  }
  auto unfolded = [&](const std::vector<RuleRef>& refs) {
    std::vector<RuleRef> kept;
    for (const RuleRef& r : refs) {
      if (r.kind == RuleRef::Kind::kEvidence && is_folded[r.index]) continue;
      kept.push_back(r);
    }
    return kept;
  };
  rs->candidates_on_sex = unfolded(rs->candidates_on_sex);
  rs->candidates_on_age = unfolded(rs->candidates_on_age);
  if (folded.empty()) return;

  for (int32_t e : folded) {
    CollectDemographicBounds(*rs, rs->evidence[e].condition, &rs->demographic_sexes,
                             &rs->demographic_age_bounds);
  }
  auto unique = [](auto* v) {
    std::sort(v->begin(), v->end());
    v->erase(std::unique(v->begin(), v->end()), v->end());
  };
  unique(&rs->demographic_sexes);
  unique(&rs->demographic_age_bounds);
  // A sex value no leaf names (every sex leaf is FALSE for it).
  int32_t other_sex = cds::v1::OTHER_SEX;
  while (other_sex == cds::v1::UNKNOWN_SEX ||
         std::find(rs->demographic_sexes.begin(), rs->demographic_sexes.end(), other_sex) !=
             rs->demographic_sexes.end()) {
    ++other_sex;
  }
  std::vector<int32_t> sex_values = {cds::v1::UNKNOWN_SEX};
  sex_values.insert(sex_values.end(), rs->demographic_sexes.begin(), rs->demographic_sexes.end());
  sex_values.push_back(other_sex);
  // One age per slot: below every bound, each bound (the start of its band), unknown.
  std::vector<double> ages = {-std::numeric_limits<double>::infinity()};
  ages.insert(ages.end(), rs->demographic_age_bounds.begin(), rs->demographic_age_bounds.end());
  ages.push_back(std::numeric_limits<double>::quiet_NaN());

  // Contexts with the same items are the same context.
  absl::flat_hash_map<std::string, int32_t> context_by_items;
  for (int32_t sex : sex_values) {
    for (double age : ages) {
      DemographicContext context = BuildContext(*rs, folded, folded_kinds, sex, age);
      std::string key;
      for (const AppliedEvidence& item : context.items) {
        const int32_t packed[2] = {item.evidence, (item.matched ? 1 : 0) | (item.superseded ? 2 : 0)};
        key.append(reinterpret_cast<const char*>(packed), sizeof(packed));
      }
      auto [it, inserted] = context_by_items.emplace(
          std::move(key), static_cast<int32_t>(rs->demographic_contexts.size()));
      if (inserted) rs->demographic_contexts.push_back(std::move(context));
      rs->demographic_context_of.push_back(it->second);
    }
  }
}

}  // namespace cds::compiler
