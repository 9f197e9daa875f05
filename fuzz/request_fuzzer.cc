// Fuzz target: the request path. The input is a serialized cds.v1.EvaluateRequest; it is
// validated exactly as DecisionService.Evaluate validates it (ValidateEvaluateRequest:
// CheckEvaluateRequest and the google.rpc.BadRequest details) and, when valid, evaluated by
// the engine against the bundled ipex rule set (the highest version under rules/ipex/,
// compiled once), with explanations on, and the response serialized.

#include <cstddef>
#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "cds/v1/service.pb.h"
#include "fuzz/fuzz_util.h"
#include "server/engine/engine.h"
#include "server/service/request_validation.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const cds::compiler::CompiledRuleSet& rule_set = cds::fuzz::BundledIpexRuleSet();
  cds::v1::EvaluateRequest request;
  if (!request.ParseFromArray(data, static_cast<int>(size))) return 0;
  const absl::Status valid = cds::service::ValidateEvaluateRequest(request);
  if (!valid.ok()) return 0;
  cds::v1::EvaluateResponse response;
  const absl::Status evaluated =
      cds::engine::Evaluate(rule_set, request.patient(), cds::engine::EvaluateOptions{}, &response);
  if (evaluated.ok()) {
    std::string bytes;
    response.SerializeToString(&bytes);
  }
  return 0;
}
