#pragma once

// The outcome of one evaluation before it becomes a response (see engine.h's Evaluate):
// which suggestions in which order, their per-call numbers, which evidence items with
// which values and matched findings, and the warnings. Two renderers read it:
//   - ToProto fills a cds.v1.EvaluateResponse (what engine::Evaluate returns);
//   - the wire renderer (WireSize / WriteWire) writes the serialized EvaluateResponse
//     directly, copying the rule set's precompiled fragments (compiler/wire_fragments.h)
//     for every constant field: exactly the bytes protobuf writes for ToProto's response
//     with the same extras set, without building any message or string.
// Not thread-safe; reusable: once its arrays have grown, an evaluation into it allocates
// nothing. It refers to the rule set and the patient it was computed from, which must
// outlive its use.

#include <cstdint>
#include <string>
#include <vector>

#include "absl/strings/string_view.h"
#include "cds/v1/service.pb.h"
#include "server/compiler/compiled_rule_set.h"

namespace cds::engine {

// The fields a service adds to the engine's response (EvaluateResponse.evaluation_id,
// rule_set.label, evaluated_at), for the wire renderer.
struct WireExtras {
  absl::string_view evaluation_id;
  absl::string_view label;
  bool has_evaluated_at = false;
  int64_t evaluated_at_seconds = 0;
  int32_t evaluated_at_nanos = 0;
};

class Evaluation {
 public:
  Evaluation() = default;
  Evaluation(const Evaluation&) = delete;
  Evaluation& operator=(const Evaluation&) = delete;

  const compiler::CompiledRuleSet& rule_set() const { return *rs_; }
  // Suggestions in rank order.
  size_t suggestion_count() const { return entries_.size(); }
  const std::string& suggestion_rule_id(size_t i) const;

  // Fills `response` (assumed empty) with the suggestions, warnings, rule_set ref and
  // disclaimer.
  void ToProto(cds::v1::EvaluateResponse* response) const;

  // The serialized EvaluateResponse: WireSize (which also sizes the nested messages) and
  // then WriteWire with the same extras writes exactly that many bytes to `out`.
  // REQUIRES: the rule set has its wire fragments (compiled by compiler::Compile).
  size_t WireSize(const WireExtras& extras);
  void WriteWire(const WireExtras& extras, char* out);
  // Both, appending to `out`.
  void AppendWire(const WireExtras& extras, std::string* out);

 private:
  friend class EvaluationBuilder;  // engine.cc

  // Text of the description, joined as the full trace shows it.
  enum class Description : uint8_t {
    kNone,
    kPieces,  // the pieces, concatenated
    kLabs,    // piece 0, then ": " and the others separated by "; "
  };
  // A string that outlives the evaluation (the rule set's, or a constant), or a range of
  // text_ (which may move while it grows).
  struct Piece {
    const std::string* rule_set_string = nullptr;
    uint32_t begin = 0;
    uint32_t end = 0;
  };
  struct Item {
    int32_t evidence = -1;  // rs.evidence index; -1 for an action's item
    cds::v1::Evidence::Effect effect = cds::v1::Evidence::MATCHED;
    bool has_likelihood_ratio = false;
    bool superseded = false;
    Description description = Description::kNone;
    double likelihood_ratio = 0;
    uint32_t pieces_begin = 0, pieces_end = 0;
    uint32_t codes_begin = 0, codes_end = 0;  // into codes_: patient finding indices
    size_t size = 0;  // serialized, set by WireSize
  };
  struct Entry {
    int32_t hypothesis = -1;  // a diagnosis, or
    int32_t action = -1;      // an action's suggestion
    double probability = 0;   // diagnoses
    bool has_gain = false;    // an informative test
    bool references = false;
    double gain = 0;
    uint32_t detail_begin = 0, detail_end = 0;  // text_ appended to the action's detail
    uint32_t items_begin = 0, items_end = 0;
    size_t size = 0;
    size_t detail_size = 0;  // with the appended text
  };
  struct Warning {
    cds::v1::Warning::Kind kind;
    Piece field, message;  // constant text is referred to, not copied
    size_t size;
  };

  void Reset(const compiler::CompiledRuleSet& rs, const cds::v1::Patient& patient);
  absl::string_view Text(uint32_t begin, uint32_t end) const {
    return absl::string_view(text_.data() + begin, end - begin);
  }
  absl::string_view PieceText(const Piece& p) const {
    return p.rule_set_string != nullptr ? absl::string_view(*p.rule_set_string)
                                        : Text(p.begin, p.end);
  }
  size_t DescriptionSize(const Item& item) const;
  void AppendDescription(const Item& item, std::string* out) const;
  char* WriteDescription(const Item& item, char* out) const;
  absl::string_view ItemRuleId(const Item& item, const Entry& entry) const;
  size_t ItemSize(Item& item, const Entry& entry) const;
  char* WriteItem(const Item& item, const Entry& entry, char* out);
  size_t RuleSetRefSize(const WireExtras& extras) const;
  size_t TimestampSize(const WireExtras& extras) const;

  const compiler::CompiledRuleSet* rs_ = nullptr;
  const cds::v1::Patient* patient_ = nullptr;
  std::vector<Entry> entries_;
  std::vector<Item> items_;
  std::vector<Piece> pieces_;
  std::vector<int32_t> codes_;
  std::vector<Warning> warnings_;
  std::string text_;  // per-call text: warnings, test values, lab details
  // Per patient finding: its code's serialized size (WireSize; kUnsized when no item
  // matched it), and where WriteWire first wrote it (a finding matched by several items is
  // serialized once, then copied).
  static constexpr uint32_t kUnsized = UINT32_MAX;
  std::vector<uint32_t> code_sizes_;
  std::vector<const char*> code_written_at_;
};

}  // namespace cds::engine
