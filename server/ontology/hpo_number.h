#pragma once

// HPO term ids ("HP:" and seven digits) as numbers, and a flat map keyed by them. A call
// looks up each of a patient's ~30 codes; through a hash map of strings a lookup reads the
// map's control bytes, a 40-56 byte slot and often a heap block of its value, in tables of
// hundreds of KB (the ontology's 19 000 ids) that the rest of a server call has pushed out of
// the caches. Keyed by the number, a lookup reads one 8-byte slot of a table a few times
// smaller, and a value of one int32 lives in the slot itself.

#include <cstdint>
#include <vector>

#include "absl/strings/string_view.h"

namespace cds::ontology {

// The number of an HPO term id written exactly "HP:" and seven digits ("HP:0001234" ->
// 1234); -1 for anything else (which keeps its string lookups: only this exact spelling is
// looked up by number, so both lookups answer alike).
inline int32_t HpoNumber(absl::string_view id) {
  if (id.size() != 10 || id[0] != 'H' || id[1] != 'P' || id[2] != ':') return -1;
  int32_t number = 0;
  for (size_t i = 3; i < 10; ++i) {
    const char c = id[i];
    if (c < '0' || c > '9') return -1;
    number = number * 10 + (c - '0');
  }
  return number;
}

// A map from HPO term numbers to int32 values: open addressing with linear probing in one
// array kept at most half full. Built once, then read concurrently.
class HpoNumberMap {
 public:
  // Files `value` under `number` (>= 0), replacing any value there.
  void Insert(int32_t number, int32_t value) {
    if (2 * (size_ + 1) > slots_.size()) Rehash(slots_.empty() ? 64 : 2 * slots_.size());
    Slot& slot = slots_[Probe(number)];
    if (slot.key < 0) ++size_;
    slot = Slot{number, value};
  }
  // The value filed under `number`, or nullptr (also for a negative number).
  const int32_t* Find(int32_t number) const {
    if (number < 0 || slots_.empty()) return nullptr;
    const Slot& slot = slots_[Probe(number)];
    return slot.key == number ? &slot.value : nullptr;
  }
  size_t size() const { return size_; }

 private:
  struct Slot {
    int32_t key = -1;  // -1: empty
    int32_t value = 0;
  };

  // The slot holding `number`, or the empty one where it would go.
  size_t Probe(int32_t number) const {
    const size_t mask = slots_.size() - 1;
    // Fibonacci hashing: consecutive term numbers spread over the table.
    size_t i = static_cast<size_t>((static_cast<uint64_t>(number) * 0x9E3779B97F4A7C15u) >> 32) & mask;
    while (slots_[i].key >= 0 && slots_[i].key != number) i = (i + 1) & mask;
    return i;
  }
  void Rehash(size_t capacity) {
    std::vector<Slot> old = std::move(slots_);
    slots_.assign(capacity, Slot{});
    for (const Slot& slot : old) {
      if (slot.key >= 0) slots_[Probe(slot.key)] = slot;
    }
  }

  std::vector<Slot> slots_;  // a power of two in size
  size_t size_ = 0;
};

}  // namespace cds::ontology
