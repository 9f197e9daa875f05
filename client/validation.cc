#include "client/validation.h"

#include <algorithm>
#include <cmath>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "google/protobuf/util/json_util.h"

namespace cds::cli {
namespace {

double Ratio(int num, int den) { return den > 0 ? static_cast<double>(num) / den : 0.0; }

// Corpus measurement labels the rule sets know, with their LOINC codes.
const char* LoincForLabel(const std::string& name) {
  const std::string lower = absl::AsciiStrToLower(name);
  if (lower == "ige" || lower == "total ige" || lower == "serum ige") return "19113-0";
  if (lower == "eosinophils" || lower == "absolute eosinophil count" || lower == "aec") {
    return "711-2";
  }
  if (lower == "albumin") return "1751-7";
  return nullptr;
}

}  // namespace

cds::v1::Patient PatientFromCorpusCase(const cds::interop::CorpusCase& c) {
  cds::v1::Patient patient;
  patient.set_reference(c.id());
  if (c.sex() == "MALE") {
    patient.set_sex(cds::v1::MALE);
  } else if (c.sex() == "FEMALE") {
    patient.set_sex(cds::v1::FEMALE);
  } else {
    patient.set_sex(cds::v1::UNKNOWN_SEX);
  }
  double latest = -1;
  auto add = [&](const cds::interop::CorpusFeature& f, cds::v1::Finding::Status status) {
    auto* finding = patient.add_findings();
    finding->mutable_term()->set_system("HPO");
    finding->mutable_term()->set_code(f.hpo());
    finding->mutable_term()->set_display(f.label());
    finding->set_status(status);
    if (f.has_onset_days() && f.onset_days() >= 0) {
      finding->mutable_onset()->set_days(f.onset_days());
      latest = std::max(latest, f.onset_days());
    }
  };
  for (const auto& f : c.observed()) add(f, cds::v1::Finding::PRESENT);
  for (const auto& f : c.excluded()) add(f, cds::v1::Finding::EXCLUDED);
  for (const auto& m : c.measurements()) {
    const char* loinc = LoincForLabel(m.name());
    auto* out = patient.add_measurements();
    out->mutable_assay()->set_system(loinc != nullptr ? "LOINC" : "LOCAL");
    out->mutable_assay()->set_code(loinc != nullptr ? loinc : m.name());
    out->set_value(m.value());
    out->set_unit(m.unit());
    if (m.has_age_days()) {
      out->mutable_age()->set_days(m.age_days());
      latest = std::max(latest, m.age_days());
    }
  }
  if (c.has_age_last_encounter_days() && c.age_last_encounter_days() >= latest) {
    patient.mutable_age()->set_days(c.age_last_encounter_days());
  } else if (latest >= 0) {
    patient.mutable_age()->set_days(latest);
  }
  return patient;
}

absl::StatusOr<std::vector<CorpusEntry>> ParseCorpus(const std::string& jsonl) {
  std::vector<CorpusEntry> entries;
  int line_number = 0;
  google::protobuf::util::JsonParseOptions options;
  options.ignore_unknown_fields = true;
  for (absl::string_view line : absl::StrSplit(jsonl, '\n')) {
    ++line_number;
    line = absl::StripAsciiWhitespace(line);
    if (line.empty()) continue;
    CorpusEntry entry;
    const auto status =
        google::protobuf::util::JsonStringToMessage(std::string(line), &entry.source, options);
    if (!status.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("corpus line ", line_number, ": ",
                                                     status.message().as_string()));
    }
    entry.patient = PatientFromCorpusCase(entry.source);
    entries.push_back(std::move(entry));
  }
  return entries;
}

