#include "server/engine/engine.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "server/common/status_macros.h"
#include "server/engine/patient_check.h"
#include "server/ontology/hpo_number.h"

namespace cds::engine {

// Writes an Evaluation (evaluation.h) as the evaluation proceeds: the engine's side of it.
class EvaluationBuilder {
 public:
  using Item = Evaluation::Item;
  using Entry = Evaluation::Entry;
  using Description = Evaluation::Description;

  explicit EvaluationBuilder(Evaluation* out) : e_(*out) {}

  void Reset(const compiler::CompiledRuleSet& rs, const cds::v1::Patient& patient) {
    e_.Reset(rs, patient);
  }

  // Appends to the evaluation's text; returns where the appended text begins.
  template <typename... Args>
  uint32_t Append(const Args&... args) {
    const uint32_t begin = static_cast<uint32_t>(e_.text_.size());
    absl::StrAppend(&e_.text_, args...);
    return begin;
  }
  std::string* text() { return &e_.text_; }
  uint32_t text_size() const { return static_cast<uint32_t>(e_.text_.size()); }

  // A warning whose field is the text from `field_begin` to `message_begin`, and whose
  // message is the rest.
  void AddWarning(cds::v1::Warning::Kind kind, uint32_t field_begin, uint32_t message_begin) {
    Evaluation::Warning& w = e_.warnings_.emplace_back();
    w.kind = kind;
    w.field.begin = field_begin;
    w.field.end = w.message.begin = message_begin;
    w.message.end = text_size();
  }
  // A warning whose field and message are strings that outlive the evaluation (the rule
  // set's, or constants): referred to, not copied.
  void AddWarning(cds::v1::Warning::Kind kind, const std::string* field,
                  const std::string* message) {
    Evaluation::Warning& w = e_.warnings_.emplace_back();
    w.kind = kind;
    w.field.rule_set_string = field;
    w.message.rule_set_string = message;
  }

  Entry& AddEntry() {
    Entry& entry = e_.entries_.emplace_back();
    entry.items_begin = entry.items_end = static_cast<uint32_t>(e_.items_.size());
    return entry;
  }
  Entry& entry() { return e_.entries_.back(); }
  // An item of the last entry.
  Item& AddItem() {
    Item& item = e_.items_.emplace_back();
    item.pieces_begin = item.pieces_end = static_cast<uint32_t>(e_.pieces_.size());
    item.codes_begin = item.codes_end = static_cast<uint32_t>(e_.codes_.size());
    e_.entries_.back().items_end = static_cast<uint32_t>(e_.items_.size());
    return item;
  }
  size_t items_of_entry() const {
    const Entry& entry = e_.entries_.back();
    return entry.items_end - entry.items_begin;
  }
  Item& first_item_of_entry() { return e_.items_[e_.entries_.back().items_begin]; }
  // A piece of the last item's description: a string of the rule set (kept by reference)
  // or one that lives only as long as this call's scratch (copied).
  void AddPiece(const std::string* piece, bool rule_set_string) {
    Evaluation::Piece p;
    if (rule_set_string) {
      p.rule_set_string = piece;
    } else {
      p.begin = Append(*piece);
      p.end = text_size();
    }
    e_.pieces_.push_back(p);
    e_.items_.back().pieces_end = static_cast<uint32_t>(e_.pieces_.size());
  }
  // Patient finding indices matched by `item` (sorted, unique).
  void SetCodes(Item& item, const std::vector<int>& finding_indices) {
    item.codes_begin = static_cast<uint32_t>(e_.codes_.size());
    e_.codes_.insert(e_.codes_.end(), finding_indices.begin(), finding_indices.end());
    item.codes_end = static_cast<uint32_t>(e_.codes_.size());
  }

 private:
  Evaluation& e_;
};

namespace {

using compiler::CompiledCondition;
using compiler::CompiledRuleSet;
using compiler::ConditionId;
using compiler::RuleRef;
using cds::v1::Finding;
using cds::v1::Relative;

constexpr double kNan = std::numeric_limits<double>::quiet_NaN();

// Three-valued (Kleene) truth.
using Tri = compiler::Truth;

struct FindingFact {
  Finding::Status status;
  double onset_days;  // NaN when unknown
  int index;          // into patient.findings
  int32_t next;       // next fact on the same concept, or -1
};

struct LabFact {
  double value;     // in the lab's canonical unit
  double age_days;  // NaN when unknown
  std::optional<double> lower;  // the reporting lab's own range, canonical unit
  std::optional<double> upper;
  int index;  // into patient.measurements
  int32_t next = -1;  // next fact on the same lab, or -1
};

// One applied evidence item, for scoring and explanation.
using Applied = compiler::AppliedEvidence;

// Where a touched hypothesis' applied items are.
enum class ItemSource : uint8_t {
  kApplied,  // Scratch::applied: evaluated this call
  kBoth,     // evaluated this call and folded into the demographic context
  kContext,  // the demographic context's items: folded only
};

// The value of a test's result for the current differential.
struct InformationValue {
  double gain_bits = 0;
  int32_t lead = -1;  // leading hypothesis
  double lead_now = 0;
  double lead_if_positive = 0;
  double lead_if_negative = 0;
};

// A touched hypothesis with its ranking key.
struct RankKey {
  double posterior;
  int32_t id_rank;
  int32_t hypothesis;
};

// Per-thread working memory, reused by every call on the thread: arrays indexed by the
// rule set's dense ids (concepts, labs, conditions, evidence, actions, hypotheses), each
// entry valid only while its stamp equals the current call's epoch. Nothing is cleared or
// hashed per call, and once the arrays have grown to the largest rule set seen, nothing is
// allocated for them either; the work per call follows the patient's record.
struct Scratch {
  // Starts a call against `rs`: grows the arrays and moves to a new epoch.
  void Begin(const CompiledRuleSet& rs) {
    Grow(&concept_stamp, rs.concepts.size());
    Grow(&concept_head, rs.concepts.size());
    Grow(&concept_tail, rs.concepts.size());
    Grow(&concept_presence, rs.concepts.size());
    Grow(&family_concept_stamp, rs.concepts.size());
    Grow(&lab_stamp, rs.labs.size());
    Grow(&lab_head, rs.labs.size());
    Grow(&lab_tail, rs.labs.size());
    Grow(&evidence_bits, (rs.evidence.size() + 63) / 64);
    Grow(&action_bits, (rs.actions.size() + 63) / 64);
    Grow(&value_stamp, rs.actions.size());
    Grow(&information_stamp, rs.actions.size());
    Grow(&values, rs.actions.size());
    Grow(&hypothesis_stamp, rs.hypotheses.size());
    Grow(&weight, rs.hypotheses.size());
    Grow(&range_begin, rs.hypotheses.size());
    Grow(&range_end, rs.hypotheses.size());
    Grow(&range_source, rs.hypotheses.size());
    Grow(&context_begin, rs.hypotheses.size());
    Grow(&context_end, rs.hypotheses.size());
    Grow(&group_stamp, static_cast<size_t>(rs.max_group_count));
    Grow(&group_best, static_cast<size_t>(rs.max_group_count));
    Grow(&condition_stamp, rs.conditions.size());
    Grow(&condition_value, rs.conditions.size());
    Grow(&detail_stamp, rs.conditions.size());
    Grow(&detail, rs.conditions.size());
    Grow(&detail_truth, rs.conditions.size());
    NextEpoch(&epoch, {&concept_stamp, &family_concept_stamp, &lab_stamp, &value_stamp,
                       &information_stamp, &hypothesis_stamp, &detail_stamp});
    NewMemo();
    finding_facts.clear();
    lab_facts.clear();
    relative_hits.clear();
    relative_hit_end.clear();
    concepts_present.clear();
    labs_present.clear();
    evidence_candidates.clear();
    action_candidates.clear();
    applied.clear();
    touched.clear();
    ranked.clear();
    information_candidates.clear();
    fired.clear();
  }
  // Forgets memoised condition values (once the scores exist, probability leaves change).
  void NewMemo() { NextEpoch(&memo_epoch, {&condition_stamp}); }
  void NewGroups() { NextEpoch(&group_epoch, {&group_stamp}); }

