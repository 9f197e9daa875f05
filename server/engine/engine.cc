#include "server/engine/engine.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "server/engine/patient_check.h"

namespace cds::engine {
namespace {

using compiler::CompiledCondition;
using compiler::CompiledRuleSet;
using compiler::ConditionId;
using compiler::RuleRef;
using cds::v1::Finding;
using cds::v1::Relative;

constexpr double kNan = std::numeric_limits<double>::quiet_NaN();

// Three-valued (Kleene) truth.
enum class Tri : uint8_t { kFalse, kTrue, kUnknown };

struct FindingFact {
  Finding::Status status;
  double onset_days;  // NaN when unknown
  int index;          // into patient.findings
};

struct LabFact {
  double value;     // in the lab's canonical unit
  double age_days;  // NaN when unknown
  std::optional<double> lower;  // the reporting lab's own range, canonical unit
  std::optional<double> upper;
  int index;  // into patient.measurements
};

// What the patient record says, resolved against one rule set. Built per request; sizes
// follow the patient's record, not the rule set.
struct Facts {
  const cds::v1::Patient* patient = nullptr;
  cds::v1::Sex sex = cds::v1::UNKNOWN_SEX;
  double age_days = kNan;
  absl::flat_hash_map<int32_t, std::vector<FindingFact>> findings;  // by concept
  absl::flat_hash_map<int32_t, std::vector<LabFact>> labs;          // by lab
  const cds::v1::FamilyHistory* family = nullptr;  // null when no history was taken
  // Set once the diagnoses are scored; read by probability conditions.
  const class Scores* scores = nullptr;
};

// Posterior probabilities over the differential {hypotheses, none of these}. Only the
// hypotheses that evidence moved for this patient are stored: every other one keeps its
// pretest weight, and they rank in the compiler's pretest order, so the work follows the
// patient's findings rather than the size of the rule set.
class Scores {
 public:
  // `log_lr`: the summed log likelihood ratio of each touched hypothesis.
  Scores(const CompiledRuleSet& rs, std::vector<std::pair<int32_t, double>> log_lr)
      : rs_(rs) {
    total_ = 1.0;  // none (1 - sum of pretests) + every untouched hypothesis at its pretest
    for (const auto& [h, l] : log_lr) {
      const double prior = rs.hypotheses[h].pretest_probability;
      const double w = prior * std::exp(l);
      weight_.emplace(h, w);
      total_ += w - prior;
    }
    for (const auto& [h, w] : weight_) touched_.push_back(h);
    std::sort(touched_.begin(), touched_.end(), [&](int32_t a, int32_t b) { return Before(a, b); });
  }

  // Uncapped probability of `h` (the belief the value of tests is computed over).
  double Belief(int32_t h) const {
    auto it = weight_.find(h);
    return (it != weight_.end() ? it->second : rs_.hypotheses[h].pretest_probability) / total_;
  }
  double NoneBelief() const { return std::max(0.0, 1.0 - rs_.pretest_sum) / total_; }
  // Probability shown and tested: capped by the hypothesis' ceiling, if any.
  double Posterior(int32_t h) const {
    const double p = Belief(h);
    const auto& cap = rs_.hypotheses[h].max_probability;
    return cap ? std::min(p, *cap) : p;
  }
  bool Touched(int32_t h) const { return weight_.contains(h); }

  // The first `count` hypotheses in rank order (posterior descending, then id).
  const std::vector<int32_t>& Top(size_t count) const {
    const size_t n = rs_.hypotheses.size();
    while (ranked_.size() < std::min(count, n)) {
      while (next_untouched_ < rs_.hypotheses_by_pretest.size() &&
             Touched(rs_.hypotheses_by_pretest[next_untouched_])) {
        ++next_untouched_;
      }
      const bool have_touched = next_touched_ < touched_.size();
      const bool have_untouched = next_untouched_ < rs_.hypotheses_by_pretest.size();
      if (have_touched &&
          (!have_untouched ||
           Before(touched_[next_touched_], rs_.hypotheses_by_pretest[next_untouched_]))) {
        ranked_.push_back(touched_[next_touched_++]);
      } else {
        ranked_.push_back(rs_.hypotheses_by_pretest[next_untouched_++]);
      }
    }
    return ranked_;
  }

  // 0-based rank of `h` if it is within the first `count`, else `count`.
  int RankWithin(int32_t h, size_t count) const {
    const auto& top = Top(count);
    for (size_t i = 0; i < top.size() && i < count; ++i) {
      if (top[i] == h) return static_cast<int>(i);
    }
    return static_cast<int>(count);
  }

 private:
  bool Before(int32_t a, int32_t b) const {
    const double pa = Posterior(a);
    const double pb = Posterior(b);
    if (pa != pb) return pa > pb;
    return rs_.hypotheses[a].id < rs_.hypotheses[b].id;
  }

