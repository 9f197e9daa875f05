#pragma once

// Evaluates one patient against a compiled rule set. Pure and thread-safe: no I/O, no
// locks, no gRPC; the rule set is shared read-only and every call has its own inputs.
//
// Model (the likelihood-ratio model LIRICAL uses): each hypothesis starts at its pretest
// probability; each evidence item whose condition is TRUE multiplies its odds by LR+, each
// whose condition is FALSE by LR-, and an UNKNOWN one leaves them alone. Within a
// correlated group only the item with the largest |log LR| counts. The hypotheses form a
// differential with a remaining "none of these" class holding the rest of the pretest
// mass, so P(h | findings) = p_h LR_h / (sum_j p_j LR_j + p_none); then the hypothesis'
// optional ceiling applies.
//
// Ranking: ALERTs (urgency, then priority, then id), then DIAGNOSES (posterior descending,
// then id), then TESTs, REFERRALs and TREATMENTs together (urgency descending, priority
// ascending, then id).

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "cds/v1/service.pb.h"
#include "server/compiler/compiled_rule_set.h"
#include "server/engine/evaluation.h"

namespace cds::engine {

struct EvaluateOptions {
  // Fill Suggestion.evidence and references. Off for throughput-only callers.
  bool explain = true;
  // Refuse a malformed patient first (ValidatePatient). False only for a caller that has
  // just run CheckPatient (patient_check.h) on this very patient and found nothing, as the
  // service does: the same rules are not run twice per call.
  bool validate = true;
  // With `explain`: the full trace, with a readable description of every item (each
  // condition that held for an action; measured values against their limits for labs).
  // Off: compact explanations, whose items carry the rule id, effect, likelihood ratio,
  // source line and matched codes but no description (the rule set's text, by rule id and
  // version, says what each rule is); an action gets one item.
  bool full_trace = true;
};

// Validates `patient` (INVALID_ARGUMENT naming the field, never echoing patient data; see
// EvaluateOptions::validate) and evaluates it. On success fills `response` (suggestions, warnings, rule_set ref,
// disclaimer); the caller sets evaluation_id and evaluated_at.
absl::Status Evaluate(const compiler::CompiledRuleSet& rule_set, const cds::v1::Patient& patient,
                      const EvaluateOptions& options, cds::v1::EvaluateResponse* response);

// The same evaluation into `evaluation` (reused between calls: nothing is allocated once its
// arrays have grown), for a caller that renders it itself, e.g. straight to wire format
// (Evaluation::WireSize / WriteWire). `evaluation->ToProto` gives the response above.
// `rule_set` and `patient` must outlive the use of `evaluation`.
absl::Status Evaluate(const compiler::CompiledRuleSet& rule_set, const cds::v1::Patient& patient,
                      const EvaluateOptions& options, Evaluation* evaluation);

// Checks a patient for malformed input without evaluating it: the rules of
// patient_check.h (CheckPatient), reported as INVALID_ARGUMENT "<field> <description>" for
// the first problem found. The message names the field path and the rule only.
absl::Status ValidatePatient(const cds::v1::Patient& patient);

}  // namespace cds::engine