  bool HasConcept(int32_t c) const { return concept_stamp[c] == epoch; }
  bool HasLab(int32_t l) const { return lab_stamp[l] == epoch; }

  void AddFinding(int32_t c, FindingFact fact) {
    const int32_t i = static_cast<int32_t>(finding_facts.size());
    fact.next = -1;
    finding_facts.push_back(fact);
    if (concept_stamp[c] != epoch) {
      concept_stamp[c] = epoch;
      concept_head[c] = i;
      concept_presence[c] = Tri::kUnknown;
      concepts_present.push_back(c);
    } else {
      finding_facts[concept_tail[c]].next = i;
    }
    concept_tail[c] = i;
    // What a finding leaf with any onset makes of the concept's facts (EvalFinding).
    if (fact.status == Finding::PRESENT) {
      concept_presence[c] = Tri::kTrue;
    } else if (fact.status == Finding::EXCLUDED && concept_presence[c] != Tri::kTrue) {
      concept_presence[c] = Tri::kFalse;
    }
  }
  void AddLab(int32_t l, LabFact fact) {
    const int32_t i = static_cast<int32_t>(lab_facts.size());
    fact.next = -1;
    lab_facts.push_back(fact);
    if (lab_stamp[l] != epoch) {
      lab_stamp[l] = epoch;
      lab_head[l] = i;
      labs_present.push_back(l);
    } else {
      lab_facts[lab_tail[l]].next = i;
    }
    lab_tail[l] = i;
  }

  static void SetBit(std::vector<uint64_t>& bits, int32_t i) {
    bits[static_cast<size_t>(i) >> 6] |= uint64_t{1} << (i & 63);
  }
  // Appends the set bits' indices in ascending order to `out` and clears them.
  static void TakeBits(std::vector<uint64_t>& bits, size_t count, std::vector<int32_t>* out) {
    for (size_t w = 0; w < (count + 63) / 64; ++w) {
      uint64_t word = bits[w];
      if (word == 0) continue;
      bits[w] = 0;
      while (word != 0) {
        out->push_back(static_cast<int32_t>(w * 64 + static_cast<size_t>(__builtin_ctzll(word))));
        word &= word - 1;
      }
    }
  }

  template <typename T>
  static void Grow(std::vector<T>* v, size_t n) {
    if (v->size() < n) v->resize(n, T{});
  }
  // Advances an epoch; on wrap-around clears the stamps it guards (0 is never an epoch).
  static void NextEpoch(uint32_t* e, std::initializer_list<std::vector<uint32_t>*> stamps) {
    if (++*e == 0) {
      for (auto* s : stamps) std::fill(s->begin(), s->end(), 0);
      *e = 1;
    }
  }

  uint32_t epoch = 0;
  uint32_t memo_epoch = 0;
  std::vector<uint32_t> concept_stamp, lab_stamp;
  std::vector<int32_t> concept_head, concept_tail, lab_head, lab_tail;
  std::vector<Tri> concept_presence;  // valid where concept_stamp is (Facts::Presence)
  std::vector<FindingFact> finding_facts;
  std::vector<LabFact> lab_facts;
  std::vector<int32_t> concepts_present, labs_present;  // in order of first fact
  // Family history: per relative (in order), the concept lists its condition codes match,
  // relative_hits[relative_hit_end[r - 1], relative_hit_end[r]); and which concepts any
  // relative has. Looked up once per call rather than once per family condition.
  std::vector<const std::vector<int32_t>*> relative_hits;
  std::vector<uint32_t> relative_hit_end;
  std::vector<uint32_t> family_concept_stamp;
  // Candidate evidence and actions as bit sets: adding is idempotent, and reading them out
  // (TakeBits) lists them in ascending order without sorting, and clears them.
  std::vector<uint64_t> evidence_bits, action_bits;
  std::vector<int32_t> evidence_candidates, action_candidates;
  // Per hypothesis touched by evidence: its weight, its items in `applied` [range_begin,
  // range_end) and in the demographic context's [context_begin, context_end).
  std::vector<uint32_t> hypothesis_stamp;
  std::vector<double> weight;
  std::vector<uint32_t> range_begin, range_end, context_begin, context_end;
  std::vector<ItemSource> range_source;
  std::vector<Applied> applied;
  // Scores' current run of the demographic context's ranking.
  std::vector<int32_t> folded_ranked;
  // Per correlated group of the hypothesis being scored: the applied index of its strongest
  // item so far, valid where group_stamp is group_epoch (advanced per hypothesis).
  uint32_t group_epoch = 0;
  std::vector<uint32_t> group_stamp;
  std::vector<uint32_t> group_best;
  std::vector<int32_t> touched, ranked;
  std::vector<RankKey> keyed;
  // Memoised condition values and lab descriptions.
  std::vector<uint32_t> condition_stamp;
  std::vector<Tri> condition_value;
  std::vector<uint32_t> detail_stamp;
  std::vector<std::string> detail;  // capacity kept between calls
  std::vector<Tri> detail_truth;
  // Information values of tests.
  std::vector<int32_t> information_candidates, fired;
  std::vector<uint32_t> information_stamp;  // per action: listed in information_candidates
  std::vector<uint32_t> value_stamp;
  std::vector<InformationValue> values;
  // ValueOfTest's working arrays.
  std::vector<int32_t> value_classes;
  std::vector<const compiler::FactFrequencies*> value_facts;
  std::vector<double> value_p_positive, value_entropy, value_belief, value_likes;
  // Explanations.
  std::vector<const std::string*> reasons;
  std::vector<int> finding_indices;
  std::vector<Applied> items;
  std::vector<std::pair<int32_t, LabFact>> derived;
};

Scratch& ThreadScratch() {
  thread_local Scratch scratch;
  return scratch;
}

// What the patient record says, resolved against one rule set. Built per request in the
// thread's scratch; sizes follow the patient's record, not the rule set.
struct Facts {
  const cds::v1::Patient* patient = nullptr;
  cds::v1::Sex sex = cds::v1::UNKNOWN_SEX;
  double age_days = kNan;
  Scratch* scratch = nullptr;
  const cds::v1::FamilyHistory* family = nullptr;  // null when no history was taken
  // Set once the diagnoses are scored; read by probability conditions.
  const class Scores* scores = nullptr;

