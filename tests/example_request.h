#pragma once

// A bundled example patient (client/examples/) as an EvaluateRequest for the ipex rule set,
// for integration tests that link cds_cli. Header-only: the shared test library links
// neither the CLI nor GoogleTest.

#include <string>

#include "absl/status/statusor.h"
#include "cds/v1/service.pb.h"
#include "client/input.h"
#include "gtest/gtest.h"

namespace cds::testing {

// `example` read through the CLI's own input reader; its patient's reference set to
// `reference`, which a test can look for wherever patient data must not appear.
inline cds::v1::EvaluateRequest ExampleIpexRequest(const std::string& example,
                                                   const std::string& reference) {
  absl::StatusOr<cds::v1::EvaluateRequest> input =
      cli::ReadEvaluateInput(std::string(CDS_SOURCE_DIR) + "/client/examples/" + example);
  EXPECT_TRUE(input.ok()) << input.status();
  cds::v1::EvaluateRequest request = input.ok() ? *input : cds::v1::EvaluateRequest();
  request.set_rule_set("ipex");
  request.mutable_patient()->set_reference(reference);
  return request;
}

}  // namespace cds::testing
