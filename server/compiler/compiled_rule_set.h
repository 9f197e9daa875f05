#pragma once

// The compiled, immutable form of a rule set: what the engine evaluates. Built once by the
// compiler; shared read-only between threads (shared_ptr<const CompiledRuleSet>).
//
// Everything the request path needs is resolved here: concept, lab and hypothesis ids are
// dense indices, codes map to concepts through one hash index, and every rule is listed
// under the facts that can make it fire (so evaluation cost follows the patient's findings,
// not the size of the rule set).

#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "cds/v1/rules.pb.h"
#include "server/compiler/wire_fragments.h"
#include "server/ontology/hpo_number.h"
#include "server/ontology/ontology.h"

namespace cds::compiler {

// Key under which a patient's coded term is looked up: "<SYSTEM>|<code>", system upper-case.
// REQUIRES: `system` already normalised (see NormalizeSystem).
std::string CodeKey(const std::string& system, const std::string& code);

// Upper-cases a system name and infers it from a CURIE prefix when empty ("HP:" -> "HPO",
// "OMIM:" -> "OMIM", "ORPHA:" -> "ORPHA"). Returns "" when it cannot.
std::string NormalizeSystem(const std::string& system, const std::string& code);

// True for the names NormalizeSystem returns unchanged ("HPO", "LOINC", ...). Compares
// lengths first: it runs for every code of every request.
bool IsCanonicalSystem(absl::string_view system);

// Converts an Age to days. Error text names no value (callers add the field path).
// Returns nullopt for an unset Age; an error string for a malformed one.
struct AgeDays {
  bool set = false;
  double days = 0;
  absl::string_view error;  // non-empty when malformed (a literal: no allocation per call)
};
AgeDays ToDays(const cds::v1::Age& age);

// A [from, to) age interval in days; unbounded ends are +-infinity.
struct DayRange {
  double from = -1e300;
  double to = 1e300;
  bool Contains(double days) const { return days >= from && days < to; }
  bool unbounded() const { return from <= -1e300 && to >= 1e300; }
};

// Index into CompiledRuleSet::conditions.
using ConditionId = int32_t;

struct CompiledCondition {
  enum class Kind : uint8_t {
    kFinding,
    kLab,
    kSex,
    kAge,
    kFamily,
    kConsanguinity,
    kAll,
    kAny,
    kNot,
    kAtLeast,
    kProbability,
  };
  enum class LabThreshold : uint8_t {
    kAboveUpperTimes,
    kBelowLowerTimes,
    kAbove,
    kBelow,
  };
  Kind kind = Kind::kAll;
  // kFinding: concept index. kLab: lab index. kProbability: hypothesis index.
  // kFamily: concept index of the affected condition, or -1.
  int32_t ref = -1;
  // kAtLeast: required count. kSex: cds::v1::Sex value. kProbability: in_top (0 = any).
  // kFamily: min_count. kConsanguinity: 1 for "consanguineous", 0 for "not".
  int32_t count = 0;
  // kLab: threshold value or factor. kProbability: minimum posterior.
  double value = 0;
  LabThreshold lab_threshold = LabThreshold::kAbove;
  // kFinding: onset range. kLab: ages at measurement that count. kAge: patient age.
  DayRange ages;
  // kFamily.
  cds::v1::FamilyHistoryCondition::Line family_line =
      cds::v1::FamilyHistoryCondition::ANY_LINE;
  cds::v1::Sex family_sex = cds::v1::SEX_UNSPECIFIED;
  bool family_or_died_in_infancy = false;
  // kAll, kAny, kNot, kAtLeast.
  std::vector<ConditionId> children;
  // Readable form, for explanations ("Chronic diarrhoea present", "Total IgE > 10 x ULN").
  std::string description;
};

// Three-valued (Kleene) truth of a condition.
enum class Truth : uint8_t { kFalse, kTrue, kUnknown };

// The truth of a connective (kAll, kAny, kNot, kAtLeast) from its children's, which
// `child_truth(ConditionId)` gives. The engine and the compiler's folding of demographic
// evidence both decide connectives here, so they cannot disagree. Other kinds: kUnknown.
template <typename ChildTruth>
Truth CombineChildren(const CompiledCondition& c, ChildTruth child_truth) {
  using K = CompiledCondition::Kind;
  switch (c.kind) {
    case K::kAll: {
      bool unknown = false;
      for (ConditionId child : c.children) {
        const Truth t = child_truth(child);
        if (t == Truth::kFalse) return Truth::kFalse;
        if (t == Truth::kUnknown) unknown = true;
      }
      return unknown ? Truth::kUnknown : Truth::kTrue;
    }
    case K::kAny: {
      bool unknown = false;
      for (ConditionId child : c.children) {
        const Truth t = child_truth(child);
        if (t == Truth::kTrue) return Truth::kTrue;
        if (t == Truth::kUnknown) unknown = true;
      }
      return unknown ? Truth::kUnknown : Truth::kFalse;
    }
    case K::kNot: {
      const Truth t = child_truth(c.children[0]);
      if (t == Truth::kUnknown) return t;
      return t == Truth::kTrue ? Truth::kFalse : Truth::kTrue;
    }
    case K::kAtLeast: {
      int trues = 0;
      int unknowns = 0;
      for (ConditionId child : c.children) {
        const Truth t = child_truth(child);
        if (t == Truth::kTrue) ++trues;
        if (t == Truth::kUnknown) ++unknowns;
      }
      if (trues >= c.count) return Truth::kTrue;
      if (trues + unknowns < c.count) return Truth::kFalse;
      return Truth::kUnknown;
    }
    default:
      return Truth::kUnknown;
  }
}

struct CompiledConcept {
  std::string id;
  std::string label;
  std::string not_recorded;  // "Not yet recorded: <label>", explaining a test's value
};

struct CompiledReferenceLimit {
  DayRange ages;
  std::optional<double> lower;
  std::optional<double> upper;
};

struct CompiledLab {
  std::string id;
  std::string label;
  std::string canonical_unit;
  std::string no_result;  // "No result yet: <label>", explaining a test's value
  // Warning when a patient has no usable measurement of a lab evidence weighs.
  std::string missing_warning;
  // Unit (as written, and lower-cased) -> factor to the canonical unit.
  absl::flat_hash_map<std::string, double> unit_factors;
  std::vector<CompiledReferenceLimit> limits;
};

// A lab value computed as percent / 100 x total.
struct CompiledDerivation {
  int32_t target = -1;
  int32_t percent_lab = -1;
  int32_t total_lab = -1;
  double max_days_apart = 1;
};

struct CompiledEvidence {
  std::string id;  // "<hypothesis id>/<evidence id>"
  std::string description;
  ConditionId condition = -1;
  double lr_positive = 1;  // applied when the condition is TRUE
  double lr_negative = 1;  // applied when the condition is FALSE
  double log_lr_positive = 0;  // std::log of each, computed once
  double log_lr_negative = 0;
  int32_t hypothesis = -1;
  // Correlated-evidence group within the hypothesis, or -1.
  int32_t group = -1;
  std::string source;  // "ruleset.textproto:123"
  // Frequency of the condition in the hypothesis and in the comparison population, when
  // authored or derivable from a pair of likelihood ratios; negative otherwise. Used to
  // compute the value of a test.
  double p_hypothesis = -1;
  double p_comparison = -1;
  // |log LR+| + |log LR-|: how much the item's result moves the odds, either way (the
  // value of a test takes each hypothesis' strongest item on a fact).
  double strength = 0;
  // Position of `id` among the evidence ids in ascending order (explanations break ties
  // on it without comparing strings).
  int32_t id_rank = 0;
  // Position of this item's TRUE (resp. FALSE) outcome among every item's outcomes in the
  // order explanations list them: |log LR| descending, then id_rank. Sorting an
  // explanation compares two integers instead of two |log LR|s and then two id ranks.
  int32_t explain_rank_positive = 0;
  int32_t explain_rank_negative = 0;
  // The likelihood ratio an explanation shows for each outcome: exp of the log above (the
  // score's own value, computed once here rather than per explained item).
  double shown_lr_positive = 1;
  double shown_lr_negative = 1;
};

// The fields of CompiledEvidence the scoring loop reads, packed apart from the rest
// (CompiledRuleSet::evidence_scores, same index): per candidate the loop then touches one
// 32-byte entry, aligned so that it never straddles two cache lines, where the 200-byte
// CompiledEvidence spreads them over three. A call with cold caches reads most of this
// array from memory (most items are candidates), so nothing only explanations need is
// here: those read CompiledEvidence for the few items they list.
// Derived once the evidence is complete (Compilation::BuildTriggerIndex).
struct alignas(32) EvidenceScore {
  ConditionId condition = -1;
  int32_t hypothesis = -1;
  int32_t group = -1;
  // When the condition is a single finding leaf with no onset range (most evidence): its
  // concept, whose value the engine then takes from the patient's facts on the concept
  // (TRUE if one is present, else FALSE if one is excluded, else unknown) without reading
  // the condition; -1 otherwise.
  int32_t finding_concept = -1;
  double log_lr_positive = 0;  // 0 exactly when the LR is 1 (the outcome moves nothing)
  double log_lr_negative = 0;
};
static_assert(sizeof(EvidenceScore) == 32, "one per half cache line");

// A concept index's "HPO|HP:nnnnnnn" entries keyed by term number (ontology/hpo_number.h):
// the same lists, in a table a patient's HPO codes are looked up in with one cache line
// each instead of a string hash map's three or four.
class HpoConceptIndex {
 public:
  // Files every key of `by_code` spelled "HPO|HP:" and seven digits under its number.
  void Build(const absl::flat_hash_map<std::string, std::vector<int32_t>>& by_code);
  // The concepts filed under HPO term `number` (possibly none), or nullopt when the index
  // has no such key.
  std::optional<absl::Span<const int32_t>> Find(int32_t number) const {
    const int32_t* value = map_.Find(number);
    if (value == nullptr) return std::nullopt;
    if (*value >= 0) return absl::Span<const int32_t>(value, 1);  // the one concept
    const size_t at = static_cast<size_t>(~*value);
    return absl::Span<const int32_t>(lists_.data() + at + 1, static_cast<size_t>(lists_[at]));
  }

