#pragma once

// The rule author's offline toolchain behind `cdsctl rules ...`: check (compile + lint +
// manifest), test (embedded and extra cases), diff (what an update changes on a set of
// cases), keygen and sign. Runs exactly the compiler, engine and bundle code the server
// runs. Each returns a cdsctl exit code (cli.h) and writes to `out` / `err`.

#include <ostream>
#include <string>

namespace cds::cli {

// Compiles DIR and prints every issue (errors and lint warnings), then the state of its
// MANIFEST (missing, matching, or stale). `keys_dir` (optional) also checks the signature.
int RulesCheck(const std::string& dir, const std::string& keys_dir, std::ostream& out,
               std::ostream& err);

// Runs DIR's embedded cases and, with `cases_dir`, the cases of every RuleSetTests text file
// (*.textproto) in it.
int RulesTest(const std::string& dir, const std::string& cases_dir, std::ostream& out,
              std::ostream& err);

// For each case (both versions' embedded cases and, with `cases_dir`, its RuleSetTests files
// and example patients / requests), how the diagnoses' ranks and probabilities and the
// actions change from OLD to NEW.
int RulesDiff(const std::string& old_dir, const std::string& new_dir,
              const std::string& cases_dir, std::ostream& out, std::ostream& err);

// Writes PREFIX.key (private, mode 0600) and PREFIX.pub; refuses to overwrite.
int RulesKeygen(const std::string& prefix, std::ostream& out, std::ostream& err);

// Compiles and tests DIR (refusing a failing version), then writes DIR/MANIFEST and,
// last, DIR/MANIFEST.sig signed with the private key in `key_path`.
int RulesSign(const std::string& dir, const std::string& key_path, const std::string& author,
              std::ostream& out, std::ostream& err);

}  // namespace cds::cli