  const CompiledRuleSet& rs_;
  double total_ = 1.0;
  absl::flat_hash_map<int32_t, double> weight_;
  std::vector<int32_t> touched_;  // in rank order
  // Lazily merged ranking.
  mutable std::vector<int32_t> ranked_;
  mutable size_t next_touched_ = 0;
  mutable size_t next_untouched_ = 0;
};

std::string Fmt(double v) { return absl::StrFormat("%.3g", v); }

std::string FieldPath(const char* repeated, int index, const char* rest = "") {
  return absl::StrCat("patient.", repeated, "[", index, "]", rest);
}

// Relationships that share the patient's maternal X chromosome lineage.
bool OnMaternalXLine(Relative::Relationship r) {
  switch (r) {
    case Relative::MOTHER:
    case Relative::BROTHER:
    case Relative::SISTER:
    case Relative::MATERNAL_HALF_BROTHER:
    case Relative::MATERNAL_HALF_SISTER:
    case Relative::MATERNAL_UNCLE:
    case Relative::MATERNAL_AUNT:
    case Relative::MATERNAL_GRANDFATHER:
    case Relative::MATERNAL_GRANDMOTHER:
    case Relative::MATERNAL_GREAT_UNCLE:
    case Relative::MATERNAL_COUSIN_VIA_AUNT:
    case Relative::SISTERS_SON:
      return true;
    default:
      return false;
  }
}

// The relative's sex as recorded, or as implied by the relationship.
cds::v1::Sex RelativeSex(const Relative& relative) {
  if (relative.sex() == cds::v1::MALE || relative.sex() == cds::v1::FEMALE) return relative.sex();
  switch (relative.relationship()) {
    case Relative::FATHER:
    case Relative::BROTHER:
    case Relative::MATERNAL_HALF_BROTHER:
    case Relative::MATERNAL_UNCLE:
    case Relative::MATERNAL_GRANDFATHER:
    case Relative::MATERNAL_GREAT_UNCLE:
    case Relative::SISTERS_SON:
    case Relative::SON:
    case Relative::PATERNAL_UNCLE:
    case Relative::PATERNAL_GRANDFATHER:
      return cds::v1::MALE;
    case Relative::MOTHER:
    case Relative::SISTER:
    case Relative::MATERNAL_HALF_SISTER:
    case Relative::MATERNAL_AUNT:
    case Relative::MATERNAL_GRANDMOTHER:
    case Relative::DAUGHTER:
    case Relative::PATERNAL_AUNT:
    case Relative::PATERNAL_GRANDMOTHER:
      return cds::v1::FEMALE;
    default:
      return cds::v1::UNKNOWN_SEX;
  }
}

// The reference limit for a measurement: the reporting lab's own range when supplied,
// otherwise the rule set's default for the age at measurement.
std::optional<double> Limit(const compiler::CompiledLab& lab, const LabFact& fact, bool upper) {
  if (upper && fact.upper) return fact.upper;
  if (!upper && fact.lower) return fact.lower;
  if (std::isnan(fact.age_days)) return std::nullopt;
  for (const auto& limit : lab.limits) {
    if (limit.ages.Contains(fact.age_days)) return upper ? limit.upper : limit.lower;
  }
  return std::nullopt;
}

class Evaluator {
 public:
  Evaluator(const CompiledRuleSet& rs, const Facts& facts) : rs_(rs), facts_(facts) {}

  Tri Eval(ConditionId id) const {
    const CompiledCondition& c = rs_.conditions[id];
    using K = CompiledCondition::Kind;
    switch (c.kind) {
      case K::kFinding: return EvalFinding(c, nullptr);
      case K::kLab: return EvalLab(c, nullptr);
      case K::kSex:
        if (facts_.sex == cds::v1::UNKNOWN_SEX) return Tri::kUnknown;
        return facts_.sex == c.count ? Tri::kTrue : Tri::kFalse;
      case K::kAge:
        if (std::isnan(facts_.age_days)) return Tri::kUnknown;
        return c.ages.Contains(facts_.age_days) ? Tri::kTrue : Tri::kFalse;
      case K::kFamily: return EvalFamily(c);
      case K::kConsanguinity: {
        if (facts_.family == nullptr) return Tri::kUnknown;
        const auto value = facts_.family->consanguinity();
        if (value == cds::v1::FamilyHistory::CONSANGUINITY_UNSPECIFIED) return Tri::kUnknown;
        const bool consanguineous = value == cds::v1::FamilyHistory::CONSANGUINEOUS;
        return consanguineous == (c.count == 1) ? Tri::kTrue : Tri::kFalse;
      }
      case K::kAll: {
        bool unknown = false;
        for (ConditionId child : c.children) {
          const Tri t = Eval(child);
          if (t == Tri::kFalse) return Tri::kFalse;
          if (t == Tri::kUnknown) unknown = true;
        }
        return unknown ? Tri::kUnknown : Tri::kTrue;
      }
      case K::kAny: {
        bool unknown = false;
        for (ConditionId child : c.children) {
          const Tri t = Eval(child);
          if (t == Tri::kTrue) return Tri::kTrue;
          if (t == Tri::kUnknown) unknown = true;
        }
        return unknown ? Tri::kUnknown : Tri::kFalse;
      }
      case K::kNot: {
        const Tri t = Eval(c.children[0]);
        if (t == Tri::kUnknown) return t;
        return t == Tri::kTrue ? Tri::kFalse : Tri::kTrue;
      }
      case K::kAtLeast: {
        int trues = 0;
        int unknowns = 0;
        for (ConditionId child : c.children) {
          const Tri t = Eval(child);
          if (t == Tri::kTrue) ++trues;
          if (t == Tri::kUnknown) ++unknowns;
        }
        if (trues >= c.count) return Tri::kTrue;
        if (trues + unknowns < c.count) return Tri::kFalse;
        return Tri::kUnknown;
      }
      case K::kProbability: {
        if (facts_.scores == nullptr) return Tri::kUnknown;
        const bool high_enough = facts_.scores->Posterior(c.ref) >= c.value;
        const bool in_top =
            c.count == 0 || facts_.scores->RankWithin(c.ref, static_cast<size_t>(c.count)) < c.count;
        return high_enough && in_top ? Tri::kTrue : Tri::kFalse;
      }
    }
    return Tri::kUnknown;
  }

