// Writes the request fuzzer's seed corpus: each input named on the command line (a
// cds.v1.Patient or EvaluateRequest, JSON or text format, as `cdsctl evaluate` reads it)
// serialized as a binary cds.v1.EvaluateRequest into OUT_DIR/<input's file name>.bin.
// A bare patient gets rule_set "ipex". fuzz/README.md has the command that made
// fuzz/corpus/request_fuzzer/.
//
//   make_request_seeds OUT_DIR INPUT...

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>

#include "cds/v1/service.pb.h"
#include "client/input.h"

int main(int argc, char** argv) {
  namespace fs = std::filesystem;
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s OUT_DIR INPUT...\n", argv[0]);
    return 2;
  }
  const fs::path out_dir = argv[1];
  for (int i = 2; i < argc; ++i) {
    absl::StatusOr<cds::v1::EvaluateRequest> request = cds::cli::ReadEvaluateInput(argv[i]);
    if (!request.ok()) {
      std::fprintf(stderr, "%s: %s\n", argv[i], std::string(request.status().message()).c_str());
      return 1;
    }
    if (request->rule_set().empty()) request->set_rule_set("ipex");
    std::string bytes;
    request->SerializeToString(&bytes);
    const fs::path out = out_dir / (fs::path(argv[i]).filename().string() + ".bin");
    std::ofstream(out, std::ios::binary) << bytes;
    std::printf("%s: %zu bytes\n", out.c_str(), bytes.size());
  }
  return 0;
}
