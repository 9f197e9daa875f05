// The two renderers of an Evaluation. The wire renderer follows protobuf's serializer for
// these messages field by field: fields in field-number order; proto3 strings, enums and
// bools only when non-empty / non-zero; `optional` doubles whenever set; messages with their
// length first (so sizes are computed before anything is written); no maps (so deterministic
// and default serialization agree). Every field number here is at most 15: one-byte tags.

#include "server/engine/evaluation.h"

#include "absl/strings/str_cat.h"

namespace cds::engine {
namespace {

namespace wire = compiler::wire;
using wire::kFixed64;
using wire::kLengthDelimited;
using wire::kVarint;
using wire::LengthDelimitedSize;
using wire::Tag;
using wire::VarintSize;

char* WriteLengthPrefix(uint32_t field, size_t size, char* out) {
  *out++ = static_cast<char>(Tag(field, kLengthDelimited));
  return wire::WriteVarint(size, out);
}

// A proto3 string field: nothing when empty.
size_t StringFieldSize(size_t size) { return size == 0 ? 0 : LengthDelimitedSize(size); }
char* WriteStringField(uint32_t field, absl::string_view value, char* out) {
  if (value.empty()) return out;
  return wire::WriteBytes(value, WriteLengthPrefix(field, value.size(), out));
}

// An int32 or enum field: nothing when zero; negative values sign-extended.
size_t Int32FieldSize(int32_t v) {
  return v == 0 ? 0 : 1 + VarintSize(static_cast<uint64_t>(static_cast<int64_t>(v)));
}
char* WriteInt32Field(uint32_t field, int32_t v, char* out) {
  if (v == 0) return out;
  *out++ = static_cast<char>(Tag(field, kVarint));
  return wire::WriteVarint(static_cast<uint64_t>(static_cast<int64_t>(v)), out);
}

constexpr size_t kDoubleFieldSize = 9;

// A patient's code as sent, the way protobuf serializes it, without protobuf's UTF-8 check
// of each string (the request parser has checked them). `size` is its ByteSizeLong: a code
// carrying fields unknown to this server is larger than its three strings, and is left to
// protobuf, which writes those fields back too.
char* WriteCode(const cds::v1::Code& code, size_t size, char* out) {
  const size_t known = StringFieldSize(code.system().size()) + StringFieldSize(code.code().size()) +
                       StringFieldSize(code.display().size());
  if (known != size) {
    return reinterpret_cast<char*>(
        code.SerializeWithCachedSizesToArray(reinterpret_cast<uint8_t*>(out)));
  }
  out = WriteStringField(1, code.system(), out);
  out = WriteStringField(2, code.code(), out);
  return WriteStringField(3, code.display(), out);
}

// "<detail> <value text>", as the protobuf renderer appends to an informative test's detail.
absl::string_view DetailSeparator(const std::string& detail) { return detail.empty() ? "" : " "; }

}  // namespace

void Evaluation::Reset(const compiler::CompiledRuleSet& rs, const cds::v1::Patient& patient) {
  rs_ = &rs;
  patient_ = &patient;
  entries_.clear();
  items_.clear();
  pieces_.clear();
  codes_.clear();
  warnings_.clear();
  text_.clear();
}

const std::string& Evaluation::suggestion_rule_id(size_t i) const {
  const Entry& e = entries_[i];
  return e.hypothesis >= 0 ? rs_->hypotheses[e.hypothesis].id : rs_->actions[e.action].id;
}

// ---- protobuf ------------------------------------------------------------------------

void Evaluation::AppendDescription(const Item& item, std::string* out) const {
  for (uint32_t p = item.pieces_begin; p < item.pieces_end; ++p) {
    if (item.description == Description::kLabs && p > item.pieces_begin) {
      out->append(p == item.pieces_begin + 1 ? ": " : "; ");
    }
    const absl::string_view text = PieceText(pieces_[p]);
    out->append(text.data(), text.size());
  }
}

void Evaluation::ToProto(cds::v1::EvaluateResponse* response) const {
  const compiler::CompiledRuleSet& rs = *rs_;
  auto* ref = response->mutable_rule_set();
  ref->set_name(rs.name);
  ref->set_version(rs.version);
  ref->set_digest(rs.digest);
  if (rs.ontology != nullptr) ref->set_ontology(rs.ontology->release());
  response->set_disclaimer(rs.disclaimer);
  for (const Warning& w : warnings_) {
    auto* out = response->add_warnings();
    out->set_kind(w.kind);
    out->set_field(std::string(PieceText(w.field)));
    out->set_message(std::string(PieceText(w.message)));
  }
  for (size_t r = 0; r < entries_.size(); ++r) {
    const Entry& entry = entries_[r];
    auto* s = response->add_suggestions();
    s->set_rank(static_cast<int32_t>(r + 1));
    const std::string* source = nullptr;
    const std::vector<cds::v1::Reference>* references = nullptr;
    const std::string* entry_id = nullptr;
    if (entry.hypothesis >= 0) {
      const compiler::CompiledHypothesis& hyp = rs.hypotheses[entry.hypothesis];
      s->set_kind(cds::v1::DIAGNOSIS);
      s->set_rule_id(hyp.id);
      if (!hyp.code.code().empty()) *s->mutable_code() = hyp.code;
      s->set_title(hyp.title);
      s->set_detail(hyp.detail);
      s->set_urgency(cds::v1::INFO);
      s->set_probability(entry.probability);
      s->set_pretest_probability(hyp.pretest_probability);
      references = &hyp.references;
    } else {
      const compiler::CompiledAction& action = rs.actions[entry.action];
      s->set_kind(action.kind);
      s->set_rule_id(action.id);
      if (!action.code.code().empty()) *s->mutable_code() = action.code;
      s->set_title(action.title);
      s->set_detail(action.detail);
      s->set_urgency(action.urgency);
      if (entry.has_gain) {
        s->set_expected_information_gain(entry.gain);
        absl::StrAppend(s->mutable_detail(), DetailSeparator(action.detail),
                        Text(entry.detail_begin, entry.detail_end));
      }
      source = &action.source;
      entry_id = &action.id;
      references = &action.references;
    }
    for (uint32_t i = entry.items_begin; i < entry.items_end; ++i) {
      const Item& item = items_[i];
      auto* e = s->add_evidence();
      if (item.evidence >= 0) {
        const compiler::CompiledEvidence& ev = rs.evidence[item.evidence];
        e->set_rule_id(ev.id);
        e->set_source(ev.source);
      } else {
        e->set_rule_id(*entry_id);
        e->set_source(*source);
      }
      if (item.description != Description::kNone) AppendDescription(item, e->mutable_description());
      e->set_effect(item.effect);
      if (item.has_likelihood_ratio) e->set_likelihood_ratio(item.likelihood_ratio);
      e->set_superseded(item.superseded);
      for (uint32_t c = item.codes_begin; c < item.codes_end; ++c) {
        *e->add_matched_codes() = patient_->findings(codes_[c]).term();
      }
    }
    if (entry.references) {
      for (const auto& reference : *references) *s->add_references() = reference;
    }
  }
}

// ---- wire ----------------------------------------------------------------------------

size_t Evaluation::DescriptionSize(const Item& item) const {
  size_t size = 0;
  for (uint32_t p = item.pieces_begin; p < item.pieces_end; ++p) {
    if (item.description == Description::kLabs && p > item.pieces_begin) size += 2;
    size += PieceText(pieces_[p]).size();
  }
  return size;
}

char* Evaluation::WriteDescription(const Item& item, char* out) const {
  for (uint32_t p = item.pieces_begin; p < item.pieces_end; ++p) {
    if (item.description == Description::kLabs && p > item.pieces_begin) {
      out = wire::WriteBytes(p == item.pieces_begin + 1 ? ": " : "; ", out);
    }
    out = wire::WriteBytes(PieceText(pieces_[p]), out);
  }
  return out;
}

size_t Evaluation::ItemSize(Item& item, const Entry& entry) const {
  const compiler::WireFragments& w = rs_->wire;
  size_t size = 0;
  if (item.evidence >= 0) {
    const auto& f = w.evidence[item.evidence];
    size += f.rule_id.size + f.source.size;
  } else {
    const auto& f = w.actions[entry.action];
    size += f.evidence_rule_id.size + f.evidence_source.size;
  }
  if (item.description != Description::kNone) size += StringFieldSize(DescriptionSize(item));
  size += Int32FieldSize(item.effect);
  if (item.has_likelihood_ratio) size += kDoubleFieldSize;
  for (uint32_t c = item.codes_begin; c < item.codes_end; ++c) {
    size += LengthDelimitedSize(code_sizes_[codes_[c]]);
  }
  if (item.superseded) size += 2;
  item.size = size;
  return size;
}

char* Evaluation::WriteItem(const Item& item, const Entry& entry, char* out) {
  const compiler::WireFragments& w = rs_->wire;
  compiler::Fragment rule_id, source;
  if (item.evidence >= 0) {
    rule_id = w.evidence[item.evidence].rule_id;
    source = w.evidence[item.evidence].source;
  } else {
    rule_id = w.actions[entry.action].evidence_rule_id;
    source = w.actions[entry.action].evidence_source;
  }
  out = wire::WriteBytes(w[rule_id], out);                                    // 1
  if (item.description != Description::kNone) {                              // 2
    const size_t size = DescriptionSize(item);
    if (size > 0) out = WriteDescription(item, WriteLengthPrefix(2, size, out));
  }
  out = WriteInt32Field(3, item.effect, out);                                 // 3
  if (item.has_likelihood_ratio) out = wire::WriteDouble(4, item.likelihood_ratio, out);  // 4
  for (uint32_t c = item.codes_begin; c < item.codes_end; ++c) {              // 5
    const int32_t finding = codes_[c];
    const uint32_t size = code_sizes_[finding];
    out = WriteLengthPrefix(5, size, out);
    if (code_written_at_[finding] != nullptr) {
      out = wire::WriteBytes(absl::string_view(code_written_at_[finding], size), out);
    } else {
      code_written_at_[finding] = out;
      out = WriteCode(patient_->findings(finding).term(), size, out);
    }
  }
  out = wire::WriteBytes(w[source], out);                                     // 6
  if (item.superseded) {                                                      // 7
    *out++ = static_cast<char>(Tag(7, kVarint));
    *out++ = 1;
  }
  return out;
}

size_t Evaluation::RuleSetRefSize(const WireExtras& extras) const {
  return rs_->wire.rule_set_ref.size + StringFieldSize(extras.label.size());
}

size_t Evaluation::TimestampSize(const WireExtras& extras) const {
  size_t size = 0;
  if (extras.evaluated_at_seconds != 0) {
    size += 1 + VarintSize(static_cast<uint64_t>(extras.evaluated_at_seconds));
  }
  size += Int32FieldSize(extras.evaluated_at_nanos);
  return size;
}

size_t Evaluation::WireSize(const WireExtras& extras) {
  const compiler::CompiledRuleSet& rs = *rs_;
  const compiler::WireFragments& w = rs.wire;
  code_sizes_.assign(static_cast<size_t>(patient_->findings_size()), kUnsized);
  for (int32_t finding : codes_) {
    if (code_sizes_[finding] != kUnsized) continue;
    // ByteSizeLong also caches the size protobuf's serializer reads (WriteCode).
    code_sizes_[finding] =
        static_cast<uint32_t>(patient_->findings(finding).term().ByteSizeLong());
  }
  size_t size = StringFieldSize(extras.evaluation_id.size());  // 1
  size += LengthDelimitedSize(RuleSetRefSize(extras));       // 2
  for (size_t r = 0; r < entries_.size(); ++r) {              // 3
    Entry& entry = entries_[r];
    size_t s = 1 + VarintSize(r + 1);
    if (entry.hypothesis >= 0) {
      const auto& f = w.hypotheses[entry.hypothesis];
      s += f.head.size + kDoubleFieldSize + f.pretest.size;
      if (entry.references) s += f.references.size;
    } else {
      const auto& f = w.actions[entry.action];
      s += f.head.size + f.urgency.size;
      if (entry.has_gain) {
        const std::string& detail = rs.actions[entry.action].detail;
        entry.detail_size = detail.size() + DetailSeparator(detail).size() +
                            (entry.detail_end - entry.detail_begin);
        s += StringFieldSize(entry.detail_size) + kDoubleFieldSize;
      } else {
        s += f.detail.size;
      }
      if (entry.references) s += f.references.size;
    }
    for (uint32_t i = entry.items_begin; i < entry.items_end; ++i) {
      s += LengthDelimitedSize(ItemSize(items_[i], entry));
    }
    entry.size = s;
    size += LengthDelimitedSize(s);
  }
  for (Warning& warning : warnings_) {  // 4
    warning.size = Int32FieldSize(warning.kind) +
                   StringFieldSize(PieceText(warning.field).size()) +
                   StringFieldSize(PieceText(warning.message).size());
    size += LengthDelimitedSize(warning.size);
  }
  if (extras.has_evaluated_at) size += LengthDelimitedSize(TimestampSize(extras));  // 5
  size += w.disclaimer.size;  // 6
  return size;
}

void Evaluation::WriteWire(const WireExtras& extras, char* out) {
  const compiler::CompiledRuleSet& rs = *rs_;
  code_written_at_.assign(code_sizes_.size(), nullptr);
  const compiler::WireFragments& w = rs.wire;
  out = WriteStringField(1, extras.evaluation_id, out);
  out = WriteLengthPrefix(2, RuleSetRefSize(extras), out);
  out = wire::WriteBytes(w[w.rule_set_ref], out);
  out = WriteStringField(5, extras.label, out);
  for (size_t r = 0; r < entries_.size(); ++r) {
    const Entry& entry = entries_[r];
    out = WriteLengthPrefix(3, entry.size, out);
    out = WriteInt32Field(1, static_cast<int32_t>(r + 1), out);
    const compiler::WireFragments::Action* action = nullptr;
    compiler::Fragment references;
    if (entry.hypothesis >= 0) {
      const auto& f = w.hypotheses[entry.hypothesis];
      out = wire::WriteBytes(w[f.head], out);                // 2-7
      out = wire::WriteDouble(8, entry.probability, out);   // 8
      out = wire::WriteBytes(w[f.pretest], out);             // 9
      references = f.references;
    } else {
      action = &w.actions[entry.action];
      out = wire::WriteBytes(w[action->head], out);  // 2-5
      if (entry.has_gain) {                          // 6
        const std::string& detail = rs.actions[entry.action].detail;
        if (entry.detail_size > 0) {
          out = WriteLengthPrefix(6, entry.detail_size, out);
          out = wire::WriteBytes(detail, out);
          out = wire::WriteBytes(DetailSeparator(detail), out);
          out = wire::WriteBytes(Text(entry.detail_begin, entry.detail_end), out);
        }
      } else {
        out = wire::WriteBytes(w[action->detail], out);
      }
      out = wire::WriteBytes(w[action->urgency], out);  // 7
      references = action->references;
    }
    for (uint32_t i = entry.items_begin; i < entry.items_end; ++i) {  // 10
      const Item& item = items_[i];
      out = WriteItem(item, entry, WriteLengthPrefix(10, item.size, out));
    }
    if (entry.references) out = wire::WriteBytes(w[references], out);  // 11
    if (entry.has_gain) out = wire::WriteDouble(12, entry.gain, out);   // 12
  }
  for (const Warning& warning : warnings_) {
    out = WriteLengthPrefix(4, warning.size, out);
    out = WriteInt32Field(1, warning.kind, out);
    out = WriteStringField(2, PieceText(warning.field), out);
    out = WriteStringField(3, PieceText(warning.message), out);
  }
  if (extras.has_evaluated_at) {
    out = WriteLengthPrefix(5, TimestampSize(extras), out);
    if (extras.evaluated_at_seconds != 0) {
      *out++ = static_cast<char>(Tag(1, kVarint));
      out = wire::WriteVarint(static_cast<uint64_t>(extras.evaluated_at_seconds), out);
    }
    out = WriteInt32Field(2, extras.evaluated_at_nanos, out);
  }
  wire::WriteBytes(w[w.disclaimer], out);
}

void Evaluation::AppendWire(const WireExtras& extras, std::string* out) {
  const size_t size = WireSize(extras);
  const size_t at = out->size();
  out->resize(at + size);
  WriteWire(extras, out->data() + at);
}

}  // namespace cds::engine