  bool HasFindings(int32_t c) const { return scratch->HasConcept(c); }
  bool HasLabs(int32_t l) const { return scratch->HasLab(l); }
  // First fact on a concept or lab (-1: none); follow FindingFact::next / LabFact::next.
  int32_t FirstFinding(int32_t c) const { return HasFindings(c) ? scratch->concept_head[c] : -1; }
  // The value of a finding leaf on concept `c` with no onset range (EvidenceScore::
  // finding_concept), kept as the facts are added.
  Tri Presence(int32_t c) const {
    return HasFindings(c) ? scratch->concept_presence[c] : Tri::kUnknown;
  }
  int32_t FirstLab(int32_t l) const { return HasLabs(l) ? scratch->lab_head[l] : -1; }
  const FindingFact& finding(int32_t i) const { return scratch->finding_facts[i]; }
  const LabFact& lab(int32_t i) const { return scratch->lab_facts[i]; }
};

// Posterior probabilities over the differential {hypotheses, none of these}. Only the
// hypotheses that evidence moved for this patient are stored: every other one keeps its
// pretest weight, and they rank in the compiler's pretest order, so the work follows the
// patient's findings rather than the size of the rule set.
class Scores {
 public:
  // Every touched hypothesis has its `weight` and stamp set; the scratch's `touched` lists
  // those to rank here, in any order, and `context` (may be null) ranks the others: the
  // uncapped ones only folded evidence touched (range_source kContext), in its `order`.
  // `total` is 1 + the sum over all touched hypotheses of (weight - pretest). On return
  // `touched` lists its hypotheses in rank order. The full ranking is merged lazily from
  // three ordered streams (these, the context's, the untouched by pretest) as far as it is
  // read, so a call that reads the first few ranks does not walk every folded hypothesis.
  Scores(const CompiledRuleSet& rs, Scratch& scratch, double total,
         const compiler::DemographicContext* context)
      : rs_(rs), s_(scratch), total_(total), context_(context) {
    // Sorted on keys computed once per hypothesis (posterior, then the id's rank).
    auto& keyed = s_.keyed;
    keyed.clear();
    for (int32_t h : s_.touched) keyed.push_back({Posterior(h), rs_.hypotheses[h].id_rank, h});
    std::sort(keyed.begin(), keyed.end(), [](const RankKey& a, const RankKey& b) {
      if (a.posterior != b.posterior) return a.posterior > b.posterior;
      return a.id_rank < b.id_rank;
    });
    for (size_t i = 0; i < keyed.size(); ++i) s_.touched[i] = keyed[i].hypothesis;
    s_.folded_ranked.clear();
  }

  // Uncapped probability of `h` (the belief the value of tests is computed over).
  double Belief(int32_t h) const {
    return (Touched(h) ? s_.weight[h] : rs_.hypotheses[h].pretest_probability) / total_;
  }
  double NoneBelief() const { return std::max(0.0, 1.0 - rs_.pretest_sum) / total_; }
  // Probability shown and tested: capped by the hypothesis' ceiling, if any.
  double Posterior(int32_t h) const {
    const double p = Belief(h);
    const auto& cap = rs_.hypotheses[h].max_probability;
    return cap ? std::min(p, *cap) : p;
  }
  bool Touched(int32_t h) const { return s_.hypothesis_stamp[h] == s_.epoch; }

  // The first `count` hypotheses in rank order (posterior descending, then id).
  const std::vector<int32_t>& Top(size_t count) const {
    const size_t n = rs_.hypotheses.size();
    std::vector<int32_t>& ranked = s_.ranked;
    const std::vector<int32_t>& touched = s_.touched;
    const std::vector<int32_t>& by_pretest = rs_.hypotheses_by_pretest;
    while (ranked.size() < std::min(count, n)) {
      while (next_untouched_ < by_pretest.size() && Touched(by_pretest[next_untouched_])) {
        ++next_untouched_;
      }
      // The next of the three streams' heads (Before is a total order).
      int32_t best = -1;
      size_t* advance = nullptr;
      auto consider = [&](int32_t h, size_t* next) {
        if (h >= 0 && (best < 0 || Before(h, best))) {
          best = h;
          advance = next;
        }
      };
      consider(next_touched_ < touched.size() ? touched[next_touched_] : -1, &next_touched_);
      consider(FoldedHead(), &next_folded_);
      consider(next_untouched_ < by_pretest.size() ? by_pretest[next_untouched_] : -1,
               &next_untouched_);
      ++*advance;
      ranked.push_back(best);
    }
    return ranked;
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
    return rs_.hypotheses[a].id_rank < rs_.hypotheses[b].id_rank;
  }

  // The next hypothesis of the context's stream (-1: none left). The compiler's order
  // (weight descending, then id rank) is the posterior order but for weights that the
  // division makes equal: each run of equal posteriors is read whole and re-sorted by id.
  int32_t FoldedHead() const {
    std::vector<int32_t>& run = s_.folded_ranked;
    if (next_folded_ < run.size()) return run[next_folded_];
    run.clear();
    next_folded_ = 0;
    if (context_ == nullptr) return -1;
    const std::vector<int32_t>& order = context_->order;
    double run_posterior = 0;
    for (; next_context_ < order.size(); ++next_context_) {
      const int32_t h = context_->hypotheses[order[next_context_]].hypothesis;
      if (s_.range_source[h] != ItemSource::kContext) continue;  // ranked with `touched`
      const double posterior = Posterior(h);
      if (!run.empty() && posterior != run_posterior) break;
      run.push_back(h);
      run_posterior = posterior;
    }
    auto by_id = [&](int32_t a, int32_t b) {
      return rs_.hypotheses[a].id_rank < rs_.hypotheses[b].id_rank;
    };
    if (run.size() > 1 && !std::is_sorted(run.begin(), run.end(), by_id)) {
      std::sort(run.begin(), run.end(), by_id);
    }
    return run.empty() ? -1 : run[0];
  }

  const CompiledRuleSet& rs_;
  Scratch& s_;
  const double total_;
  const compiler::DemographicContext* const context_;
  // Where each stream of the lazily merged ranking (into s_.ranked) has got to; the
  // context's current run of equal posteriors is s_.folded_ranked.
  mutable size_t next_touched_ = 0;
  mutable size_t next_untouched_ = 0;
  mutable size_t next_context_ = 0;  // into context_->order
  mutable size_t next_folded_ = 0;   // into s_.folded_ranked
};
std::string Fmt(double v) { return absl::StrFormat("%.3g", v); }


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
  Evaluator(const CompiledRuleSet& rs, const Facts& facts)
      : rs_(rs), facts_(facts), s_(*facts.scratch) {}

  // Memoised per call: a condition shared by several rules, or reached again when
  // explaining, is evaluated once (Scratch::NewMemo forgets the values once scores exist).
  // The memo check inlines at every call site; only a miss calls the (large) evaluation.
  Tri Eval(ConditionId id) const {
    if (s_.condition_stamp[id] == s_.memo_epoch) return s_.condition_value[id];
    return ComputeAndMemo(id);
  }

  // Leaves that hold (outside any `not`), with the patient codes they matched: the reasons
  // shown for an action or a matched evidence item. The strings live in the rule set or
  // the scratch until the next call. With `reasons` null, only the codes (what a compact
  // explanation shows): no lab description is built.
  void CollectReasons(ConditionId id, std::vector<const std::string*>* reasons,
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
        if (reasons != nullptr) reasons->push_back(&c.description);
        return;
      case K::kFinding:
        if (EvalFinding(c, finding_indices) == Tri::kTrue && reasons != nullptr) {
          reasons->push_back(&c.description);
        }
        return;
      case K::kLab:
        if (reasons != nullptr && LabDetail(id) == Tri::kTrue) reasons->push_back(&s_.detail[id]);
        return;
      default:
        if (reasons != nullptr && Eval(id) == Tri::kTrue) reasons->push_back(&c.description);
        return;
    }
  }

  // The patient's codes that made a finding leaf (anywhere under `id`) TRUE or FALSE.
  void CollectFindingCodes(ConditionId id, std::vector<int>* finding_indices) const {
    const CompiledCondition& c = rs_.conditions[id];
    if (c.kind == CompiledCondition::Kind::kFinding) {
      for (int32_t i = facts_.FirstFinding(c.ref); i >= 0; i = facts_.finding(i).next) {
        const FindingFact& f = facts_.finding(i);
        if (f.status != Finding::UNKNOWN) finding_indices->push_back(f.index);
      }
      return;
    }
    for (ConditionId child : c.children) CollectFindingCodes(child, finding_indices);
  }

