#include "client/screen.h"

#include <deque>
#include <memory>
#include <string>
#include <thread>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
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

ScreenItem ParseScreenLine(absl::string_view line, int line_number,
                           const ScreenDefaults& defaults) {
  ScreenItem item;
  item.line = line_number;
  // ".json" picks the JSON parser; the parser's reason is dropped because it can quote the
  // line's values.
  absl::StatusOr<cds::v1::EvaluateRequest> request =
      ParseEvaluateInput("line.json", std::string(line));
  if (!request.ok()) {
    item.error =
        absl::StrCat("line ", line_number, ": not a cds.v1.Patient or cds.v1.EvaluateRequest in JSON");
    return item;
  }
  if (defaults.rule_set_override.has_value()) request->set_rule_set(*defaults.rule_set_override);
  if (request->rule_set().empty()) request->set_rule_set(defaults.rule_set);
  if (defaults.version.has_value()) request->set_version(*defaults.version);
  if (defaults.label.has_value()) request->set_label(*defaults.label);
  item.request = *std::move(request);
  return item;
}

int64_t CountScreenLines(std::istream& in) {
  int64_t count = 0;
  std::string line;
  while (std::getline(in, line)) {
    if (!absl::StripAsciiWhitespace(line).empty()) ++count;
  }
  return count;
}

namespace {

// The lines read and not yet reported, in input order, from the thread that reads the input
// and sends the requests to the one that reads the results and writes them out.
class LinesAhead {
 public:
  struct Line {
    int number = 0;
    bool sent = false;  // else `error` is its result
    std::string error;
  };

  // Blocks while kScreenLinesAhead lines wait.
  void Push(Line line) {
    absl::MutexLock lock(&mu_, absl::Condition(this, &LinesAhead::HasRoom));
    lines_.push_back(std::move(line));
  }
  // No more lines will come.
  void Close() {
    absl::MutexLock lock(&mu_);
    closed_ = true;
  }
  // The next line; false once closed and empty.
  bool Pop(Line* line) {
    absl::MutexLock lock(&mu_, absl::Condition(this, &LinesAhead::Ready));
    if (lines_.empty()) return false;
    *line = std::move(lines_.front());
    lines_.pop_front();
    return true;
  }

 private:
  bool HasRoom() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return lines_.size() < kScreenLinesAhead;
  }
  bool Ready() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return closed_ || !lines_.empty(); }

  absl::Mutex mu_;
  std::deque<Line> lines_ ABSL_GUARDED_BY(mu_);
  bool closed_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace

grpc::Status Screen(cds::v1::DecisionSupport::Stub& stub, grpc::ClientContext* context,
                    std::istream& in, const ScreenDefaults& defaults, std::ostream& out,
                    ScreenSummary* summary) {
  std::unique_ptr<grpc::ClientReaderWriter<cds::v1::StreamEvaluateRequest,
                                           cds::v1::StreamEvaluateResponse>>
      stream = stub.EvaluateStream(context);
  LinesAhead ahead;
  // Reads the input and sends: on a thread of its own, because writes block when the server
  // stops reading (HTTP/2 flow control) while the loop below drains the results. A line
  // is queued before its request is written, so the results are always read in order.
  std::thread sender([&] {
    cds::v1::StreamEvaluateRequest message;
    std::string text;
    int number = 0;
    while (std::getline(in, text)) {
      ++number;
      if (absl::StripAsciiWhitespace(text).empty()) continue;
      ScreenItem item = ParseScreenLine(text, number, defaults);
      const bool sent = item.request.has_value();
      ahead.Push({number, sent, std::move(item.error)});
      if (!sent) continue;
      message.set_correlation_id(std::to_string(number));
      *message.mutable_request() = *std::move(item.request);
      if (!stream->Write(message)) break;  // the stream broke; Finish() says why
    }
    ahead.Close();
    stream->WritesDone();
  });
  cds::v1::StreamEvaluateResponse result;
  bool broken = false;
  LinesAhead::Line line;
  while (ahead.Pop(&line)) {
    ++summary->lines;
    if (!line.sent) {
      cds::v1::StreamEvaluateResponse local;
      local.set_correlation_id(std::to_string(line.number));
      local.mutable_error()->set_code(static_cast<int>(grpc::StatusCode::INVALID_ARGUMENT));
      local.mutable_error()->set_message(line.error);
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
  sender.join();
  grpc::Status status = stream->Finish();
  if (status.ok() && broken) {
    status = grpc::Status(grpc::StatusCode::INTERNAL, "the server sent fewer results than requests");
  }
  return status;
}

}  // namespace cds::cli
