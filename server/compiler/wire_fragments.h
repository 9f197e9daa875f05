#pragma once

// The constant parts of an EvaluateResponse in protobuf wire format, encoded once per rule
// set: per hypothesis, action and evidence item the fields that never change between calls
// (rule id, kind, code, title, detail, urgency, pretest probability, references, source).
// The engine's wire renderer (server/engine/evaluation.h) copies these and encodes only the
// per-call numbers and the patient's codes, producing the same bytes protobuf's serializer
// writes for the response built field by field. Also the small encoders both sides use.

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "absl/strings/string_view.h"

namespace cds::compiler {

struct CompiledRuleSet;

// Protobuf wire-format primitives (https://protobuf.dev/programming-guides/encoding/).
namespace wire {

enum WireType : uint32_t { kVarint = 0, kFixed64 = 1, kLengthDelimited = 2 };

constexpr uint32_t Tag(uint32_t field, WireType type) { return field << 3 | type; }

inline size_t VarintSize(uint64_t v) {
  size_t n = 1;
  while (v >= 0x80) {
    v >>= 7;
    ++n;
  }
  return n;
}

inline char* WriteVarint(uint64_t v, char* out) {
  while (v >= 0x80) {
    *out++ = static_cast<char>(v | 0x80);
    v >>= 7;
  }
  *out++ = static_cast<char>(v);
  return out;
}

// Copies `bytes` to `out`. Most fragments (a rule id, a source line, a code) are under 33
// bytes: those are copied inline with two overlapping 8- or 16-byte moves instead of a call
// to memcpy, which costs more than the copy at these sizes (a response has hundreds).
// Source and destination never overlap.
inline char* WriteBytes(absl::string_view bytes, char* out) {
  const size_t n = bytes.size();
  const char* in = bytes.data();
  if (n > 32) {
    std::memcpy(out, in, n);
  } else if (n > 16) {
    uint64_t head[2], tail[2];
    std::memcpy(head, in, 16);
    std::memcpy(tail, in + n - 16, 16);
    std::memcpy(out, head, 16);
    std::memcpy(out + n - 16, tail, 16);
  } else if (n >= 8) {
    uint64_t head, tail;
    std::memcpy(&head, in, 8);
    std::memcpy(&tail, in + n - 8, 8);
    std::memcpy(out, &head, 8);
    std::memcpy(out + n - 8, &tail, 8);
  } else {
    for (size_t i = 0; i < n; ++i) out[i] = in[i];
  }
  return out + n;
}

// A length-delimited field of `size` bytes: its tag and length prefix.
inline size_t LengthDelimitedSize(size_t size) { return 1 + VarintSize(size) + size; }

// A double (fixed64, little-endian IEEE 754), tag included: always 9 bytes for fields 1-15.
inline char* WriteDouble(uint32_t field, double v, char* out) {
  *out++ = static_cast<char>(Tag(field, kFixed64));
  uint64_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  for (int i = 0; i < 8; ++i) *out++ = static_cast<char>(bits >> (8 * i));
  return out;
}

// Appending forms, for building fragments.
void AppendVarint(uint64_t v, std::string* out);
// A string or bytes field, written (as proto3 does) only when non-empty.
void AppendString(uint32_t field, absl::string_view value, std::string* out);
// An enum or int32 field, written only when non-zero (negative values take 10 bytes).
void AppendInt32(uint32_t field, int32_t value, std::string* out);
void AppendDouble(uint32_t field, double value, std::string* out);
// A message field from its serialized bytes (written even when empty: the field is set).
void AppendMessage(uint32_t field, absl::string_view serialized, std::string* out);

}  // namespace wire

// A byte range of WireFragments::bytes.
struct Fragment {
  uint32_t offset = 0;
  uint32_t size = 0;
};

struct WireFragments {
  // Field numbers refer to cds.v1.EvaluateResponse, Suggestion, Evidence and RuleSetRef.
  struct Hypothesis {
    Fragment head;        // Suggestion 2-7: kind DIAGNOSIS, rule_id, code, title, detail, urgency
    Fragment pretest;     // Suggestion 9
    Fragment references;  // Suggestion 11, every reference
  };
  struct Action {
    Fragment head;     // Suggestion 2-5: kind, rule_id, code, title
    Fragment detail;   // Suggestion 6 (an informative test's detail is extended per call)
    Fragment urgency;  // Suggestion 7
    Fragment references;
    Fragment evidence_rule_id;  // Evidence 1 of the action's items
    Fragment evidence_source;   // Evidence 6 of the action's items
  };
  struct Evidence {
    Fragment rule_id;  // Evidence 1
    Fragment source;   // Evidence 6
  };

  absl::string_view operator[](Fragment f) const {
    return absl::string_view(bytes.data() + f.offset, f.size);
  }
  // True once BuildWireFragments ran for a rule set of these sizes.
  bool Covers(const CompiledRuleSet& rs) const;

  std::string bytes;
  Fragment rule_set_ref;  // RuleSetRef 1-4 (name, version, digest, ontology), no tag
  Fragment disclaimer;    // EvaluateResponse 6
  std::vector<Hypothesis> hypotheses;
  std::vector<Action> actions;
  std::vector<Evidence> evidence;
};

// Encodes rs->wire from the rest of the compiled rule set. Run by the compiler last (the
// digest included); run it again after changing any of the strings it encodes.
void BuildWireFragments(CompiledRuleSet* rs);

}  // namespace cds::compiler