  // Describes the deciding measurement of each lab leaf under `id` that had data, e.g.
  // "Total IgE 850 [IU]/mL > 13 (upper limit for age 13)".
  void CollectLabDetails(ConditionId id, std::vector<const std::string*>* details) const {
    const CompiledCondition& c = rs_.conditions[id];
    if (c.kind == CompiledCondition::Kind::kLab) {
      if (LabDetail(id) != Tri::kUnknown) details->push_back(&s_.detail[id]);
      return;
    }
    for (ConditionId child : c.children) CollectLabDetails(child, details);
  }

 private:
  __attribute__((noinline)) Tri ComputeAndMemo(ConditionId id) const {
    const Tri t = Compute(id);
    s_.condition_stamp[id] = s_.memo_epoch;
    s_.condition_value[id] = t;
    return t;
  }

  Tri Compute(ConditionId id) const {
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
      case K::kAll:
      case K::kAny:
      case K::kNot:
      case K::kAtLeast:
        return compiler::CombineChildren(c, [this](ConditionId child) { return Eval(child); });
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

  Tri EvalFinding(const CompiledCondition& c, std::vector<int>* matched) const {
    int32_t i = facts_.FirstFinding(c.ref);
    if (i < 0) return Tri::kUnknown;
    const bool any_onset = c.ages.unbounded();
    bool truth = false;
    bool unknown = false;
    bool falsity = false;
    for (; i >= 0; i = facts_.finding(i).next) {
      const FindingFact& f = facts_.finding(i);
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

  // EvalLab with its description in s_.detail[id], built once per call.
  Tri LabDetail(ConditionId id) const {
    if (s_.detail_stamp[id] != s_.epoch) {
      s_.detail_truth[id] = EvalLab(rs_.conditions[id], &s_.detail[id]);
      s_.detail_stamp[id] = s_.epoch;
    }
    return s_.detail_truth[id];
  }

  Tri EvalLab(const CompiledCondition& c, std::string* detail) const {
    int32_t i = facts_.FirstLab(c.ref);
    if (i < 0) return Tri::kUnknown;
    const compiler::CompiledLab& lab = rs_.labs[c.ref];
    // The latest measurement taken at an age the condition accepts.
    const LabFact* latest = nullptr;
    for (; i >= 0; i = facts_.lab(i).next) {
      const LabFact& fact = facts_.lab(i);
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
    std::optional<double> limit;
    const bool upper = c.lab_threshold == T::kAboveUpperTimes;
    if (c.lab_threshold == T::kAboveUpperTimes || c.lab_threshold == T::kBelowLowerTimes) {
      limit = Limit(lab, *latest, upper);
      if (!limit) return Tri::kUnknown;
      threshold = c.value * *limit;
    }
    const bool above = c.lab_threshold == T::kAboveUpperTimes || c.lab_threshold == T::kAbove;
    const bool holds = above ? latest->value > threshold : latest->value < threshold;
    if (detail != nullptr) {
      detail->clear();
      absl::StrAppend(detail, lab.label, " ", Fmt(latest->value), " ", lab.canonical_unit,
                      holds ? (above ? " > " : " < ") : (above ? " <= " : " >= "),
                      Fmt(threshold));
      if (limit) {
        absl::StrAppend(detail, " (", upper ? "upper" : "lower", " limit for age ", Fmt(*limit),
                        ")");
      }
    }
    return holds ? Tri::kTrue : Tri::kFalse;
  }

  Tri EvalFamily(const CompiledCondition& c) const {
    if (facts_.family == nullptr) return Tri::kUnknown;
    int count = 0;
    if (!c.family_or_died_in_infancy &&
        (c.ref < 0 || s_.family_concept_stamp[c.ref] != s_.epoch)) {
      return count >= c.count ? Tri::kTrue : Tri::kFalse;  // no relative can count
    }
    for (int r = 0; r < facts_.family->relatives_size(); ++r) {
      const Relative& relative = facts_.family->relatives(r);
      if (c.family_line == cds::v1::FamilyHistoryCondition::MATERNAL_X_LINE &&
          !OnMaternalXLine(relative.relationship())) {
        continue;
      }
      if (c.family_sex != cds::v1::SEX_UNSPECIFIED && RelativeSex(relative) != c.family_sex) {
        continue;
      }
      bool affected = c.family_or_died_in_infancy && relative.died_in_infancy();
      if (!affected && c.ref >= 0) {
        const uint32_t begin = r == 0 ? 0 : s_.relative_hit_end[r - 1];
        for (uint32_t i = begin; i < s_.relative_hit_end[r]; ++i) {
          const std::vector<int32_t>& hit = *s_.relative_hits[i];
          if (std::find(hit.begin(), hit.end(), c.ref) != hit.end()) {
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
  Scratch& s_;
};
// A patient code's lookup key (CodeKey of its normalised system), built without allocating
// in the usual case: the system is already canonical and the key fits the buffer.
class CodeKeyBuffer {
 public:
  CodeKeyBuffer(const std::string& system, const std::string& code) {
    if (compiler::IsCanonicalSystem(system)) {
      system_ = system;
    } else {
      normalized_ = compiler::NormalizeSystem(system, code);
      system_ = normalized_;
    }
    const size_t size = system_.size() + 1 + code.size();
    if (size <= sizeof(buffer_)) {
      std::memcpy(buffer_, system_.data(), system_.size());
      buffer_[system_.size()] = '|';
      std::memcpy(buffer_ + system_.size() + 1, code.data(), code.size());
      key_ = absl::string_view(buffer_, size);
    } else {
      long_key_ = compiler::CodeKey(std::string(system_), code);
      key_ = long_key_;
    }
  }
  CodeKeyBuffer(const CodeKeyBuffer&) = delete;
  CodeKeyBuffer& operator=(const CodeKeyBuffer&) = delete;

  absl::string_view key() const { return key_; }
  absl::string_view system() const { return system_; }

 private:
  char buffer_[96];
  std::string normalized_;
  std::string long_key_;
  absl::string_view system_;
  absl::string_view key_;
};


// Resolves the patient's record against the rule set, adding warnings for what it
// cannot use.
Facts BuildFacts(const CompiledRuleSet& rs, const cds::v1::Patient& patient, Scratch& scratch,
                 EvaluationBuilder& out) {
  Facts facts;
  facts.patient = &patient;
  facts.scratch = &scratch;
  facts.sex = patient.sex() == cds::v1::OTHER_SEX ? cds::v1::OTHER_SEX : patient.sex();
  const compiler::AgeDays age = compiler::ToDays(patient.age());
  if (age.set) facts.age_days = age.days;
  if (patient.has_family_history()) {
    facts.family = &patient.family_history();
    for (const Relative& relative : facts.family->relatives()) {
      for (const cds::v1::Code& code : relative.conditions()) {
        const CodeKeyBuffer key(code.system(), code.code());
        auto hit = rs.concepts_by_code.find(key.key());
        if (hit == rs.concepts_by_code.end()) continue;
        scratch.relative_hits.push_back(&hit->second);
        for (int32_t c : hit->second) scratch.family_concept_stamp[c] = scratch.epoch;
      }
      scratch.relative_hit_end.push_back(static_cast<uint32_t>(scratch.relative_hits.size()));
    }
  }

  for (int i = 0; i < patient.findings_size(); ++i) {
    const Finding& f = patient.findings(i);
    if (f.status() == Finding::UNKNOWN) continue;
    const CodeKeyBuffer code_key(f.term().system(), f.term().code());
    // HPO codes (most of a patient's) by term number; the others by key.
    const int32_t hpo = code_key.system() == "HPO" ? ontology::HpoNumber(f.term().code()) : -1;
    auto concepts_of = [&](bool excluded) -> std::optional<absl::Span<const int32_t>> {
      if (hpo >= 0) return (excluded ? rs.excluded_concepts_by_hpo : rs.concepts_by_hpo).Find(hpo);
      const auto& index = excluded ? rs.concepts_by_excluded_code : rs.concepts_by_code;
      auto it = index.find(code_key.key());
      if (it == index.end()) return std::nullopt;
      return absl::Span<const int32_t>(it->second);
    };
    const std::optional<absl::Span<const int32_t>> concepts =
        concepts_of(f.status() == Finding::EXCLUDED);
    if (rs.ontology != nullptr && code_key.system() == "HPO") {
      // With an ontology, only ids it does not know are worth a warning: a known term that
      // no rule uses is simply not evidence for this differential. Every HPO code in the
      // indexes came from the ontology (the compiler indexes HPO codes through it), so
      // only a code they lack needs the ontology's answer.
      if (!concepts.has_value()) {
        if (!rs.ontology->Knows(f.term().code())) {
          const uint32_t field = out.Append("patient.findings[", i, "].term");
          const uint32_t message =
              out.Append("code ", f.term().code(), " is not in ontology release ",
                         rs.ontology->release(), "; it did not affect the result");
          out.AddWarning(cds::v1::Warning::UNKNOWN_CODE, field, message);
        }
        continue;
      }
    } else if (!concepts.has_value()) {
      if (f.status() == Finding::PRESENT || !concepts_of(/*excluded=*/false).has_value()) {
        const uint32_t field = out.Append("patient.findings[", i, "].term");
        const uint32_t message = out.Append("code ", f.term().code(), " is not known to rule set ",
                                            rs.name, " ", rs.version, "; it did not affect the result");
        out.AddWarning(cds::v1::Warning::UNKNOWN_CODE, field, message);
      }
      continue;
    }
    const compiler::AgeDays onset = compiler::ToDays(f.onset());
    for (int32_t concept_index : *concepts) {
      scratch.AddFinding(concept_index, FindingFact{f.status(), onset.set ? onset.days : kNan, i, -1});
    }
  }

  for (int i = 0; i < patient.measurements_size(); ++i) {
    const cds::v1::Measurement& m = patient.measurements(i);
    const CodeKeyBuffer key(m.assay().system(), m.assay().code());
    auto it = rs.labs_by_code.find(key.key());
    if (it == rs.labs_by_code.end()) {
      const uint32_t field = out.Append("patient.measurements[", i, "].assay");
      const uint32_t message = out.Append("assay ", m.assay().code(), " is not used by rule set ",
                                          rs.name, " ", rs.version);
      out.AddWarning(cds::v1::Warning::UNUSED_MEASUREMENT, field, message);
      continue;
    }
    const compiler::CompiledLab& lab = rs.labs[it->second];
    // Lower-cased on the stack when short (units are).
    char lower[32];
    std::string long_lower;
    absl::string_view unit;
    if (m.unit().size() <= sizeof(lower)) {
      for (size_t c = 0; c < m.unit().size(); ++c) lower[c] = absl::ascii_tolower(m.unit()[c]);
      unit = absl::string_view(lower, m.unit().size());
    } else {
      long_lower = absl::AsciiStrToLower(m.unit());
      unit = long_lower;
    }
    auto factor = lab.unit_factors.find(unit);
    if (factor == lab.unit_factors.end()) {
      const uint32_t field = out.Append("patient.measurements[", i, "].unit");
      const uint32_t message = out.Append("unit '", m.unit(), "' cannot be converted to ",
                                          lab.canonical_unit, " for ", lab.label,
                                          "; the measurement was ignored");
      out.AddWarning(cds::v1::Warning::UNCONVERTIBLE_UNIT, field, message);
      continue;
    }
    const compiler::AgeDays at = compiler::ToDays(m.age());
    LabFact fact{m.value() * factor->second, at.set ? at.days : facts.age_days, {}, {}, i};
    if (m.has_reference_range()) {
      if (m.reference_range().has_low()) fact.lower = m.reference_range().low() * factor->second;
      if (m.reference_range().has_high()) fact.upper = m.reference_range().high() * factor->second;
    }
    scratch.AddLab(it->second, fact);
  }

  // Values computed from a percentage and a total measured together.
  auto& derived = scratch.derived;
  derived.clear();
  for (int32_t lab : scratch.labs_present) {
    for (const compiler::CompiledDerivation& d : rs.derivations_by_percent_lab[lab]) {
      bool used = false;
      for (int32_t p = facts.FirstLab(lab); p >= 0; p = facts.lab(p).next) {
        const LabFact& pct = facts.lab(p);
        for (int32_t t = facts.FirstLab(d.total_lab); t >= 0; t = facts.lab(t).next) {
          const LabFact& total = facts.lab(t);
          const bool both_unknown = std::isnan(pct.age_days) && std::isnan(total.age_days);
          if (!both_unknown && !(std::fabs(pct.age_days - total.age_days) <= d.max_days_apart)) {
            continue;
          }
          derived.emplace_back(d.target, LabFact{pct.value / 100 * total.value, pct.age_days,
                                                 {}, {}, pct.index});
          used = true;
        }
      }
      if (!used) {
        const uint32_t field = out.Append("patient.measurements");
        const uint32_t message = out.Append(rs.labs[lab].label, " without a ", rs.labs[d.total_lab].label,
                                            " taken with it cannot give ", rs.labs[d.target].label);
        out.AddWarning(cds::v1::Warning::MISSING_KEY_DATA, field, message);
      }
    }
  }
  for (auto& [target, fact] : derived) scratch.AddLab(target, fact);
  return facts;
}

// A constant string for a warning to refer to (never destroyed).
const std::string* Constant(const char* text) { return new std::string(text); }

// Warns about missing data that the rule set's evidence would use.
void WarnMissingKeyData(const CompiledRuleSet& rs, const Facts& facts, EvaluationBuilder& out) {
  static const std::string* const kSex = Constant("patient.sex");
  static const std::string* const kSexUnknown =
      Constant("sex is not known; the rule set weighs it");
  static const std::string* const kAge = Constant("patient.age");
  static const std::string* const kAgeUnknown =
      Constant("age is not known; the rule set weighs it");
  static const std::string* const kFamily = Constant("patient.family_history");
  static const std::string* const kNoFamily = Constant(
      "no family history was recorded; affected relatives would change the suggestions");
  static const std::string* const kMeasurements = Constant("patient.measurements");
  constexpr auto kMissing = cds::v1::Warning::MISSING_KEY_DATA;
  if (facts.sex == cds::v1::UNKNOWN_SEX && !rs.rules_on_sex.empty()) {
    out.AddWarning(kMissing, kSex, kSexUnknown);
  }
  if (std::isnan(facts.age_days) && !rs.rules_on_age.empty()) {
    out.AddWarning(kMissing, kAge, kAgeUnknown);
  }
  if (facts.family == nullptr && !rs.rules_on_family.empty()) {
    out.AddWarning(kMissing, kFamily, kNoFamily);
  }
  for (int32_t lab : rs.labs_weighed_by_evidence) {
    if (!facts.HasLabs(lab)) {
      out.AddWarning(kMissing, kMeasurements, &rs.labs[lab].missing_warning);
    }
  }
}

int UrgencyOrder(cds::v1::Urgency u) { return -static_cast<int>(u); }

bool FactKnown(const Facts& facts, const compiler::FactKey& key) {
  switch (key.kind) {
    case compiler::FactKey::Kind::kConcept: return facts.HasFindings(key.index);
    case compiler::FactKey::Kind::kLab: return facts.HasLabs(key.index);
    case compiler::FactKey::Kind::kFamily: return facts.family != nullptr;
  }
  return true;
}

// Expected information gain (bits) over the differential {hypotheses, none of these} of
// learning the test's unknown facts, each a binary outcome whose frequency in each
// hypothesis and in the comparison population comes from the rule set's single-leaf
// evidence on it (compiler::FactFrequencies; facts taken as independent given the
// diagnosis; correlated-group capping is not modelled). Hypotheses without evidence on the
// facts behave like the comparison population, so they are lumped with "none of these" into
// one class: the gain is the same, and the work follows the evidence on the facts, not the
// rule set. The gain is the mutual information of class C and outcome O, computed as
// H(O) - H(O | C): with the facts independent given the class, H(O | C = c) is the sum of
// the facts' Bernoulli entropies in c, which the compiler tabulates, so a call takes one
// logarithm per outcome instead of one per outcome and class (H(C) - E[H(C | O)], equal).
// nullopt when every fact is known or none is informative.
std::optional<InformationValue> ValueOfTest(const CompiledRuleSet& rs, const Facts& facts,
                                            const Scores& scores, int32_t lead,
                                            const compiler::CompiledAction& action) {
  // Working arrays live in the scratch (no allocation per test once grown).
  Scratch& s = *facts.scratch;
  // Classes: the hypotheses some fact moves, then the lumped rest. (Small: linear search.)
  std::vector<int32_t>& classes = s.value_classes;
  classes.clear();
  auto class_of = [&classes](int32_t h) -> size_t {
    return static_cast<size_t>(std::find(classes.begin(), classes.end(), h) - classes.begin());
  };
  // The informative unknown facts.
  std::vector<const compiler::FactFrequencies*>& unknown = s.value_facts;
  unknown.clear();
  for (const compiler::FactKey& key : action.reveals) {
    if (FactKnown(facts, key)) continue;
    const compiler::FactFrequencies& fact = rs.FrequenciesOn(key);
    if (fact.hypotheses.empty()) continue;
    unknown.push_back(&fact);
    for (const auto& in : fact.hypotheses) {
      if (class_of(in.hypothesis) == classes.size()) classes.push_back(in.hypothesis);
    }
  }
  if (unknown.empty()) return std::nullopt;
  const size_t k = unknown.size();
  const size_t m = classes.size() + 1;  // + the lumped rest
  // P(positive | class) of fact f at p_positive[f * m + class], the rest's last, and its
  // Bernoulli entropy at entropy[f * m + class].
  auto& p_positive = s.value_p_positive;
  auto& entropy = s.value_entropy;
  p_positive.resize(k * m);
  entropy.resize(k * m);
  for (size_t f = 0; f < k; ++f) {
    const compiler::FactFrequencies& fact = *unknown[f];
    std::fill(&p_positive[f * m], &p_positive[f * m] + m, fact.p_comparison);
    std::fill(&entropy[f * m], &entropy[f * m] + m, fact.comparison_entropy_bits);
    for (const auto& in : fact.hypotheses) {
      const size_t c = class_of(in.hypothesis);
      p_positive[f * m + c] = in.p;
      entropy[f * m + c] = in.entropy_bits;
    }
  }
  auto& belief = s.value_belief;
  belief.resize(m);
  double involved = 0;
  for (size_t c = 0; c + 1 < m; ++c) {
    belief[c] = scores.Belief(classes[c]);
    involved += belief[c];
  }
  belief[m - 1] = std::max(0.0, 1.0 - involved);
  double outcome_given_class = 0;  // H(O | C): sum over classes and facts
  for (size_t c = 0; c < m; ++c) {
    double h = 0;
    for (size_t f = 0; f < k; ++f) h += entropy[f * m + c];
    outcome_given_class += belief[c] * h;
  }
  // The leading hypothesis' own class, or the rest when no fact moves it.
  const size_t lead_class = class_of(lead);  // classes.size() when in the lumped rest
  InformationValue value;
  value.lead = lead;
  value.lead_now = scores.Belief(lead);
  // P(outcome | class) for every outcome (bit f of the mask: fact f positive), at
  // likes[mask * m + class]: products over facts 0..k-1 in that order, built prefix by
  // prefix (the outcomes that agree on facts 0..j share the product up to j).
  auto& likes = s.value_likes;
  likes.assign((size_t{1} << k) * m, 1.0);
  for (size_t f = 0; f < k; ++f) {
    for (size_t low = 0; low < (size_t{1} << f); ++low) {
      double* negative = &likes[low * m];
      double* positive = &likes[(low | (size_t{1} << f)) * m];
      for (size_t c = 0; c < m; ++c) {
        const double p = p_positive[f * m + c];
        positive[c] = negative[c] * p;
        negative[c] *= 1 - p;
      }
    }
  }
  // The leading hypothesis' probability once the outcome is known. Within the lumped rest
  // every member moves by the same factor.
  auto lead_after = [&](const double* like, double p_outcome) {
    if (lead_class < classes.size()) return belief[lead_class] * like[lead_class] / p_outcome;
    if (belief[m - 1] <= 0) return 0.0;
    return value.lead_now * (belief[m - 1] * like[m - 1] / p_outcome) / belief[m - 1];
  };
  const uint32_t all_positive = (1u << k) - 1;
  double outcome_entropy = 0;  // H(O)
  for (uint32_t mask = 0; mask <= all_positive; ++mask) {
    const double* like = &likes[mask * m];
    double p_outcome = 0;
    for (size_t c = 0; c < m; ++c) p_outcome += belief[c] * like[c];
    if (p_outcome <= 0) continue;
    outcome_entropy -= p_outcome * std::log2(p_outcome);
    if (mask == 0) value.lead_if_negative = lead_after(like, p_outcome);
    if (mask == all_positive) value.lead_if_positive = lead_after(like, p_outcome);
  }
  value.gain_bits = std::max(0.0, outcome_entropy - outcome_given_class);
  return value;
}

// The description of a test's item when the family history is what it would reveal.
const std::string& NoFamilyHistoryRecorded() {
  static const std::string* const text = new std::string("No family history recorded");
  return *text;
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
  thread_local Evaluation evaluation;
  CDS_RETURN_IF_ERROR(Evaluate(rs, patient, options, &evaluation));
  evaluation.ToProto(response);
  return absl::OkStatus();
}

absl::Status Evaluate(const CompiledRuleSet& rs, const cds::v1::Patient& patient,
                      const EvaluateOptions& options, Evaluation* evaluation) {
  if (options.validate) {
    absl::Status valid = ValidatePatient(patient);
    if (!valid.ok()) return valid;
  }

  EvaluationBuilder out(evaluation);
  out.Reset(rs, patient);
  Scratch& scratch = ThreadScratch();
  scratch.Begin(rs);
  Facts facts = BuildFacts(rs, patient, scratch, out);
  WarnMissingKeyData(rs, facts, out);
  const Evaluator evaluator(rs, facts);

  // 1. Candidate rules: those listed under a fact the patient record makes known, each once
  // (stamped), then in ascending order.
  std::vector<int32_t>& evidence_candidates = scratch.evidence_candidates;
  std::vector<int32_t>& action_candidates = scratch.action_candidates;
  auto add_action = [&](int32_t a) { Scratch::SetBit(scratch.action_bits, a); };
  auto add = [&](const std::vector<RuleRef>& refs) {
    for (const RuleRef& r : refs) {
      if (r.kind == RuleRef::Kind::kAction) {
        add_action(r.index);
      } else {
        Scratch::SetBit(scratch.evidence_bits, r.index);
      }
    }
  };
  for (int32_t concept_index : scratch.concepts_present) add(rs.rules_by_concept[concept_index]);
  for (int32_t lab : scratch.labs_present) add(rs.rules_by_lab[lab]);
  // Evidence on sex and age alone is folded into the patient's demographic context.
  if (facts.sex != cds::v1::UNKNOWN_SEX) add(rs.candidates_on_sex);
  if (!std::isnan(facts.age_days)) add(rs.candidates_on_age);
  const compiler::DemographicContext* context = rs.DemographicContextFor(facts.sex, facts.age_days);
  if (facts.family != nullptr) {
    add(rs.candidates_on_family);
    if (facts.family->consanguinity() != cds::v1::FamilyHistory::CONSANGUINITY_UNSPECIFIED) {
      add(rs.candidates_on_consanguinity);
    }
  }

  // 2. Score: sum of log likelihood ratios per hypothesis; within a correlated group only
  // the strongest item counts.
  Scratch::TakeBits(scratch.evidence_bits, rs.evidence.size(), &evidence_candidates);
  std::vector<Applied>& applied = scratch.applied;
  int32_t group_hypothesis = -1;
  for (int32_t e : evidence_candidates) {
    const compiler::EvidenceScore& ev = rs.evidence_scores[e];
    // Most conditions are one finding leaf: decided from the concept's facts, without
    // reading the condition or its memo (a cold call's cache misses).
    const Tri t = ev.finding_concept >= 0 ? facts.Presence(ev.finding_concept)
                                          : evaluator.Eval(ev.condition);
    if (t == Tri::kUnknown) continue;
    if ((t == Tri::kTrue ? ev.log_lr_positive : ev.log_lr_negative) == 0) continue;  // LR 1
    compiler::ApplyEvidence(e, ev, t == Tri::kTrue, applied.emplace_back());
    if (ev.group >= 0) {
      // Candidates are in evidence order, so one hypothesis' items are contiguous.
      if (ev.hypothesis != group_hypothesis) {
        scratch.NewGroups();
        group_hypothesis = ev.hypothesis;
      }
      const uint32_t last = static_cast<uint32_t>(applied.size() - 1);
      uint32_t& best_at = scratch.group_best[static_cast<size_t>(ev.group)];
      uint32_t& stamp = scratch.group_stamp[static_cast<size_t>(ev.group)];
      if (stamp != scratch.group_epoch) {
        stamp = scratch.group_epoch;
        best_at = last;
      } else {
        Applied& best = applied[best_at];
        if (std::fabs(applied.back().log_lr) > std::fabs(best.log_lr)) {
          best.superseded = true;
          best_at = last;
        } else {
          applied.back().superseded = true;
        }
      }
    }
  }
  // Applied items are already grouped by hypothesis: the compiler numbers evidence
  // hypothesis by hypothesis, and the candidates were taken in evidence order. The folded
  // items are too, so both walk in hypothesis order; a hypothesis with both has them summed
  // in evidence order (merged as they are read, not copied), so that its weight and the
  // total are summed in the same order as if every item had been evaluated here.
  double total = 1.0;  // none (1 - sum of pretests) + every hypothesis at its pretest
  const compiler::DemographicHypothesis* folded =
      context == nullptr ? nullptr : context->hypotheses.data();
  const compiler::DemographicHypothesis* folded_end =
      context == nullptr ? nullptr : folded + context->hypotheses.size();
  constexpr int32_t kNone = std::numeric_limits<int32_t>::max();
  const Applied* a = applied.data();
  const Applied* const applied_end = a + applied.size();
  while (a != applied_end || folded != folded_end) {
    const int32_t from_applied = a != applied_end ? a->hypothesis : kNone;
    const int32_t from_folded = folded != folded_end ? folded->hypothesis : kNone;
    const int32_t h = std::min(from_applied, from_folded);
    const Applied* const a_begin = a;
    const double prior = rs.hypotheses[h].pretest_probability;
    double sum = 0;  // of the log likelihood ratios, in evidence order
    double w;
    bool rank_here = true;
    scratch.context_begin[h] = scratch.context_end[h] = 0;
    if (from_folded != h) {
      for (; a != applied_end && a->hypothesis == h; ++a) {
        if (!a->superseded) sum += a->log_lr;
      }
      w = prior * std::exp(sum);
      scratch.range_source[h] = ItemSource::kApplied;
    } else {
      scratch.context_begin[h] = folded->begin;
      scratch.context_end[h] = folded->end;
      if (from_applied != h) {
        w = folded->weight;
        scratch.range_source[h] = ItemSource::kContext;
        rank_here = rs.hypotheses[h].max_probability.has_value();  // else in context->order
      } else {
        const Applied* f = context->items.data() + folded->begin;
        const Applied* const f_end = context->items.data() + folded->end;
        for (;;) {
          const bool have_a = a != applied_end && a->hypothesis == h;
          if (!have_a && f == f_end) break;
          const Applied* next = f == f_end || (have_a && a->evidence < f->evidence) ? a++ : f++;
          if (!next->superseded) sum += next->log_lr;
        }
        w = prior * std::exp(sum);
        scratch.range_source[h] = ItemSource::kBoth;
      }
      ++folded;
    }
    scratch.range_begin[h] = static_cast<uint32_t>(a_begin - applied.data());
    scratch.range_end[h] = static_cast<uint32_t>(a - applied.data());
    scratch.hypothesis_stamp[h] = scratch.epoch;
    scratch.weight[h] = w;
    if (rank_here) scratch.touched.push_back(h);
    total += w - prior;
  }

  // 3. Posterior over the differential plus "none of these".
  const Scores scores(rs, scratch, total, context);
  facts.scores = &scores;
  scratch.NewMemo();  // probability leaves can now be decided
  // The leading hypotheses: whose tests are worth valuing.
  constexpr size_t kLeading = 5;
  constexpr double kLeadingFloor = 0.01;
  const std::vector<int32_t> leading = scores.Top(kLeading);
  const int32_t lead = leading.empty() ? -1 : leading[0];

  // 4. Actions whose conditions hold; tests with an information value only while their
  // result is unknown and would move a leading hypothesis enough to be worth having.
  // Actions that need a hypothesis ranked well enough: walk the ranking while some trigger
  // can still hold (the work follows the likely hypotheses, not the touched ones).
  for (size_t r = 0; r < rs.hypotheses.size(); ++r) {
    const int32_t h = scores.Top(r + 1)[r];
    const double posterior = scores.Posterior(h);
    if (r >= static_cast<size_t>(rs.max_in_top) && posterior < rs.trigger_floor) break;
    for (const compiler::ProbabilityTrigger& t : rs.actions_by_hypothesis[h]) {
      if (posterior >= t.at_least && (t.in_top == 0 || r < static_cast<size_t>(t.in_top))) {
        add_action(t.action);
      }
    }
  }
  auto& information_candidates = scratch.information_candidates;
  for (size_t i = 0; i < leading.size(); ++i) {
    if (i > 0 && scores.Posterior(leading[i]) < kLeadingFloor) break;
    for (int32_t a : rs.information_actions_by_hypothesis[leading[i]]) {
      if (scratch.information_stamp[a] == scratch.epoch) continue;
      scratch.information_stamp[a] = scratch.epoch;
      information_candidates.push_back(a);
    }
  }
  auto test_value = [&](int32_t a) -> const InformationValue* {
    return scratch.value_stamp[a] == scratch.epoch ? &scratch.values[a] : nullptr;
  };
  for (int32_t a : information_candidates) {
    // A test fires only when its condition (if any) holds: valuing one that cannot fire
    // would change nothing.
    const ConditionId condition = rs.actions[a].condition;
    if (condition >= 0 && evaluator.Eval(condition) != Tri::kTrue) continue;
    const auto value = ValueOfTest(rs, facts, scores, lead, rs.actions[a]);
    if (value && value->gain_bits >= rs.actions[a].min_gain_bits) {
      scratch.value_stamp[a] = scratch.epoch;
      scratch.values[a] = *value;
      add_action(a);
    }
  }
  Scratch::TakeBits(scratch.action_bits, rs.actions.size(), &action_candidates);
  std::vector<int32_t>& fired = scratch.fired;
  for (int32_t a : action_candidates) {
    const compiler::CompiledAction& action = rs.actions[a];
    // A test valued for its information fires only when that value is there.
    if (!action.reveals.empty() && test_value(a) == nullptr) continue;
    if (action.condition < 0 || evaluator.Eval(action.condition) == Tri::kTrue) fired.push_back(a);
  }
  auto gain_of = [&](int32_t a) {
    const InformationValue* v = test_value(a);
    return v == nullptr ? 0.0 : v->gain_bits;
  };
  auto action_less = [&](int32_t a, int32_t b) {
    const auto& x = rs.actions[a];
    const auto& y = rs.actions[b];
    if (x.urgency != y.urgency) return UrgencyOrder(x.urgency) < UrgencyOrder(y.urgency);
    if (x.priority != y.priority) return x.priority < y.priority;
    if (gain_of(a) != gain_of(b)) return gain_of(a) > gain_of(b);
    return x.id_rank < y.id_rank;
  };
  std::sort(fired.begin(), fired.end(), action_less);

  // 5. Suggestions in rank order: alerts, diagnoses, then the other actions.
  // Lab descriptions live in the scratch until the next call: copied into the evaluation.
  const std::string* const details_begin = scratch.detail.data();
  const std::string* const details_end = details_begin + scratch.detail.size();
  auto add_piece = [&](const std::string* piece) {
    out.AddPiece(piece, piece < details_begin || piece >= details_end);
  };
  auto emit_action = [&](int32_t a) {
    const compiler::CompiledAction& action = rs.actions[a];
    EvaluationBuilder::Entry& entry = out.AddEntry();
    entry.action = a;
    if (const InformationValue* value = test_value(a); value != nullptr) {
      const InformationValue& v = *value;
      entry.has_gain = true;
      entry.gain = v.gain_bits;
      entry.detail_begin = out.text_size();
      absl::StrAppendFormat(
          out.text(),
          "Its result is expected to be worth %.2f bits over the differential "
          "(computed from this rule set's frequencies): P(%s) is %.2f now, "
          "%.2f if positive, %.2f if negative.",
          v.gain_bits, rs.hypotheses[v.lead].title, v.lead_now, v.lead_if_positive,
          v.lead_if_negative);
      out.entry().detail_end = out.text_size();
    }
    if (options.explain && !action.reveals.empty()) {
      for (const compiler::FactKey& key : action.reveals) {
        if (FactKnown(facts, key)) continue;
        EvaluationBuilder::Item& item = out.AddItem();
        item.description = EvaluationBuilder::Description::kPieces;
        switch (key.kind) {
          case compiler::FactKey::Kind::kConcept:
            out.AddPiece(&rs.concepts[key.index].not_recorded, true);
            break;
          case compiler::FactKey::Kind::kLab:
            out.AddPiece(&rs.labs[key.index].no_result, true);
            break;
          case compiler::FactKey::Kind::kFamily:
            out.AddPiece(&NoFamilyHistoryRecorded(), true);
            break;
        }
      }
    }
    if (!options.explain || action.condition < 0) return;
    out.entry().references = true;
    auto& reasons = scratch.reasons;
    auto& finding_indices = scratch.finding_indices;
    reasons.clear();
    finding_indices.clear();
    evaluator.CollectReasons(action.condition, options.full_trace ? &reasons : nullptr,
                             &finding_indices);
    // Compact: the rule, where it is written and the codes it matched, in one item.
    if (!options.full_trace) out.AddItem();
    // A leaf reached through several branches is one reason.
    for (size_t r = 0; options.full_trace && r < reasons.size(); ++r) {
      const std::string& reason = *reasons[r];
      if (std::any_of(reasons.begin(), reasons.begin() + static_cast<ptrdiff_t>(r),
                      [&](const std::string* earlier) { return *earlier == reason; })) {
        continue;
      }
      out.AddItem().description = EvaluationBuilder::Description::kPieces;
      add_piece(reasons[r]);
    }
    if (!finding_indices.empty() && out.items_of_entry() > 0) {
      std::sort(finding_indices.begin(), finding_indices.end());
      finding_indices.erase(std::unique(finding_indices.begin(), finding_indices.end()),
                            finding_indices.end());
      out.SetCodes(out.first_item_of_entry(), finding_indices);
    }
  };
  for (int32_t a : fired) {
    if (rs.actions[a].kind == cds::v1::ALERT) emit_action(a);
  }
  constexpr size_t kAlwaysShownDiagnoses = 3;
  for (size_t r = 0; r < rs.hypotheses.size(); ++r) {
    const int32_t h = scores.Top(r + 1)[r];
    const double posterior = scores.Posterior(h);
    if (r >= kAlwaysShownDiagnoses && posterior < rs.min_probability_to_show) break;
    EvaluationBuilder::Entry& entry = out.AddEntry();
    entry.hypothesis = h;
    entry.probability = posterior;
    if (!options.explain) continue;
    entry.references = true;
    auto& items = scratch.items;
    items.clear();
    if (scores.Touched(h)) {
      items.assign(applied.data() + scratch.range_begin[h], applied.data() + scratch.range_end[h]);
      for (Applied& item : items) {
        item.explain_rank = compiler::ExplainRank(rs.evidence[item.evidence], item.matched);
      }
      if (context != nullptr) {
        items.insert(items.end(), context->items.data() + scratch.context_begin[h],
                     context->items.data() + scratch.context_end[h]);
      }
    }
    // Through a lambda: a function pointer's comparisons are not inlined into the sort.
    std::sort(items.begin(), items.end(), [](const Applied& x, const Applied& y) {
      return compiler::ExplainsBefore(x, y);
    });
    for (const Applied& applied_item : items) {
      const compiler::CompiledEvidence& ev = rs.evidence[applied_item.evidence];
      // From the scoring entry, which the call has just read: ev's condition is on another
      // cache line than the fields read here.
      const ConditionId condition = rs.evidence_scores[applied_item.evidence].condition;
      EvaluationBuilder::Item& item = out.AddItem();
      item.evidence = applied_item.evidence;
      item.effect = applied_item.matched ? cds::v1::Evidence::MATCHED : cds::v1::Evidence::NOT_MATCHED;
      item.has_likelihood_ratio = true;
      item.likelihood_ratio = applied_item.superseded ? 1.0
                              : applied_item.matched  ? ev.shown_lr_positive
                                                      : ev.shown_lr_negative;
      item.superseded = applied_item.superseded;
      if (options.full_trace) {
        item.description = EvaluationBuilder::Description::kLabs;
        auto& lab_details = scratch.reasons;
        lab_details.clear();
        evaluator.CollectLabDetails(condition, &lab_details);
        out.AddPiece(&ev.description, true);
        for (const std::string* detail : lab_details) add_piece(detail);
      }
      auto& finding_indices = scratch.finding_indices;
      finding_indices.clear();
      evaluator.CollectFindingCodes(condition, &finding_indices);
      // A single finding leaf (most evidence) lists its concept's facts, which are in
      // patient order and distinct already.
      if (rs.conditions[condition].kind != CompiledCondition::Kind::kFinding) {
        std::sort(finding_indices.begin(), finding_indices.end());
        finding_indices.erase(std::unique(finding_indices.begin(), finding_indices.end()),
                              finding_indices.end());
      }
      out.SetCodes(item, finding_indices);
    }
  }
  for (int32_t a : fired) {
    if (rs.actions[a].kind != cds::v1::ALERT) emit_action(a);
  }
  return absl::OkStatus();
}

}  // namespace cds::engine