 private:
  // >= 0: the key's one concept; otherwise ~(where its list starts in lists_).
  ontology::HpoNumberMap map_;
  std::vector<int32_t> lists_;  // per key of none or several concepts: the count, then them
};

// A fact a test's result makes known.
struct FactKey {
  enum class Kind : uint8_t { kConcept, kLab, kFamily };
  Kind kind;
  int32_t index;  // concept or lab index; 0 for family
};

// How often one fact is positive in each hypothesis that single-leaf evidence with a
// frequency weighs it in, and in the comparison population; with each Bernoulli's entropy
// (bits), so that the value of a test needs no logarithm of a rule set constant per call.
struct FactFrequencies {
  struct InHypothesis {
    int32_t hypothesis;
    double p;             // P(positive | hypothesis), from its strongest item on the fact
    double entropy_bits;  // of that Bernoulli
  };
  std::vector<InHypothesis> hypotheses;  // ascending hypothesis index; empty: none weighs it
  double p_comparison = 0;  // mean of those items' comparison frequencies
  double comparison_entropy_bits = 0;
};

// Entropy in bits of a Bernoulli(p): 0 at p = 0 or 1.
double BernoulliEntropyBits(double p);

// The fields a call reads (ranking, actions) come first, in the entry's first cache line;
// the text only responses and explanations need follows.
struct CompiledHypothesis {
  double pretest_probability = 0;
  std::optional<double> max_probability;
  // Position of `id` among the rule set's hypothesis ids in ascending order: ranks break
  // ties on it without comparing strings.
  int32_t id_rank = 0;
  int32_t group_count = 0;
  std::string id;
  std::string title;
  cds::v1::Code code;
  std::string detail;
  std::vector<int32_t> evidence;  // indices into CompiledRuleSet::evidence
  std::vector<cds::v1::Reference> references;
};

struct CompiledAction {
  cds::v1::SuggestionKind kind = cds::v1::TEST;
  cds::v1::Urgency urgency = cds::v1::INFO;
  int32_t priority = 0;
  ConditionId condition = -1;  // -1: fires whenever the test is informative
  double min_gain_bits = 0.01;
  // Position of `id` among the action ids in ascending order (suggestions that tie on
  // everything else are ordered on it without comparing strings).
  int32_t id_rank = 0;
  // What the test would reveal (empty for actions without an information value).
  std::vector<FactKey> reveals;
  std::string id;
  cds::v1::Code code;
  std::string title;
  std::string detail;
  std::vector<cds::v1::Reference> references;
  std::string source;
};

// An evidence item whose condition was decided for a patient: what scoring applies and
// explanations list. The engine builds them per call; the compiler precomputes those of
// demographic evidence (DemographicContext).
struct AppliedEvidence {
  int32_t evidence = -1;
  int32_t hypothesis = -1;    // the item's (copied: grouping by it reads no CompiledEvidence)
  // The outcome's CompiledEvidence::explain_rank_* (ExplainRank): set by whoever lists the
  // item in an explanation (the engine, or the compiler for a demographic context's items),
  // not by ApplyEvidence, so that scoring reads no CompiledEvidence.
  int32_t explain_rank = 0;
  bool matched = false;     // condition TRUE (else FALSE)
  bool superseded = false;  // a stronger item of its correlated group counts instead
  double log_lr = 0;
};

// Fills `item` as the applied item for evidence `e` (`ev`) whose condition was decided
// `matched`. Written field by field in place: a struct built on the stack and then copied
// into a vector is read back with one wide load over several narrow stores, which the CPU
// cannot forward (a stall on every applied item of every call).
inline void ApplyEvidence(int32_t e, const EvidenceScore& ev, bool matched,
                          AppliedEvidence& item) {
  item.evidence = e;
  item.hypothesis = ev.hypothesis;
  item.matched = matched;
  item.superseded = false;
  item.log_lr = matched ? ev.log_lr_positive : ev.log_lr_negative;
}

// Where an explanation lists the `matched` (or not) outcome of `ev` (AppliedEvidence).
inline int32_t ExplainRank(const CompiledEvidence& ev, bool matched) {
  return matched ? ev.explain_rank_positive : ev.explain_rank_negative;
}

// The order explanations list a hypothesis' items in: counted before superseded, then
// by explain_rank (|log LR| descending, then evidence id).
inline bool ExplainsBefore(const AppliedEvidence& x, const AppliedEvidence& y) {
  if (x.superseded != y.superseded) return !x.superseded;
  return x.explain_rank < y.explain_rank;
}

// A touched hypothesis of a demographic context: its items are
// DemographicContext::items[begin, end), in evidence order.
struct DemographicHypothesis {
  int32_t hypothesis = -1;
  uint32_t begin = 0;
  uint32_t end = 0;
  double weight = 0;  // pretest x exp(sum of its items' log LRs), summed in evidence order
};

// The folded demographic evidence for one (sex, age band): every item of it that applies
// to such a patient, already decided and capped within its correlated groups. The engine
// then evaluates only the evidence on the patient's other facts, so the per-copy sex/age
// evidence of a large rule set costs a walk over these arrays rather than condition
// evaluation and sorting.
struct DemographicContext {
  std::vector<AppliedEvidence> items;
  // Ascending hypothesis index: the hypotheses some folded item applies to.
  std::vector<DemographicHypothesis> hypotheses;
  // The uncapped ones among `hypotheses`, as positions into it, by weight descending then
  // id rank: their rank order whatever the normaliser (equal posteriors are re-sorted by id
  // rank at run time, since dividing can make different weights equal).
  std::vector<int32_t> order;
};

// Where an evidence item or action is listed in the trigger index.
struct RuleRef {
  enum class Kind : uint8_t { kEvidence, kAction };
  Kind kind;
  int32_t index;
};

// An action listed under a hypothesis: its condition cannot be TRUE unless a probability
// leaf on the hypothesis is, so it is worth evaluating only once the hypothesis ranks this
// well (at_least 0 and in_top 0: whenever the ranking reaches the hypothesis).
struct ProbabilityTrigger {
  int32_t action;
  double at_least;  // posterior the leaf needs
  int32_t in_top;   // 0: any rank; otherwise the 0-based rank must be below it
};

struct CompiledRuleSet {
  std::string name;
  std::string version;
  std::string digest;  // "sha256:<hex>"
  cds::v1::RuleSet definition;  // as authored
  cds::v1::RuleSetTests tests;  // embedded test cases (may be empty)
  std::string disclaimer;
  double min_probability_to_show = 0.01;

