#include "server/ontology/ontology.h"

#include <algorithm>
#include <fstream>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace cds::ontology {
namespace {

using ::testing::UnorderedElementsAre;

constexpr char kTable[] =
    "# comment\n"
    "id\tlabel\tparents\talt_ids\tstatus\n"
    "HP:0000001\tAll\t\t\tlive\n"
    "HP:0000010\tDiarrhea\tHP:0000001\t\tlive\n"
    "HP:0000011\tChronic diarrhea\tHP:0000010\tHP:0000099\tlive\n"
    "HP:0000012\tProtracted diarrhea\tHP:0000011\t\tlive\n"
    "HP:0000013\tIntractable diarrhea\tHP:0000011,HP:0000010\t\tlive\n"
    "HP:0000050\tobsolete Old diarrhea\t\t\tobsolete>HP:0000012\n"
    "HP:0000051\tobsolete Gone\t\t\tobsolete\n";

std::vector<std::string> Ids(const Ontology& o, const std::vector<int32_t>& terms) {
  std::vector<std::string> out;
  for (int32_t t : terms) out.push_back(o.Id(t));
  return out;
}

TEST(OntologyTest, ParsesHierarchyAndResolvesAliases) {
  auto parsed = Ontology::Parse(kTable, "hp-test");
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  const Ontology& o = **parsed;
  EXPECT_EQ(o.release(), "hp-test");
  EXPECT_EQ(o.size(), 5u);
  const int32_t chronic = *o.Resolve("HP:0000011");
  EXPECT_EQ(o.Label(chronic), "Chronic diarrhea");
  EXPECT_THAT(Ids(o, o.DescendantsOrSelf(chronic)),
              UnorderedElementsAre("HP:0000011", "HP:0000012", "HP:0000013"));
  EXPECT_THAT(Ids(o, o.AncestorsOrSelf(*o.Resolve("HP:0000013"))),
              UnorderedElementsAre("HP:0000013", "HP:0000011", "HP:0000010", "HP:0000001"));
  EXPECT_EQ(o.Resolve("HP:0000099"), chronic);                 // alternative id
  EXPECT_EQ(o.Id(*o.Resolve("HP:0000050")), "HP:0000012");      // obsolete, replaced
  EXPECT_FALSE(o.Resolve("HP:0000051").has_value());            // obsolete, no replacement
  EXPECT_TRUE(o.Knows("HP:0000051"));
  EXPECT_FALSE(o.IsLive("HP:0000051"));
  EXPECT_FALSE(o.Knows("HP:9999999"));
  EXPECT_THAT(o.AliasesOf(chronic), UnorderedElementsAre("HP:0000099"));
}

TEST(OntologyTest, RejectsMalformedTables) {
  EXPECT_FALSE(Ontology::Parse("HP:1\tA\n", "x").ok());
  EXPECT_FALSE(Ontology::Parse("HP:1\tA\tHP:2\t\tlive\n", "x").ok());
  EXPECT_FALSE(Ontology::Parse("HP:1\tA\t\t\tweird\n", "x").ok());
  EXPECT_FALSE(Ontology::Parse("HP:1\tA\t\t\tlive\nHP:1\tB\t\t\tlive\n", "x").ok());
}

TEST(OntologyTest, LoadsTheShippedRelease) {
  auto loaded = Ontology::Load(std::string(CDS_SOURCE_DIR) + "/rules/ontology/hp-2025-03-03.tsv");
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  const Ontology& o = **loaded;
  EXPECT_EQ(o.release(), "hp-2025-03-03");
  EXPECT_GT(o.size(), 19000u);
  // Protracted and chronic diarrhoea sit under diarrhoea.
  const auto diarrhea = o.Resolve("HP:0002014");
  ASSERT_TRUE(diarrhea.has_value());
  const auto below = Ids(o, o.DescendantsOrSelf(*diarrhea));
  EXPECT_NE(std::find(below.begin(), below.end(), "HP:0004385"), below.end());
  EXPECT_NE(std::find(below.begin(), below.end(), "HP:0002028"), below.end());
}

TEST(HpoNumberTest, OnlyTheExactSpellingHasANumber) {
  EXPECT_EQ(HpoNumber("HP:0001234"), 1234);
  EXPECT_EQ(HpoNumber("HP:0000000"), 0);
  EXPECT_EQ(HpoNumber("HP:6001202"), 6001202);
  for (const char* other : {"HP:001234", "HP:00012345", "hp:0001234", "HP0001234", "HP:000123a",
                            "HP:-001234", "HPO:001234", "", "HP:"}) {
    EXPECT_EQ(HpoNumber(other), -1) << other;
  }
}

TEST(HpoNumberTest, MapFindsWhatWasInsertedAndNothingElse) {
  HpoNumberMap map;
  EXPECT_EQ(map.Find(5), nullptr);  // empty
  for (int32_t n = 0; n < 3000; n += 3) map.Insert(n, n * 2);
  map.Insert(6, -7);  // replaced
  EXPECT_EQ(map.size(), 1000u);
  for (int32_t n = 0; n < 3100; ++n) {
    const int32_t* value = map.Find(n);
    if (n % 3 != 0 || n >= 3000) {
      EXPECT_EQ(value, nullptr) << n;
    } else {
      ASSERT_NE(value, nullptr) << n;
      EXPECT_EQ(*value, n == 6 ? -7 : n * 2);
    }
  }
  EXPECT_EQ(map.Find(-1), nullptr);
}

// Knows looks "HP:nnnnnnn" ids up by number: it knows exactly the ids the shipped table
// lists (primary, alternative, obsolete), checked against the table itself.
TEST(OntologyTest, KnowsEveryIdOfTheShippedReleaseAndNoOther) {
  const std::string path = std::string(CDS_SOURCE_DIR) + "/rules/ontology/hp-2025-03-03.tsv";
  auto loaded = Ontology::Load(path);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  const Ontology& o = **loaded;
  std::set<std::string> listed;  // column 1 (id) and column 4 (alternative ids)
  std::ifstream in(path);
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty() || line[0] == '#' || absl::StartsWith(line, "id\t")) continue;
    const std::vector<std::string> columns = absl::StrSplit(line, '\t');
    ASSERT_GE(columns.size(), 4u) << line;
    listed.insert(columns[0]);
    for (absl::string_view alt : absl::StrSplit(columns[3], ',', absl::SkipEmpty())) {
      listed.emplace(alt);
    }
  }
  ASSERT_GT(listed.size(), 19000u);
  for (const std::string& id : listed) EXPECT_TRUE(o.Knows(id)) << id;
  int unknown = 0;
  for (int32_t n = 0; n < 7000000; n += 37) {  // ~190 000 numbers across the whole range
    const std::string id = absl::StrFormat("HP:%07d", n);
    EXPECT_EQ(o.Knows(id), listed.count(id) > 0) << id;
    unknown += listed.count(id) == 0 ? 1 : 0;
  }
  EXPECT_GT(unknown, 180000);
  EXPECT_FALSE(o.Knows("hp:0002014"));  // not the exact spelling: looked up as a string
  EXPECT_TRUE(o.Knows("HP:0002014"));
}

}  // namespace
}  // namespace cds::ontology
