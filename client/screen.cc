#include "client/screen.h"

#include <memory>
#include <thread>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "client/input.h"
#include "google/protobuf/util/json_util.h"

namespace cds::cli {
namespace {

void WriteJsonLine(const cds::v1::StreamEvaluateResponse& result, std::ostream& out) {
  google::protobuf::util::JsonPrintOptions json;
  json.add_whitespace = false;
  std::string text;
  if (!google::protobuf::util::MessageToJsonString(result, &text, json).ok()) {
    text = absl::StrCat("{\"correlationId\":\"", result.correlation_id(),
                        "\",\"error\":{\"code\":13,\"message\":\"cannot print the result\"}}");
  }
  out << text << "\n";
}

}  // namespace

std::vector<ScreenItem> ParseScreenInput(const std::string& content,
                                         const ScreenDefaults& defaults) {
  std::vector<ScreenItem> items;
  int line_number = 0;
  for (absl::string_view line : absl::StrSplit(content, '\n')) {
    ++line_number;
    if (absl::StripAsciiWhitespace(line).empty()) continue;
    ScreenItem item;
    item.line = line_number;
    // ".json" picks the JSON parser; the parser's reason is dropped because it can quote
    // the line's values.
    absl::StatusOr<cds::v1::EvaluateRequest> request =
        ParseEvaluateInput("line.json", std::string(line));
    if (!request.ok()) {
      item.error = absl::StrCat("line ", line_number,
                                ": not a cds.v1.Patient or cds.v1.EvaluateRequest in JSON");
    } else {
      if (defaults.rule_set_override.has_value()) {
        request->set_rule_set(*defaults.rule_set_override);
      }
      if (request->rule_set().empty()) request->set_rule_set(defaults.rule_set);
      if (defaults.version.has_value()) request->set_version(*defaults.version);
      if (defaults.label.has_value()) request->set_label(*defaults.label);
      item.request = *std::move(request);
    }
    items.push_back(std::move(item));
  }
  return items;
}

grpc::Status Screen(cds::v1::DecisionSupport::Stub& stub, grpc::ClientContext* context,
                    const std::vector<ScreenItem>& items, std::ostream& out,
                    ScreenSummary* summary) {
  std::unique_ptr<grpc::ClientReaderWriter<cds::v1::StreamEvaluateRequest,
                                           cds::v1::StreamEvaluateResponse>>
      stream = stub.EvaluateStream(context);
  // Writes block when the server stops reading (HTTP/2 flow control), so the writer has a
  // thread of its own and the reader below keeps draining responses.
  std::thread writer([&] {
    cds::v1::StreamEvaluateRequest message;
    for (const ScreenItem& item : items) {
      if (!item.request.has_value()) continue;
      message.set_correlation_id(std::to_string(item.line));
      *message.mutable_request() = *item.request;
      if (!stream->Write(message)) return;  // the stream broke; Finish() says why
    }
    stream->WritesDone();
  });
  cds::v1::StreamEvaluateResponse result;
  bool broken = false;
  for (const ScreenItem& item : items) {
    if (!item.request.has_value()) {
      cds::v1::StreamEvaluateResponse local;
      local.set_correlation_id(std::to_string(item.line));
      local.mutable_error()->set_code(static_cast<int>(grpc::StatusCode::INVALID_ARGUMENT));
      local.mutable_error()->set_message(item.error);
      WriteJsonLine(local, out);
      ++summary->bad_lines;
      continue;
    }
    if (broken || !stream->Read(&result)) {
      broken = true;
      continue;
    }
    if (result.has_response()) {
      ++summary->ok;
    } else {
      ++summary->patient_errors;
    }
    WriteJsonLine(result, out);
  }
  // Drain anything unexpected so Finish() does not wait on unread messages.
  while (!broken && stream->Read(&result)) {
  }
  writer.join();
  grpc::Status status = stream->Finish();
  if (status.ok() && broken) {
    status = grpc::Status(grpc::StatusCode::INTERNAL, "the server sent fewer results than requests");
  }
  return status;
}

}  // namespace cds::cli
