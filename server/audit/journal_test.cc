#include "server/audit/journal.h"

#include <string>

#include "absl/time/time.h"
#include "gtest/gtest.h"

namespace cds::audit {
namespace {

AuditRecord MakeRecord(int64_t id) {
  AuditRecord r;
  r.id = id;
  r.time = absl::FromUnixMicros(1700000000000000 + id);
  r.caller = "alice";
  r.method = "/cds.v1.DecisionSupport/Evaluate";
  r.rule_set = "ipex@1.1.0";
  r.digest = "sha256:00ff";
  r.pseudonym = std::string(64, 'a');
  r.evaluation_id = "e-" + std::to_string(id);
  r.top_suggestions = "ipex,foxp3";
  r.status_code = static_cast<int>(id % 17);
  r.latency_us = -id;  // any value survives, negative ones too
  return r;
}

std::string Frames(int64_t from, int64_t to) {
  std::string out;
  for (int64_t id = from; id <= to; ++id) AppendJournalFrame(MakeRecord(id), &out);
  return out;
}

TEST(Crc32cTest, MatchesTheCheckValue) {
  EXPECT_EQ(Crc32c("123456789"), 0xe3069283u);
  EXPECT_EQ(Crc32c(""), 0u);
}

// Bit by bit, as the polynomial defines it: the fast paths (table, SSE 4.2) must agree.
uint32_t Crc32cBitwise(const std::string& data) {
  uint32_t crc = 0xffffffffu;
  for (const char c : data) {
    crc ^= static_cast<unsigned char>(c);
    for (int bit = 0; bit < 8; ++bit) crc = (crc >> 1) ^ (0x82f63b78u & (0u - (crc & 1u)));
  }
  return crc ^ 0xffffffffu;
}

TEST(Crc32cTest, AgreesWithTheBitwiseDefinitionAtEveryLength) {
  std::string data;
  for (int n = 0; n < 300; ++n) {
    EXPECT_EQ(Crc32c(data), Crc32cBitwise(data)) << n;
    data.push_back(static_cast<char>(n * 131 + 7));
  }
}

TEST(JournalTest, FramesRoundTripEveryField) {
  const std::string bytes = Frames(1, 3);
  const JournalContents contents = ParseJournal(bytes, true);
  EXPECT_EQ(contents.valid_bytes, bytes.size());
  EXPECT_FALSE(contents.damaged);
  ASSERT_EQ(contents.records.size(), 3u);
  for (int64_t id = 1; id <= 3; ++id) {
    const AuditRecord& got = contents.records[id - 1];
    const AuditRecord want = MakeRecord(id);
    EXPECT_EQ(got.id, want.id);
    EXPECT_EQ(got.time, want.time);
    EXPECT_EQ(got.caller, want.caller);
    EXPECT_EQ(got.method, want.method);
    EXPECT_EQ(got.rule_set, want.rule_set);
    EXPECT_EQ(got.digest, want.digest);
    EXPECT_EQ(got.pseudonym, want.pseudonym);
    EXPECT_EQ(got.evaluation_id, want.evaluation_id);
    EXPECT_EQ(got.top_suggestions, want.top_suggestions);
    EXPECT_EQ(got.status_code, want.status_code);
    EXPECT_EQ(got.latency_us, want.latency_us);
  }
}

TEST(JournalTest, ATornTailEndsTheRecordsWithoutDamage) {
  const std::string whole = Frames(1, 3);
  const size_t two = Frames(1, 2).size();
  // Every cut inside the third frame: the first two remain.
  for (size_t cut = two; cut < whole.size(); ++cut) {
    const JournalContents contents = ParseJournal(whole.substr(0, cut), true);
    ASSERT_EQ(contents.records.size(), 2u) << cut;
    EXPECT_EQ(contents.valid_bytes, two);
    EXPECT_FALSE(contents.damaged) << cut;
  }
  // Zeros after the last frame (a power failure before the data reached the disk).
  const JournalContents zeros = ParseJournal(Frames(1, 2) + std::string(4096, '\0'), true);
  EXPECT_EQ(zeros.records.size(), 2u);
  EXPECT_FALSE(zeros.damaged);
}

TEST(JournalTest, ACorruptedFrameBeforeValidOnesIsDamage) {
  std::string bytes = Frames(1, 3);
  const size_t first = Frames(1, 1).size();
  bytes[first + 30] ^= 0x01;  // inside the second frame's payload: its CRC no longer matches
  const JournalContents contents = ParseJournal(bytes, true);
  EXPECT_EQ(contents.records.size(), 1u);
  EXPECT_EQ(contents.valid_bytes, first);
  EXPECT_TRUE(contents.damaged);
  // Readers that only want what is valid stop there without looking further.
  EXPECT_FALSE(ParseJournal(bytes, false).damaged);
}

TEST(JournalTest, TheLastFrameCorruptedIsATornTail) {
  std::string bytes = Frames(1, 3);
  bytes[bytes.size() - 3] ^= 0x40;
  const JournalContents contents = ParseJournal(bytes, true);
  EXPECT_EQ(contents.records.size(), 2u);
  EXPECT_FALSE(contents.damaged);
}

TEST(JournalTest, IdsMustIncrease) {
  // Frames written after the journal was emptied under a reader: never mixed with older ones.
  const JournalContents contents = ParseJournal(Frames(5, 6) + Frames(1, 2), false);
  ASSERT_EQ(contents.records.size(), 2u);
  EXPECT_EQ(contents.records[1].id, 6);
}

}  // namespace
}  // namespace cds::audit