  std::vector<CompiledConcept> concepts;
  std::vector<CompiledLab> labs;
  // Per percentage lab, the labs derived from it.
  std::vector<std::vector<CompiledDerivation>> derivations_by_percent_lab;
  std::vector<CompiledHypothesis> hypotheses;
  // Numbered hypothesis by hypothesis: the evidence of one hypothesis is contiguous and in
  // ascending order (the engine relies on it to group applied evidence without sorting).
  std::vector<CompiledEvidence> evidence;
  std::vector<EvidenceScore> evidence_scores;  // evidence[i]'s scoring fields, packed
  std::vector<CompiledAction> actions;
  std::vector<CompiledCondition> conditions;

  // The ontology the concepts were expanded with (null when codes match exactly).
  std::shared_ptr<const ontology::Ontology> ontology;
  // CodeKey -> concepts a PRESENT finding with this code matches (the concept's codes, and
  // with an ontology their descendants and those terms' alternative and obsolete ids).
  absl::flat_hash_map<std::string, std::vector<int32_t>> concepts_by_code;
  // CodeKey -> concepts an EXCLUDED finding with this code rules out (the concept's codes,
  // and with an ontology their ancestors and aliases).
  absl::flat_hash_map<std::string, std::vector<int32_t>> concepts_by_excluded_code;
  // Their HPO entries by term number (what the engine looks a patient's HPO codes up in).
  HpoConceptIndex concepts_by_hpo;
  HpoConceptIndex excluded_concepts_by_hpo;
  // CodeKey of an assay -> lab index.
  absl::flat_hash_map<std::string, int32_t> labs_by_code;