  // Leaves that hold (outside any `not`), with the patient codes they matched: the reasons
  // shown for an action or a matched evidence item.
  void CollectReasons(ConditionId id, std::vector<std::string>* reasons,
                      std::vector<int>* finding_indices) const {
    const CompiledCondition& c = rs_.conditions[id];
    using K = CompiledCondition::Kind;
    switch (c.kind) {
      case K::kAll:
      case K::kAny:
      case K::kAtLeast:
        for (ConditionId child : c.children) {
          if (Eval(child) == Tri::kTrue) CollectReasons(child, reasons, finding_indices);
        }
        return;
      case K::kNot:
        reasons->push_back(c.description);
        return;
      case K::kFinding:
        if (EvalFinding(c, finding_indices) == Tri::kTrue) reasons->push_back(c.description);
        return;
      case K::kLab: {
        std::string detail;
        if (EvalLab(c, &detail) == Tri::kTrue) reasons->push_back(detail);
        return;
      }
      default:
        if (Eval(id) == Tri::kTrue) reasons->push_back(c.description);
        return;
    }
  }

  // The patient's codes that made a finding leaf (anywhere under `id`) TRUE or FALSE.
  void CollectFindingCodes(ConditionId id, std::vector<int>* finding_indices) const {
    const CompiledCondition& c = rs_.conditions[id];
    if (c.kind == CompiledCondition::Kind::kFinding) {
      auto it = facts_.findings.find(c.ref);
      if (it == facts_.findings.end()) return;
      for (const FindingFact& f : it->second) {
        if (f.status != Finding::UNKNOWN) finding_indices->push_back(f.index);
      }
      return;
    }
    for (ConditionId child : c.children) CollectFindingCodes(child, finding_indices);
  }

  // Describes the deciding measurement of each lab leaf under `id` that had data, e.g.
  // "Total IgE 850 [IU]/mL > 13 (upper limit for age 13)".
  void CollectLabDetails(ConditionId id, std::vector<std::string>* details) const {
    const CompiledCondition& c = rs_.conditions[id];
    if (c.kind == CompiledCondition::Kind::kLab) {
      std::string detail;
      if (EvalLab(c, &detail) != Tri::kUnknown) details->push_back(std::move(detail));
      return;
    }
    for (ConditionId child : c.children) CollectLabDetails(child, details);
  }

 private:
  Tri EvalFinding(const CompiledCondition& c, std::vector<int>* matched) const {
    auto it = facts_.findings.find(c.ref);
    if (it == facts_.findings.end()) return Tri::kUnknown;
    const bool any_onset = c.ages.unbounded();
    bool truth = false;
    bool unknown = false;
    bool falsity = false;
    for (const FindingFact& f : it->second) {
      switch (f.status) {
        case Finding::PRESENT:
          if (any_onset || (!std::isnan(f.onset_days) && c.ages.Contains(f.onset_days))) {
            truth = true;
            if (matched != nullptr) matched->push_back(f.index);
          } else if (std::isnan(f.onset_days)) {
            unknown = true;
          } else {
            falsity = true;
          }
          break;
        case Finding::EXCLUDED:
          falsity = true;
          break;
        default:
          break;
      }
    }
    if (truth) return Tri::kTrue;
    if (unknown) return Tri::kUnknown;
    return falsity ? Tri::kFalse : Tri::kUnknown;
  }

  Tri EvalLab(const CompiledCondition& c, std::string* detail) const {
    auto it = facts_.labs.find(c.ref);
    if (it == facts_.labs.end()) return Tri::kUnknown;
    const compiler::CompiledLab& lab = rs_.labs[c.ref];
    // The latest measurement taken at an age the condition accepts.
    const LabFact* latest = nullptr;
    for (const LabFact& fact : it->second) {
      if (!c.ages.unbounded() && (std::isnan(fact.age_days) || !c.ages.Contains(fact.age_days))) {
        continue;
      }
      if (latest == nullptr || std::isnan(latest->age_days) ||
          (!std::isnan(fact.age_days) && fact.age_days >= latest->age_days)) {
        latest = &fact;
      }
    }
    if (latest == nullptr) return Tri::kUnknown;
    using T = CompiledCondition::LabThreshold;
    double threshold = c.value;
    std::string limit_text;
    if (c.lab_threshold == T::kAboveUpperTimes || c.lab_threshold == T::kBelowLowerTimes) {
      const bool upper = c.lab_threshold == T::kAboveUpperTimes;
      const std::optional<double> limit = Limit(lab, *latest, upper);
      if (!limit) return Tri::kUnknown;
      threshold = c.value * *limit;
      limit_text = absl::StrCat(upper ? "upper" : "lower", " limit for age ", Fmt(*limit));
    }
    const bool above = c.lab_threshold == T::kAboveUpperTimes || c.lab_threshold == T::kAbove;
    const bool holds = above ? latest->value > threshold : latest->value < threshold;
    if (detail != nullptr) {
      *detail = absl::StrCat(lab.label, " ", Fmt(latest->value), " ", lab.canonical_unit,
                             holds ? (above ? " > " : " < ") : (above ? " <= " : " >= "),
                             Fmt(threshold),
                             limit_text.empty() ? "" : absl::StrCat(" (", limit_text, ")"));
    }
    return holds ? Tri::kTrue : Tri::kFalse;
  }

