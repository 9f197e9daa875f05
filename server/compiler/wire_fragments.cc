#include "server/compiler/wire_fragments.h"

#include <string>

#include "cds/v1/common.pb.h"
#include "server/compiler/compiled_rule_set.h"

namespace cds::compiler {
namespace wire {

void AppendVarint(uint64_t v, std::string* out) {
  char buffer[10];
  out->append(buffer, static_cast<size_t>(WriteVarint(v, buffer) - buffer));
}

void AppendString(uint32_t field, absl::string_view value, std::string* out) {
  if (value.empty()) return;
  AppendMessage(field, value, out);
}

void AppendInt32(uint32_t field, int32_t value, std::string* out) {
  if (value == 0) return;
  AppendVarint(Tag(field, kVarint), out);
  // As protobuf does: a negative int32 is sign-extended to 64 bits.
  AppendVarint(static_cast<uint64_t>(static_cast<int64_t>(value)), out);
}

void AppendDouble(uint32_t field, double value, std::string* out) {
  char buffer[9];
  out->append(buffer, static_cast<size_t>(WriteDouble(field, value, buffer) - buffer));
}

void AppendMessage(uint32_t field, absl::string_view serialized, std::string* out) {
  AppendVarint(Tag(field, kLengthDelimited), out);
  AppendVarint(serialized.size(), out);
  out->append(serialized.data(), serialized.size());
}

}  // namespace wire

namespace {

// Appends to `bytes` what `encode(std::string*)` writes, as a fragment.
template <typename Encode>
Fragment Add(std::string* bytes, Encode encode) {
  Fragment f;
  f.offset = static_cast<uint32_t>(bytes->size());
  encode(bytes);
  f.size = static_cast<uint32_t>(bytes->size() - f.offset);
  return f;
}

// Suggestion.code, set only when the rule has a code (as the protobuf renderer does).
void AppendCode(const cds::v1::Code& code, std::string* out) {
  if (code.code().empty()) return;
  wire::AppendMessage(4, code.SerializeAsString(), out);
}

void AppendReferences(const std::vector<cds::v1::Reference>& references, std::string* out) {
  for (const cds::v1::Reference& r : references) wire::AppendMessage(11, r.SerializeAsString(), out);
}

}  // namespace

bool WireFragments::Covers(const CompiledRuleSet& rs) const {
  return hypotheses.size() == rs.hypotheses.size() && actions.size() == rs.actions.size() &&
         evidence.size() == rs.evidence.size();
}

void BuildWireFragments(CompiledRuleSet* rs) {
  WireFragments& w = rs->wire;
  w = WireFragments();
  std::string* b = &w.bytes;
  w.rule_set_ref = Add(b, [&](std::string* out) {
    wire::AppendString(1, rs->name, out);
    wire::AppendString(2, rs->version, out);
    wire::AppendString(3, rs->digest, out);
    if (rs->ontology != nullptr) wire::AppendString(4, rs->ontology->release(), out);
  });
  w.disclaimer = Add(b, [&](std::string* out) { wire::AppendString(6, rs->disclaimer, out); });
  w.hypotheses.reserve(rs->hypotheses.size());
  for (const CompiledHypothesis& h : rs->hypotheses) {
    WireFragments::Hypothesis f;
    f.head = Add(b, [&](std::string* out) {
      wire::AppendInt32(2, cds::v1::DIAGNOSIS, out);
      wire::AppendString(3, h.id, out);
      AppendCode(h.code, out);
      wire::AppendString(5, h.title, out);
      wire::AppendString(6, h.detail, out);
      wire::AppendInt32(7, cds::v1::INFO, out);
    });
    f.pretest = Add(b, [&](std::string* out) { wire::AppendDouble(9, h.pretest_probability, out); });
    f.references = Add(b, [&](std::string* out) { AppendReferences(h.references, out); });
    w.hypotheses.push_back(f);
  }
  w.actions.reserve(rs->actions.size());
  for (const CompiledAction& a : rs->actions) {
    WireFragments::Action f;
    f.head = Add(b, [&](std::string* out) {
      wire::AppendInt32(2, a.kind, out);
      wire::AppendString(3, a.id, out);
      AppendCode(a.code, out);
      wire::AppendString(5, a.title, out);
    });
    f.detail = Add(b, [&](std::string* out) { wire::AppendString(6, a.detail, out); });
    f.urgency = Add(b, [&](std::string* out) { wire::AppendInt32(7, a.urgency, out); });
    f.references = Add(b, [&](std::string* out) { AppendReferences(a.references, out); });
    f.evidence_rule_id = Add(b, [&](std::string* out) { wire::AppendString(1, a.id, out); });
    f.evidence_source = Add(b, [&](std::string* out) { wire::AppendString(6, a.source, out); });
    w.actions.push_back(f);
  }
  w.evidence.reserve(rs->evidence.size());
  for (const CompiledEvidence& e : rs->evidence) {
    WireFragments::Evidence f;
    f.rule_id = Add(b, [&](std::string* out) { wire::AppendString(1, e.id, out); });
    f.source = Add(b, [&](std::string* out) { wire::AppendString(6, e.source, out); });
    w.evidence.push_back(f);
  }
  b->shrink_to_fit();
}

}  // namespace cds::compiler
