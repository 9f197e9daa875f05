#pragma once

// cdsctl: the command-line client of cds-server, and the rule author's offline checks.
// See kHelp in cli.cc (`cdsctl --help`) for commands and exit codes.

#include <ostream>
#include <string>
#include <vector>

namespace cds::cli {

// Exit codes (documented in `cdsctl --help`).
enum ExitCode : int {
  kOk = 0,
  kFailed = 1,        // health NOT_SERVING, rules that fail to compile or fail a case
  kUsage = 2,         // bad command line
  kBadInput = 3,      // input file missing, unreadable or malformed
  kUnreachable = 4,   // server down, unreachable or too slow (UNAVAILABLE, DEADLINE_EXCEEDED)
  kServerError = 5,   // the server refused the request (NOT_FOUND, INVALID_ARGUMENT, ...)
};

// Runs one command; `args` excludes the program name. Output goes to `out`, errors to
// `err`. Returns the exit code.
int Run(const std::vector<std::string>& args, std::ostream& out, std::ostream& err);

}  // namespace cds::cli
