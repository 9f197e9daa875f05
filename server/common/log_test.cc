#include "server/common/log.h"

#include "gtest/gtest.h"

namespace cds::log {
namespace {

TEST(LogTest, LinesAreOneJsonObjectWithEscapedMessage) {
  EXPECT_EQ(FormatLine(Level::kWarning, "2026-11-23T23:50:00.000Z", "a \"b\"\\c\nd\x01"),
            "{\"time\":\"2026-11-23T23:50:00.000Z\",\"level\":\"WARNING\","
            "\"message\":\"a \\\"b\\\"\\\\c\\nd\\u0001\"}\n");
}

TEST(LogTest, ParsesLevelNamesInAnyCase) {
  Level level = Level::kInfo;
  EXPECT_TRUE(ParseLevel("debug", &level));
  EXPECT_EQ(level, Level::kDebug);
  EXPECT_TRUE(ParseLevel("ERROR", &level));
  EXPECT_EQ(level, Level::kError);
  EXPECT_TRUE(ParseLevel("Warning", &level));
  EXPECT_EQ(level, Level::kWarning);
  EXPECT_FALSE(ParseLevel("verbose", &level));
  EXPECT_EQ(level, Level::kWarning);
}

}  // namespace
}  // namespace cds::log