  // Trigger index: the rules to evaluate when a fact of this kind is known.
  std::vector<std::vector<RuleRef>> rules_by_concept;     // per concept
  std::vector<std::vector<RuleRef>> rules_by_lab;         // per lab
  std::vector<std::vector<ProbabilityTrigger>> actions_by_hypothesis;  // per hypothesis
  // Walking the ranking for actions_by_hypothesis can stop at the first hypothesis at a rank
  // >= max_in_top whose posterior is below trigger_floor: no trigger holds there or further
  // down (posteriors only fall along the ranking). trigger_floor is the least at_least of
  // the triggers without in_top (+inf when none).
  double trigger_floor = std::numeric_limits<double>::infinity();
  std::vector<RuleRef> rules_on_sex;
  std::vector<RuleRef> rules_on_age;
  // What the engine evaluates when sex / age / family history / consanguinity is known:
  // the lists above (which say what the rule set weighs) without the folded demographic
  // evidence (see demographic_contexts) and without the actions that cannot be TRUE
  // unless some other fact is known (those are listed under that fact only).
  std::vector<RuleRef> candidates_on_sex;
  std::vector<RuleRef> candidates_on_age;
  std::vector<RuleRef> candidates_on_family;
  std::vector<RuleRef> candidates_on_consanguinity;
  std::vector<RuleRef> rules_on_family;         // family history taken
  std::vector<RuleRef> rules_on_consanguinity;  // consanguinity recorded
  // Labs some evidence item weighs, ascending (warned about when the patient has none).
  std::vector<int32_t> labs_weighed_by_evidence;
  // Actions with an information value: always considered, since their point is missing data.
  std::vector<int32_t> information_actions;
  // What learning each fact would tell, from the evidence whose whole condition is one leaf
  // on it (the items a test's result would decide): for the value of tests.
  std::vector<FactFrequencies> frequencies_by_concept;
  std::vector<FactFrequencies> frequencies_by_lab;
  FactFrequencies frequencies_on_family;
  const FactFrequencies& FrequenciesOn(const FactKey& key) const {
    switch (key.kind) {
      case FactKey::Kind::kConcept: return frequencies_by_concept[key.index];
      case FactKey::Kind::kLab: return frequencies_by_lab[key.index];
      case FactKey::Kind::kFamily: break;
    }
    return frequencies_on_family;
  }
  // Per hypothesis, the information actions whose result would move it.
  std::vector<std::vector<int32_t>> information_actions_by_hypothesis;
  // Hypotheses by pretest probability (descending, then id): the order of every hypothesis
  // no evidence touched, so ranking needs no sort over the whole rule set.
  std::vector<int32_t> hypotheses_by_pretest;
  double pretest_sum = 0;
  // The largest `in_top` of any probability condition (how deep ranks must be known).
  int32_t max_in_top = 0;
  // The most correlated-evidence groups of any hypothesis (the engine's per-group scratch).
  int32_t max_group_count = 0;

