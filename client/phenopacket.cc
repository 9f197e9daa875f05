#include "client/phenopacket.h"

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "google/protobuf/util/json_util.h"
#include "server/compiler/compiled_rule_set.h"

namespace cds::cli {
namespace {

void Note(std::vector<std::string>* notes, std::string line) {
  if (notes != nullptr) notes->push_back(std::move(line));
}

std::optional<double> IsoDays(const std::string& iso) {
  cds::v1::Age age;
  age.set_iso8601_duration(iso);
  const compiler::AgeDays days = compiler::ToDays(age);
  if (!days.set || !days.error.empty()) return std::nullopt;
  return days.days;
}

void SetAge(std::optional<double> days, cds::v1::Age* age) {
  if (days) age->set_days(*days);
}

std::string UnitText(const cds::interop::OntologyClass& unit) {
  // UCUM units arrive as "UCUM:mg/dL" with a label, or as a bare label.
  if (absl::StartsWithIgnoreCase(unit.id(), "UCUM:")) return unit.id().substr(5);
  if (!unit.id().empty()) return unit.id();
  return unit.label();
}

}  // namespace

std::optional<double> OnsetClassDays(const std::string& id) {
  // The middle of each HPO onset class's span (an assumption, documented in the README):
  // a class says only that onset fell somewhere in the span.
  struct Span {
    const char* id;
    double days;
  };
  static constexpr Span kSpans[] = {
      {"HP:0030674", 0},     // Antenatal onset
      {"HP:0011460", 0},     // Embryonal onset
      {"HP:0011461", 0},     // Fetal onset
      {"HP:0003577", 0},     // Congenital onset (at birth)
      {"HP:0003623", 14},    // Neonatal onset (first 28 days)
      {"HP:0003593", 196},   // Infantile onset (28 days to 1 year)
      {"HP:0011463", 1096},  // Childhood onset (1 to 5 years)
      {"HP:0003621", 3653},  // Juvenile onset (5 to 15 years)
      {"HP:0011462", 7305},  // Young adult onset (16 to 40 years)
      {"HP:0003581", 10958}, // Adult onset (16 years or later)
  };
  for (const Span& span : kSpans) {
    if (id == span.id) return span.days;
  }
  return std::nullopt;
}

std::optional<double> TimeElementDays(const cds::interop::TimeElement& time) {
  switch (time.element_case()) {
    case cds::interop::TimeElement::kAge:
      return IsoDays(time.age().iso8601duration());
    case cds::interop::TimeElement::kAgeRange:
      return IsoDays(time.age_range().start().iso8601duration());
    case cds::interop::TimeElement::kGestationalAge:
      return 0.0;
    case cds::interop::TimeElement::kOntologyClass:
      return OnsetClassDays(time.ontology_class().id());
    default:
      return std::nullopt;
  }
}

cds::v1::Code CodeFromCurie(const std::string& curie, const std::string& label) {
  cds::v1::Code code;
  const size_t colon = curie.find(':');
  const std::string prefix = colon == std::string::npos ? "" : absl::AsciiStrToUpper(curie.substr(0, colon));
  if (prefix == "HP" || prefix == "OMIM" || prefix == "ORPHA" || prefix == "MONDO") {
    code.set_system(prefix == "HP" ? "HPO" : prefix);
    code.set_code(curie);
  } else if (!prefix.empty()) {
    code.set_system(prefix == "SNOMED" || prefix == "SCTID" ? "SNOMEDCT" : prefix);
    code.set_code(curie.substr(colon + 1));
  } else {
    code.set_system("LOCAL");
    code.set_code(curie);
  }
  if (!label.empty()) code.set_display(label);
  return code;
}

cds::v1::Patient PatientFromPhenopacket(const cds::interop::Phenopacket& packet,
                                        std::vector<std::string>* notes) {
  cds::v1::Patient patient;
  // The phenopacket id may be a study identifier: keep it only as the pseudonymous reference.
  patient.set_reference(packet.id());
  const auto& subject = packet.subject();
  patient.set_sex(subject.sex() == cds::v1::SEX_UNSPECIFIED ? cds::v1::UNKNOWN_SEX : subject.sex());
  if (subject.has_time_at_last_encounter()) {
    const auto days = TimeElementDays(subject.time_at_last_encounter());
    if (days) {
      patient.mutable_age()->set_days(*days);
    } else {
      Note(notes, "subject.timeAtLastEncounter could not be mapped to an age");
    }
  }
  for (int i = 0; i < packet.phenotypic_features_size(); ++i) {
    const auto& feature = packet.phenotypic_features(i);
    if (feature.type().id().empty()) {
      Note(notes, absl::StrCat("phenotypicFeatures[", i, "] has no type id; ignored"));
      continue;
    }
    auto* finding = patient.add_findings();
    *finding->mutable_term() = CodeFromCurie(feature.type().id(), feature.type().label());
    finding->set_status(feature.excluded() ? cds::v1::Finding::EXCLUDED : cds::v1::Finding::PRESENT);
    if (feature.has_onset()) {
      const auto days = TimeElementDays(feature.onset());
      if (days) {
        SetAge(days, finding->mutable_onset());
      } else {
        Note(notes, absl::StrCat("phenotypicFeatures[", i, "].onset could not be mapped"));
      }
    }
  }
  for (int i = 0; i < packet.measurements_size(); ++i) {
    const auto& m = packet.measurements(i);
    if (!m.has_value() || !m.value().has_quantity()) {
      Note(notes, absl::StrCat("measurements[", i, "] has no quantity value; ignored"));
      continue;
    }
    const auto& quantity = m.value().quantity();
    auto* out = patient.add_measurements();
    *out->mutable_assay() = CodeFromCurie(m.assay().id(), m.assay().label());
    out->set_value(quantity.value());
    out->set_unit(UnitText(quantity.unit()));
    if (quantity.has_reference_range()) {
      out->mutable_reference_range()->set_low(quantity.reference_range().low());
      out->mutable_reference_range()->set_high(quantity.reference_range().high());
    }
    if (m.has_time_observed()) SetAge(TimeElementDays(m.time_observed()), out->mutable_age());
  }
  return patient;
}

absl::StatusOr<cds::v1::Patient> PatientFromPhenopacketJson(const std::string& json,
                                                            std::vector<std::string>* notes) {
  cds::interop::Phenopacket packet;
  google::protobuf::util::JsonParseOptions options;
  options.ignore_unknown_fields = true;
  const auto status = google::protobuf::util::JsonStringToMessage(json, &packet, options);
  if (!status.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("not a Phenopacket v2 JSON document: ", status.message().as_string()));
  }
  return PatientFromPhenopacket(packet, notes);
}

}  // namespace cds::cli
