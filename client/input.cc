#include "client/input.h"

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "google/protobuf/io/tokenizer.h"
#include "google/protobuf/text_format.h"
#include "google/protobuf/util/json_util.h"

namespace cds::cli {
namespace {

enum class Format { kJson, kText, kUnknown };

Format FormatOf(const std::string& path) {
  const std::string lower = absl::AsciiStrToLower(path);
  if (absl::EndsWith(lower, ".json")) return Format::kJson;
  if (absl::EndsWith(lower, ".textproto") || absl::EndsWith(lower, ".txtpb") ||
      absl::EndsWith(lower, ".pbtxt")) {
    return Format::kText;
  }
  return Format::kUnknown;
}

// Keeps the parser's messages (with line and column) instead of printing them.
class CollectErrors : public google::protobuf::io::ErrorCollector {
 public:
  void AddError(int line, google::protobuf::io::ColumnNumber column,
                const std::string& message) override {
    errors_.push_back(absl::StrCat("line ", line + 1, ":", column + 1, ": ", message));
  }
  void AddWarning(int, google::protobuf::io::ColumnNumber, const std::string&) override {}
  std::string Text() const { return absl::StrJoin(errors_, "; "); }

 private:
  std::vector<std::string> errors_;
};

// "" on success, else the parser's reason.
std::string Parse(Format format, const std::string& content, google::protobuf::Message* out) {
  if (format == Format::kJson) {
    google::protobuf::util::JsonParseOptions options;
    options.ignore_unknown_fields = false;  // a typo must not silently drop a finding
    const auto status = google::protobuf::util::JsonStringToMessage(content, out, options);
    return status.ok() ? "" : std::string(status.message());
  }
  google::protobuf::TextFormat::Parser parser;
  CollectErrors errors;
  parser.RecordErrorsTo(&errors);
  if (parser.ParseFromString(content, out)) return "";
  const std::string text = errors.Text();
  return text.empty() ? "not valid text format" : text;
}

}  // namespace

absl::StatusOr<cds::v1::EvaluateRequest> ParseEvaluateInput(const std::string& path,
                                                            const std::string& content) {
  const Format format = FormatOf(path);
  if (format == Format::kUnknown) {
    return absl::InvalidArgumentError(absl::StrCat(
        path, ": unknown file type (use .json, or .textproto / .txtpb / .pbtxt for text format)"));
  }
  cds::v1::EvaluateRequest request;
  const std::string request_error = Parse(format, content, &request);
  if (request_error.empty()) return request;
  cds::v1::Patient patient;
  const std::string patient_error = Parse(format, content, &patient);
  if (patient_error.empty()) {
    cds::v1::EvaluateRequest from_patient;
    *from_patient.mutable_patient() = std::move(patient);
    return from_patient;
  }
  return absl::InvalidArgumentError(
      absl::StrCat(path, ": not a valid Patient (", patient_error,
                   ") nor EvaluateRequest (", request_error, ")"));
}

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  std::error_code error;
  if (std::filesystem::is_directory(path, error)) {
    return absl::NotFoundError(absl::StrCat("cannot read ", path, ": is a directory"));
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    return absl::NotFoundError(absl::StrCat("cannot read ", path, ": ", std::strerror(errno)));
  }
  std::ostringstream content;
  content << in.rdbuf();
  if (in.bad()) return absl::NotFoundError(absl::StrCat("cannot read ", path));
  return content.str();
}

absl::StatusOr<cds::v1::EvaluateRequest> ReadEvaluateInput(const std::string& path) {
  absl::StatusOr<std::string> content = ReadFile(path);
  if (!content.ok()) return content.status();
  return ParseEvaluateInput(path, *content);
}

}  // namespace cds::cli