  Tri EvalFamily(const CompiledCondition& c) const {
    if (facts_.family == nullptr) return Tri::kUnknown;
    int count = 0;
    for (const Relative& relative : facts_.family->relatives()) {
      if (c.family_line == cds::v1::FamilyHistoryCondition::MATERNAL_X_LINE &&
          !OnMaternalXLine(relative.relationship())) {
        continue;
      }
      if (c.family_sex != cds::v1::SEX_UNSPECIFIED && RelativeSex(relative) != c.family_sex) {
        continue;
      }
      bool affected = c.family_or_died_in_infancy && relative.died_in_infancy();
      if (!affected && c.ref >= 0) {
        for (const cds::v1::Code& code : relative.conditions()) {
          auto hit = rs_.concepts_by_code.find(
              compiler::CodeKey(compiler::NormalizeSystem(code.system(), code.code()), code.code()));
          if (hit != rs_.concepts_by_code.end() &&
              std::find(hit->second.begin(), hit->second.end(), c.ref) != hit->second.end()) {
            affected = true;
            break;
          }
        }
      }
      if (affected) ++count;
    }
    return count >= c.count ? Tri::kTrue : Tri::kFalse;
  }

  const CompiledRuleSet& rs_;
  const Facts& facts_;
};

void AddWarning(cds::v1::EvaluateResponse* response, cds::v1::Warning::Kind kind,
                std::string field, std::string message) {
  auto* w = response->add_warnings();
  w->set_kind(kind);
  w->set_field(std::move(field));
  w->set_message(std::move(message));
}

// Resolves the patient's record against the rule set, adding warnings for what it
// cannot use.
Facts BuildFacts(const CompiledRuleSet& rs, const cds::v1::Patient& patient,
                 cds::v1::EvaluateResponse* response) {
  Facts facts;
  facts.patient = &patient;
  facts.sex = patient.sex() == cds::v1::OTHER_SEX ? cds::v1::OTHER_SEX : patient.sex();
  const compiler::AgeDays age = compiler::ToDays(patient.age());
  if (age.set) facts.age_days = age.days;
  if (patient.has_family_history()) facts.family = &patient.family_history();

  for (int i = 0; i < patient.findings_size(); ++i) {
    const Finding& f = patient.findings(i);
    if (f.status() == Finding::UNKNOWN) continue;
    const std::string system = compiler::NormalizeSystem(f.term().system(), f.term().code());
    const std::string key = compiler::CodeKey(system, f.term().code());
    const auto& index =
        f.status() == Finding::EXCLUDED ? rs.concepts_by_excluded_code : rs.concepts_by_code;
    auto it = index.find(key);
    if (rs.ontology != nullptr && system == "HPO") {
      // With an ontology, only ids it does not know are worth a warning: a known term that
      // no rule uses is simply not evidence for this differential.
      if (!rs.ontology->Knows(f.term().code())) {
        AddWarning(response, cds::v1::Warning::UNKNOWN_CODE, FieldPath("findings", i, ".term"),
                   absl::StrCat("code ", f.term().code(), " is not in ontology release ",
                                rs.ontology->release(), "; it did not affect the result"));
      }
      if (it == index.end()) continue;
    } else if (it == index.end()) {
      if (f.status() == Finding::PRESENT || !rs.concepts_by_code.contains(key)) {
        AddWarning(response, cds::v1::Warning::UNKNOWN_CODE, FieldPath("findings", i, ".term"),
                   absl::StrCat("code ", f.term().code(), " is not known to rule set ", rs.name,
                                " ", rs.version, "; it did not affect the result"));
      }
      continue;
    }
    const compiler::AgeDays onset = compiler::ToDays(f.onset());
    for (int32_t concept_index : it->second) {
      facts.findings[concept_index].push_back(
          FindingFact{f.status(), onset.set ? onset.days : kNan, i});
    }
  }

  for (int i = 0; i < patient.measurements_size(); ++i) {
    const cds::v1::Measurement& m = patient.measurements(i);
    const std::string key = compiler::CodeKey(
        compiler::NormalizeSystem(m.assay().system(), m.assay().code()), m.assay().code());
    auto it = rs.labs_by_code.find(key);
    if (it == rs.labs_by_code.end()) {
      AddWarning(response, cds::v1::Warning::UNUSED_MEASUREMENT,
                 FieldPath("measurements", i, ".assay"),
                 absl::StrCat("assay ", m.assay().code(), " is not used by rule set ", rs.name,
                              " ", rs.version));
      continue;
    }
    const compiler::CompiledLab& lab = rs.labs[it->second];
    auto factor = lab.unit_factors.find(absl::AsciiStrToLower(m.unit()));
    if (factor == lab.unit_factors.end()) {
      AddWarning(response, cds::v1::Warning::UNCONVERTIBLE_UNIT,
                 FieldPath("measurements", i, ".unit"),
                 absl::StrCat("unit '", m.unit(), "' cannot be converted to ", lab.canonical_unit,
                              " for ", lab.label, "; the measurement was ignored"));
      continue;
    }
    const compiler::AgeDays at = compiler::ToDays(m.age());
    LabFact fact{m.value() * factor->second, at.set ? at.days : facts.age_days, {}, {}, i};
    if (m.has_reference_range()) {
      if (m.reference_range().has_low()) fact.lower = m.reference_range().low() * factor->second;
      if (m.reference_range().has_high()) fact.upper = m.reference_range().high() * factor->second;
    }
    facts.labs[it->second].push_back(fact);
  }

  // Values computed from a percentage and a total measured together.
  std::vector<std::pair<int32_t, LabFact>> derived;
  for (const auto& [lab, percent_facts] : facts.labs) {
    for (const compiler::CompiledDerivation& d : rs.derivations_by_percent_lab[lab]) {
      auto totals = facts.labs.find(d.total_lab);
      bool used = false;
      if (totals != facts.labs.end()) {
        for (const LabFact& pct : percent_facts) {
          for (const LabFact& total : totals->second) {
            const bool both_unknown = std::isnan(pct.age_days) && std::isnan(total.age_days);
            if (!both_unknown && !(std::fabs(pct.age_days - total.age_days) <= d.max_days_apart)) {
              continue;
            }
            derived.emplace_back(d.target, LabFact{pct.value / 100 * total.value, pct.age_days,
                                                   {}, {}, pct.index});
            used = true;
          }
        }
      }
      if (!used) {
        AddWarning(response, cds::v1::Warning::MISSING_KEY_DATA, "patient.measurements",
                   absl::StrCat(rs.labs[lab].label, " without a ", rs.labs[d.total_lab].label,
                                " taken with it cannot give ", rs.labs[d.target].label));
      }
    }
  }
  for (auto& [target, fact] : derived) facts.labs[target].push_back(fact);
  return facts;
}

// Warns about missing data that the rule set's evidence would use.
void WarnMissingKeyData(const CompiledRuleSet& rs, const Facts& facts,
                        cds::v1::EvaluateResponse* response) {
  if (facts.sex == cds::v1::UNKNOWN_SEX && !rs.rules_on_sex.empty()) {
    AddWarning(response, cds::v1::Warning::MISSING_KEY_DATA, "patient.sex",
               "sex is not known; the rule set weighs it");
  }
  if (std::isnan(facts.age_days) && !rs.rules_on_age.empty()) {
    AddWarning(response, cds::v1::Warning::MISSING_KEY_DATA, "patient.age",
               "age is not known; the rule set weighs it");
  }
  if (facts.family == nullptr && !rs.rules_on_family.empty()) {
    AddWarning(response, cds::v1::Warning::MISSING_KEY_DATA, "patient.family_history",
               "no family history was recorded; affected relatives would change the suggestions");
  }
  for (size_t lab = 0; lab < rs.labs.size(); ++lab) {
    const bool used_by_evidence =
        std::any_of(rs.rules_by_lab[lab].begin(), rs.rules_by_lab[lab].end(),
                    [](const RuleRef& r) { return r.kind == RuleRef::Kind::kEvidence; });
    if (used_by_evidence && !facts.labs.contains(static_cast<int32_t>(lab))) {
      AddWarning(response, cds::v1::Warning::MISSING_KEY_DATA, "patient.measurements",
                 absl::StrCat("no usable ", rs.labs[lab].label,
                              " measurement; it would change the suggestions"));
    }
  }
}

// One applied evidence item, for scoring and explanation.
struct Applied {
  int32_t evidence;
  bool matched;  // condition TRUE (else FALSE)
  double log_lr;
  bool superseded = false;
};

int UrgencyOrder(cds::v1::Urgency u) { return -static_cast<int>(u); }

double Entropy(const std::vector<double>& p) {
  double h = 0;
  for (double x : p) {
    if (x > 0) h -= x * std::log2(x);
  }
  return h;
}

// The value of a test's result for the current differential.
struct InformationValue {
  double gain_bits = 0;
  int32_t lead = -1;  // leading hypothesis
  double lead_now = 0;
  double lead_if_positive = 0;
  double lead_if_negative = 0;
};

bool FactKnown(const Facts& facts, const compiler::FactKey& key) {
  switch (key.kind) {
    case compiler::FactKey::Kind::kConcept: return facts.findings.contains(key.index);
    case compiler::FactKey::Kind::kLab: return facts.labs.contains(key.index);
    case compiler::FactKey::Kind::kFamily: return facts.family != nullptr;
  }
  return true;
}

// Expected information gain (bits) over the differential {hypotheses, none of these} of
// learning the test's unknown facts, each a binary outcome whose frequency in each
// hypothesis and in the comparison population comes from the rule set's single-leaf
// evidence on it (facts taken as independent given the diagnosis; correlated-group
// capping is not modelled). Hypotheses without evidence on the facts behave like the
// comparison population, so they are lumped with "none of these" into one class: the
// gain is the same, and the work follows the evidence on the facts, not the rule set.
// nullopt when every fact is known or none is informative.
std::optional<InformationValue> ValueOfTest(const CompiledRuleSet& rs, const Facts& facts,
                                            const Scores& scores, int32_t lead,
                                            const compiler::CompiledAction& action) {
  // Classes: the hypotheses some fact moves, then the lumped rest. (Small: linear search.)
  std::vector<int32_t> classes;
  auto class_of = [&classes](int32_t h) -> size_t {
    return static_cast<size_t>(std::find(classes.begin(), classes.end(), h) - classes.begin());
  };
  // Per informative unknown fact: P(positive | class), the rest's last.
  std::vector<std::vector<double>> p_positive;
  std::vector<std::vector<std::pair<int32_t, double>>> per_fact;  // (hypothesis, p)
  std::vector<double> q_of_fact;
  for (const compiler::FactKey& key : action.reveals) {
    if (FactKnown(facts, key)) continue;
    const std::vector<int32_t>* items = &rs.LeafEvidenceOn(key);
    if (items->empty()) continue;
    // Per hypothesis, its most informative item on this fact. The items are in evidence
    // order, so each hypothesis' items are contiguous.
    auto strength = [&](int32_t e) {
      return std::fabs(std::log(rs.evidence[e].lr_positive)) +
             std::fabs(std::log(rs.evidence[e].lr_negative));
    };
    double q_sum = 0;
    std::vector<std::pair<int32_t, double>> ps;
    for (size_t i = 0; i < items->size();) {
      const int32_t h = rs.evidence[(*items)[i]].hypothesis;
      int32_t best = (*items)[i];
      size_t j = i + 1;
      for (; j < items->size() && rs.evidence[(*items)[j]].hypothesis == h; ++j) {
        if (strength((*items)[j]) > strength(best)) best = (*items)[j];
      }
      q_sum += rs.evidence[best].p_comparison;
      ps.emplace_back(h, rs.evidence[best].p_hypothesis);
      if (class_of(h) == classes.size()) classes.push_back(h);
      i = j;
    }
    q_of_fact.push_back(q_sum / static_cast<double>(ps.size()));
    per_fact.push_back(std::move(ps));
  }
  if (per_fact.empty()) return std::nullopt;
  const size_t k = per_fact.size();
  const size_t m = classes.size() + 1;  // + the lumped rest
  p_positive.assign(k, {});
  for (size_t f = 0; f < k; ++f) {
    p_positive[f].assign(m, q_of_fact[f]);
    for (const auto& [h, p] : per_fact[f]) p_positive[f][class_of(h)] = p;
  }
  std::vector<double> belief(m);
  double involved = 0;
  for (size_t c = 0; c + 1 < m; ++c) {
    belief[c] = scores.Belief(classes[c]);
    involved += belief[c];
  }
  belief[m - 1] = std::max(0.0, 1.0 - involved);
  // The leading hypothesis' own class, or the rest when no fact moves it.
  const size_t lead_class = class_of(lead);  // classes.size() when in the lumped rest
  InformationValue value;
  value.lead = lead;
  value.lead_now = scores.Belief(lead);
  double expected_posterior_entropy = 0;
  std::vector<double> post(m);
  for (uint32_t mask = 0; mask < (1u << k); ++mask) {
    double p_outcome = 0;
    for (size_t c = 0; c < m; ++c) {
      double like = 1;
      for (size_t f = 0; f < k; ++f) {
        like *= (mask >> f & 1) ? p_positive[f][c] : 1 - p_positive[f][c];
      }
      post[c] = belief[c] * like;
      p_outcome += post[c];
    }
    if (p_outcome <= 0) continue;
    for (double& x : post) x /= p_outcome;
    expected_posterior_entropy += p_outcome * Entropy(post);
    // Within the lumped rest every member moves by the same factor.
    const double lead_after = lead_class < classes.size()
                                  ? post[lead_class]
                                  : (belief[m - 1] > 0 ? value.lead_now * post[m - 1] / belief[m - 1] : 0);
    if (mask == 0) value.lead_if_negative = lead_after;
    if (mask == (1u << k) - 1) value.lead_if_positive = lead_after;
  }
  value.gain_bits = std::max(0.0, Entropy(belief) - expected_posterior_entropy);
  return value;
}

// Sets the suggestion's code only when the rule has one (no empty "code": {} in JSON).
void FillCode(const cds::v1::Code& code, cds::v1::Suggestion* out) {
  if (!code.code().empty()) *out->mutable_code() = code;
}

}  // namespace

absl::Status ValidatePatient(const cds::v1::Patient& patient) {
  Violations violations(/*max_kept=*/1);
  CheckPatient(patient, violations);
  if (violations.empty()) return absl::OkStatus();
  const FieldViolation& first = violations.kept().front();
  return absl::InvalidArgumentError(absl::StrCat(first.field, " ", first.description));
}

absl::Status Evaluate(const CompiledRuleSet& rs, const cds::v1::Patient& patient,
                      const EvaluateOptions& options, cds::v1::EvaluateResponse* response) {
  if (options.validate) {
    absl::Status valid = ValidatePatient(patient);
    if (!valid.ok()) return valid;
  }

  auto* ref = response->mutable_rule_set();
  ref->set_name(rs.name);
  ref->set_version(rs.version);
  ref->set_digest(rs.digest);
  if (rs.ontology != nullptr) ref->set_ontology(rs.ontology->release());
  response->set_disclaimer(rs.disclaimer);

  Facts facts = BuildFacts(rs, patient, response);
  WarnMissingKeyData(rs, facts, response);
  const Evaluator evaluator(rs, facts);

  // 1. Candidate rules: those listed under a fact the patient record makes known.
  // Vectors, sorted and made unique once: cheaper than hash sets for these sizes.
  std::vector<int32_t> evidence_candidates;
  std::vector<int32_t> action_candidates;
  auto add = [&](const std::vector<RuleRef>& refs) {
    for (const RuleRef& r : refs) {
      (r.kind == RuleRef::Kind::kEvidence ? evidence_candidates : action_candidates)
          .push_back(r.index);
    }
  };
  auto sort_unique = [](std::vector<int32_t>* v) {
    std::sort(v->begin(), v->end());
    v->erase(std::unique(v->begin(), v->end()), v->end());
  };
  for (const auto& [concept_index, unused] : facts.findings) add(rs.rules_by_concept[concept_index]);
  for (const auto& [lab, unused] : facts.labs) add(rs.rules_by_lab[lab]);
  if (facts.sex != cds::v1::UNKNOWN_SEX) add(rs.rules_on_sex);
  if (!std::isnan(facts.age_days)) add(rs.rules_on_age);
  if (facts.family != nullptr) {
    add(rs.rules_on_family);
    if (facts.family->consanguinity() != cds::v1::FamilyHistory::CONSANGUINITY_UNSPECIFIED) {
      add(rs.rules_on_consanguinity);
    }
  }

  // 2. Score: sum of log likelihood ratios per hypothesis; within a correlated group only
  // the strongest item counts.
  sort_unique(&evidence_candidates);  // also makes explanations deterministic
  const std::vector<int32_t>& ordered = evidence_candidates;
  std::vector<Applied> applied;
  absl::flat_hash_map<std::pair<int32_t, int32_t>, size_t> group_best;  // (h, group) -> index
  for (int32_t e : ordered) {
    const compiler::CompiledEvidence& ev = rs.evidence[e];
    const Tri t = evaluator.Eval(ev.condition);
    if (t == Tri::kUnknown) continue;
    const double lr = t == Tri::kTrue ? ev.lr_positive : ev.lr_negative;
    if (lr == 1.0) continue;
    applied.push_back(Applied{e, t == Tri::kTrue, std::log(lr)});
    if (ev.group >= 0) {
      auto [it, inserted] =
          group_best.emplace(std::make_pair(ev.hypothesis, ev.group), applied.size() - 1);
      if (!inserted) {
        Applied& best = applied[it->second];
        if (std::fabs(applied.back().log_lr) > std::fabs(best.log_lr)) {
          best.superseded = true;
          it->second = applied.size() - 1;
        } else {
          applied.back().superseded = true;
        }
      }
    }
  }
  // Applied items are already grouped by hypothesis: the compiler numbers evidence
  // hypothesis by hypothesis, and the candidates were taken in evidence order.
  std::vector<std::pair<int32_t, double>> log_lr;  // per touched hypothesis
  absl::flat_hash_map<int32_t, std::pair<size_t, size_t>> applied_range;  // h -> [begin, end)
  for (size_t i = 0; i < applied.size();) {
    const int32_t h = rs.evidence[applied[i].evidence].hypothesis;
    double sum = 0;
    size_t j = i;
    for (; j < applied.size() && rs.evidence[applied[j].evidence].hypothesis == h; ++j) {
      if (!applied[j].superseded) sum += applied[j].log_lr;
    }
    log_lr.emplace_back(h, sum);
    applied_range.emplace(h, std::make_pair(i, j));
    i = j;
  }

  // 3. Posterior over the differential plus "none of these".
  const Scores scores(rs, std::move(log_lr));
  facts.scores = &scores;
  // The leading hypotheses: whose tests are worth valuing.
  constexpr size_t kLeading = 5;
  constexpr double kLeadingFloor = 0.01;
  const std::vector<int32_t> leading = scores.Top(kLeading);
  const int32_t lead = leading.empty() ? -1 : leading[0];

  // 4. Actions whose conditions hold; tests with an information value only while their
  // result is unknown and would move a leading hypothesis enough to be worth having.
  for (const auto& [h, range] : applied_range) add(rs.actions_by_hypothesis[h]);
  absl::flat_hash_set<int32_t> information_candidates;
  for (size_t i = 0; i < leading.size(); ++i) {
    if (i > 0 && scores.Posterior(leading[i]) < kLeadingFloor) break;
    for (int32_t a : rs.information_actions_by_hypothesis[leading[i]]) {
      information_candidates.insert(a);
    }
  }
  absl::flat_hash_map<int32_t, InformationValue> test_values;
  for (int32_t a : information_candidates) {
    const auto value = ValueOfTest(rs, facts, scores, lead, rs.actions[a]);
    if (value && value->gain_bits >= rs.actions[a].min_gain_bits) test_values.emplace(a, *value);
  }
  for (const auto& [a, value] : test_values) action_candidates.push_back(a);
  sort_unique(&action_candidates);
  std::vector<int32_t> fired;
  for (int32_t a : action_candidates) {
    const compiler::CompiledAction& action = rs.actions[a];
    // A test valued for its information fires only when that value is there.
    if (!action.reveals.empty() && !test_values.contains(a)) continue;
    if (action.condition < 0 || evaluator.Eval(action.condition) == Tri::kTrue) fired.push_back(a);
  }
  auto gain_of = [&](int32_t a) {
    auto it = test_values.find(a);
    return it == test_values.end() ? 0.0 : it->second.gain_bits;
  };
  auto action_less = [&](int32_t a, int32_t b) {
    const auto& x = rs.actions[a];
    const auto& y = rs.actions[b];
    if (x.urgency != y.urgency) return UrgencyOrder(x.urgency) < UrgencyOrder(y.urgency);
    if (x.priority != y.priority) return x.priority < y.priority;
    if (gain_of(a) != gain_of(b)) return gain_of(a) > gain_of(b);
    return x.id < y.id;
  };
  std::sort(fired.begin(), fired.end(), action_less);

  // 5. Suggestions in rank order: alerts, diagnoses, then the other actions.
  auto emit_action = [&](int32_t a) {
    const compiler::CompiledAction& action = rs.actions[a];
    auto* s = response->add_suggestions();
    s->set_kind(action.kind);
    s->set_rule_id(action.id);
    FillCode(action.code, s);
    s->set_title(action.title);
    s->set_detail(action.detail);
    s->set_urgency(action.urgency);
    if (auto it = test_values.find(a); it != test_values.end()) {
      const InformationValue& v = it->second;
      s->set_expected_information_gain(v.gain_bits);
      absl::StrAppend(
          s->mutable_detail(), s->detail().empty() ? "" : " ",
          absl::StrFormat("Its result is expected to be worth %.2f bits over the differential "
                          "(computed from this rule set's frequencies): P(%s) is %.2f now, "
                          "%.2f if positive, %.2f if negative.",
                          v.gain_bits, rs.hypotheses[v.lead].title, v.lead_now,
                          v.lead_if_positive, v.lead_if_negative));
    }
    if (options.explain && !action.reveals.empty()) {
      for (const compiler::FactKey& key : action.reveals) {
        if (FactKnown(facts, key)) continue;
        auto* e = s->add_evidence();
        e->set_rule_id(action.id);
        e->set_effect(cds::v1::Evidence::MATCHED);
        e->set_source(action.source);
        switch (key.kind) {
          case compiler::FactKey::Kind::kConcept:
            e->set_description(absl::StrCat("Not yet recorded: ", rs.concepts[key.index].label));
            break;
          case compiler::FactKey::Kind::kLab:
            e->set_description(absl::StrCat("No result yet: ", rs.labs[key.index].label));
            break;
          case compiler::FactKey::Kind::kFamily:
            e->set_description("No family history recorded");
            break;
        }
      }
    }
    if (!options.explain || action.condition < 0) return;
    std::vector<std::string> reasons;
    std::vector<int> finding_indices;
    evaluator.CollectReasons(action.condition, &reasons, &finding_indices);
    // A leaf reached through several branches is one reason.
    absl::flat_hash_set<std::string> seen_reasons;
    for (const std::string& reason : reasons) {
      if (!seen_reasons.insert(reason).second) continue;
      auto* e = s->add_evidence();
      e->set_rule_id(action.id);
      e->set_description(reason);
      e->set_effect(cds::v1::Evidence::MATCHED);
      e->set_source(action.source);
    }
    if (!finding_indices.empty() && s->evidence_size() > 0) {
      std::sort(finding_indices.begin(), finding_indices.end());
      finding_indices.erase(std::unique(finding_indices.begin(), finding_indices.end()),
                            finding_indices.end());
      for (int i : finding_indices) *s->mutable_evidence(0)->add_matched_codes() = patient.findings(i).term();
    }
    for (const auto& r : action.references) *s->add_references() = r;
  };
  for (int32_t a : fired) {
    if (rs.actions[a].kind == cds::v1::ALERT) emit_action(a);
  }
  constexpr size_t kAlwaysShownDiagnoses = 3;
  for (size_t r = 0; r < rs.hypotheses.size(); ++r) {
    const int32_t h = scores.Top(r + 1)[r];
    const double posterior = scores.Posterior(h);
    if (r >= kAlwaysShownDiagnoses && posterior < rs.min_probability_to_show) break;
    const compiler::CompiledHypothesis& hyp = rs.hypotheses[h];
    auto* s = response->add_suggestions();
    s->set_kind(cds::v1::DIAGNOSIS);
    s->set_rule_id(hyp.id);
    FillCode(hyp.code, s);
    s->set_title(hyp.title);
    s->set_detail(hyp.detail);
    s->set_urgency(cds::v1::INFO);
    s->set_probability(posterior);
    s->set_pretest_probability(hyp.pretest_probability);
    if (!options.explain) continue;
    std::vector<Applied> items;
    if (auto range = applied_range.find(h); range != applied_range.end()) {
      for (size_t i = range->second.first; i < range->second.second; ++i) items.push_back(applied[i]);
    }
    std::sort(items.begin(), items.end(), [&](const Applied& x, const Applied& y) {
      if (x.superseded != y.superseded) return !x.superseded;
      if (std::fabs(x.log_lr) != std::fabs(y.log_lr)) return std::fabs(x.log_lr) > std::fabs(y.log_lr);
      return rs.evidence[x.evidence].id < rs.evidence[y.evidence].id;
    });
    for (const Applied& item : items) {
      const compiler::CompiledEvidence& ev = rs.evidence[item.evidence];
      auto* e = s->add_evidence();
      e->set_rule_id(ev.id);
      std::vector<std::string> lab_details;
      evaluator.CollectLabDetails(ev.condition, &lab_details);
      e->set_description(lab_details.empty()
                             ? ev.description
                             : absl::StrCat(ev.description, ": ", absl::StrJoin(lab_details, "; ")));
      e->set_effect(item.matched ? cds::v1::Evidence::MATCHED : cds::v1::Evidence::NOT_MATCHED);
      e->set_likelihood_ratio(item.superseded ? 1.0 : std::exp(item.log_lr));
      e->set_superseded(item.superseded);
      e->set_source(ev.source);
      std::vector<int> finding_indices;
      evaluator.CollectFindingCodes(ev.condition, &finding_indices);
      std::sort(finding_indices.begin(), finding_indices.end());
      finding_indices.erase(std::unique(finding_indices.begin(), finding_indices.end()),
                            finding_indices.end());
      for (int i : finding_indices) *e->add_matched_codes() = patient.findings(i).term();
    }
    for (const auto& r : hyp.references) *s->add_references() = r;
  }
  for (int32_t a : fired) {
    if (rs.actions[a].kind != cds::v1::ALERT) emit_action(a);
  }
  for (int i = 0; i < response->suggestions_size(); ++i) {
    response->mutable_suggestions(i)->set_rank(i + 1);
  }
  return absl::OkStatus();
}

}  // namespace cds::engine