cds::interop::ValidationReport Validate(const std::vector<CorpusEntry>& corpus,
                                        const cds::v1::RuleSet& definition,
                                        const EvaluateFn& evaluate) {
  cds::interop::ValidationReport report;
  // Disease id -> hypothesis id.
  absl::flat_hash_map<std::string, std::string> modelled_by;
  std::vector<std::string> hypotheses;
  for (const auto& h : definition.hypotheses()) {
    hypotheses.push_back(h.id());
    if (!h.code().code().empty()) modelled_by.emplace(h.code().code(), h.id());
    for (const auto& code : h.other_codes()) modelled_by.emplace(code.code(), h.id());
  }
  const std::string screened = definition.metadata().screening().hypothesis();
  const double threshold = definition.metadata().screening().alert_threshold();
  report.set_screening_hypothesis(screened);
  report.set_alert_threshold(threshold);

  struct Tally {
    cds::interop::DiagnosisMetrics metrics;
    double brier_sum = 0;
  };
  std::vector<Tally> tallies;
  absl::flat_hash_map<std::string, size_t> tally_index;
  // For one-vs-rest Brier per hypothesis: sum over all cases.
  absl::flat_hash_map<std::string, double> brier_by_hypothesis;
  double brier_total = 0;
  int evaluated = 0;
  int modelled_cases = 0, modelled_top1 = 0, modelled_top3 = 0;
  int tp = 0, fn = 0, tn = 0, fp = 0, first_when_absent = 0, absent = 0;

  for (const CorpusEntry& entry : corpus) {
    auto response = evaluate(entry.patient);
    if (!response.ok()) {
      report.add_skipped(absl::StrCat(entry.source.id(), ": ", response.status().message()));
      continue;
    }
    if (report.rule_set().empty()) {
      report.set_rule_set(
          absl::StrCat(response->rule_set().name(), "@", response->rule_set().version()));
      report.set_digest(response->rule_set().digest());
      report.set_ontology(response->rule_set().ontology());
    }
    ++evaluated;
    std::vector<std::string> ranked;
    absl::flat_hash_map<std::string, double> probability;
    for (const auto& s : response->suggestions()) {
      if (s.kind() != cds::v1::DIAGNOSIS) continue;
      ranked.push_back(s.rule_id());
      probability[s.rule_id()] = s.probability();
    }
    const std::string& disease = entry.source.disease_id();
    auto [it, inserted] = tally_index.emplace(disease, tallies.size());
    if (inserted) {
      Tally t;
      t.metrics.set_diagnosis(entry.source.diagnosis());
      t.metrics.set_disease_id(disease);
      auto m = modelled_by.find(disease);
      if (m != modelled_by.end()) t.metrics.set_hypothesis(m->second);
      tallies.push_back(std::move(t));
    }
    Tally& tally = tallies[it->second];
    auto& metrics = tally.metrics;
    metrics.set_cases(metrics.cases() + 1);
    const std::string& truth = metrics.hypothesis();
    if (!truth.empty()) {
      const auto pos = std::find(ranked.begin(), ranked.end(), truth) - ranked.begin();
      const bool top1 = pos == 0;
      const bool top3 = pos < 3 && pos < static_cast<long>(ranked.size());
      metrics.set_top1(metrics.top1() + top1);
      metrics.set_top3(metrics.top3() + top3);
      ++modelled_cases;
      modelled_top1 += top1;
      modelled_top3 += top3;
    }
    // Calibration: unlisted hypotheses count as probability 0.
    double case_brier = 0;
    for (const std::string& h : hypotheses) {
      const double p = probability.contains(h) ? probability[h] : 0.0;
      const double y = h == truth ? 1.0 : 0.0;
      brier_by_hypothesis[h] += (p - y) * (p - y);
      case_brier += (p - y) * (p - y);
    }
    brier_total += case_brier;
    if (!screened.empty()) {
      const double p = probability.contains(screened) ? probability[screened] : 0.0;
      const bool flagged = p >= threshold;
      if (truth == screened) {
        flagged ? ++tp : ++fn;
      } else {
        flagged ? ++fp : ++tn;
        ++absent;
        if (!ranked.empty() && ranked[0] == screened) ++first_when_absent;
      }
    }
  }
  std::sort(tallies.begin(), tallies.end(), [](const Tally& a, const Tally& b) {
    if (a.metrics.cases() != b.metrics.cases()) return a.metrics.cases() > b.metrics.cases();
    return a.metrics.disease_id() < b.metrics.disease_id();
  });
  for (Tally& t : tallies) {
    auto& m = t.metrics;
    if (!m.hypothesis().empty()) {
      m.set_top1_accuracy(Ratio(m.top1(), m.cases()));
      m.set_top3_accuracy(Ratio(m.top3(), m.cases()));
      m.set_brier(evaluated > 0 ? brier_by_hypothesis[m.hypothesis()] / evaluated : 0);
    }
    *report.add_diagnoses() = m;
  }
  report.set_cases(evaluated);
  report.set_true_positives(tp);
  report.set_false_negatives(fn);
  report.set_true_negatives(tn);
  report.set_false_positives(fp);
  report.set_sensitivity(Ratio(tp, tp + fn));
  report.set_specificity(Ratio(tn, tn + fp));
  report.set_ranked_first_when_absent(first_when_absent);
  report.set_ranked_first_when_absent_rate(Ratio(first_when_absent, absent));
  report.set_modelled_cases(modelled_cases);
  report.set_modelled_top1_accuracy(Ratio(modelled_top1, modelled_cases));
  report.set_modelled_top3_accuracy(Ratio(modelled_top3, modelled_cases));
  report.set_brier(evaluated > 0 ? brier_total / evaluated : 0);
  return report;
}