  // Folded demographic evidence (FoldDemographicEvidence): an item is folded when its
  // condition has only sex and age leaves and every item of its correlated group (if any)
  // is folded too, so its truth, its group capping and its hypothesis' demographic weight
  // depend on the (sex, age band) alone. Empty when nothing is folded.
  // Sex slots: 0 unknown, 1 + i for demographic_sexes[i], then one for any other value.
  std::vector<int32_t> demographic_sexes;
  // Every bound of a folded age leaf, ascending: age band i + 1 is
  // [demographic_age_bounds[i], demographic_age_bounds[i + 1]); band 0 below the first;
  // one more slot for unknown age.
  std::vector<double> demographic_age_bounds;
  // Per (sex slot x age slot), an index into demographic_contexts (identical contexts are
  // shared).
  std::vector<int32_t> demographic_context_of;
  std::vector<DemographicContext> demographic_contexts;
  // The context of a patient's sex and age (age NaN when unknown); null when nothing is
  // folded.
  const DemographicContext* DemographicContextFor(int32_t sex, double age_days) const;

  // The constant parts of responses in wire format (BuildWireFragments), for the engine's
  // wire renderer.
  WireFragments wire;
};

// Folds the demographic evidence of a compiled rule set (see
// CompiledRuleSet::demographic_contexts) and takes it out of candidates_on_sex and
// candidates_on_age. Run by the compiler once the rule set has no errors.
// REQUIRES: the trigger index is built.
void FoldDemographicEvidence(CompiledRuleSet* rs);

}  // namespace cds::compiler