std::string FormatReport(const cds::interop::ValidationReport& r) {
  std::string out = absl::StrFormat("Validation of %s (%s) on %s: %d cases", r.rule_set(),
                                    r.digest().substr(0, 19), r.corpus(), r.cases());
  if (!r.ontology().empty()) absl::StrAppend(&out, ", ontology ", r.ontology());
  absl::StrAppend(&out, "\n\n");
  absl::StrAppendFormat(&out, "%-58s %-13s %-32s %5s %7s %7s %7s\n", "diagnosis", "disease",
                        "modelled as", "cases", "top-1", "top-3", "Brier");
  for (const auto& d : r.diagnoses()) {
    std::string name = d.diagnosis();
    if (name.size() > 58) name = name.substr(0, 55) + "...";
    if (d.hypothesis().empty()) {
      absl::StrAppendFormat(&out, "%-58s %-13s %-32s %5d %7s %7s %7s\n", name, d.disease_id(),
                            "(not modelled)", d.cases(), "-", "-", "-");
    } else {
      absl::StrAppendFormat(&out, "%-58s %-13s %-32s %5d %6.0f%% %6.0f%% %7.3f\n", name,
                            d.disease_id(), d.hypothesis(), d.cases(), 100 * d.top1_accuracy(),
                            100 * d.top3_accuracy(), d.brier());
    }
  }
  absl::StrAppendFormat(&out, "\nModelled diagnoses: %d cases, top-1 %.0f%%, top-3 %.0f%%\n",
                        r.modelled_cases(), 100 * r.modelled_top1_accuracy(),
                        100 * r.modelled_top3_accuracy());
  if (!r.screening_hypothesis().empty()) {
    absl::StrAppendFormat(
        &out,
        "Screening for %s at P >= %.2f: sensitivity %.0f%% (%d/%d), specificity %.0f%% (%d/%d); "
        "ranked first in %.1f%% of other cases\n",
        r.screening_hypothesis(), r.alert_threshold(), 100 * r.sensitivity(), r.true_positives(),
        r.true_positives() + r.false_negatives(), 100 * r.specificity(), r.true_negatives(),
        r.true_negatives() + r.false_positives(), 100 * r.ranked_first_when_absent_rate());
  }
  absl::StrAppendFormat(&out, "Multi-class Brier score: %.3f\n", r.brier());
  if (r.skipped_size() > 0) {
    absl::StrAppendFormat(&out, "Skipped %d cases:\n", r.skipped_size());
    for (const auto& s : r.skipped()) absl::StrAppend(&out, "  ", s, "\n");
  }
  return out;
}

}  // namespace cds::cli
