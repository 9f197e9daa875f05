#include "client/phenopacket.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace cds::cli {
namespace {

using ::testing::HasSubstr;

constexpr char kPhenopacket[] = R"json({
  "id": "PMID_1_P1",
  "subject": {"id": "P1", "timeAtLastEncounter": {"age": {"iso8601duration": "P3M"}}, "sex": "MALE",
              "taxonomy": {"id": "NCBITaxon:9606", "label": "human"}},
  "phenotypicFeatures": [
    {"type": {"id": "HP:0002041", "label": "Intractable diarrhea"}, "onset": {"age": {"iso8601duration": "P2W"}}},
    {"type": {"id": "HP:0000964", "label": "Eczematoid dermatitis"}, "onset": {"ontologyClass": {"id": "HP:0003623", "label": "Neonatal onset"}}},
    {"type": {"id": "HP:0001880", "label": "Eosinophilia"}, "excluded": true},
    {"type": {"label": "no id"}}
  ],
  "measurements": [
    {"assay": {"id": "LOINC:19113-0", "label": "IgE"},
     "value": {"quantity": {"unit": {"id": "UCUM:[IU]/mL", "label": "IU/mL"}, "value": 850.0,
                            "referenceRange": {"unit": {"id": "UCUM:[IU]/mL"}, "low": 0, "high": 13}}},
     "timeObserved": {"age": {"iso8601duration": "P2M"}}},
    {"assay": {"id": "LOINC:1-1"}, "value": {"ontologyClass": {"id": "X:1"}}}
  ],
  "interpretations": [{"id": "ignored", "progressStatus": "SOLVED"}],
  "diseases": [{"term": {"id": "OMIM:304790", "label": "IPEX"}}],
  "metaData": {"created": "2024-01-01T00:00:00Z", "phenopacketSchemaVersion": "2.0"}
})json";

TEST(PhenopacketTest, MapsSubjectFeaturesAndMeasurements) {
  std::vector<std::string> notes;
  auto patient = PatientFromPhenopacketJson(kPhenopacket, &notes);
  ASSERT_TRUE(patient.ok()) << patient.status();
  EXPECT_EQ(patient->sex(), cds::v1::MALE);
  EXPECT_NEAR(patient->age().days(), 3 * 30.44, 1e-9);
  ASSERT_EQ(patient->findings_size(), 3);
  EXPECT_EQ(patient->findings(0).term().system(), "HPO");
  EXPECT_EQ(patient->findings(0).term().code(), "HP:0002041");
  EXPECT_EQ(patient->findings(0).status(), cds::v1::Finding::PRESENT);
  EXPECT_NEAR(patient->findings(0).onset().days(), 14, 1e-9);
  EXPECT_NEAR(patient->findings(1).onset().days(), 14, 1e-9);  // neonatal onset class
  EXPECT_EQ(patient->findings(2).status(), cds::v1::Finding::EXCLUDED);
  ASSERT_EQ(patient->measurements_size(), 1);
  const auto& m = patient->measurements(0);
  EXPECT_EQ(m.assay().system(), "LOINC");
  EXPECT_EQ(m.assay().code(), "19113-0");
  EXPECT_EQ(m.unit(), "[IU]/mL");
  EXPECT_EQ(m.value(), 850);
  EXPECT_EQ(m.reference_range().high(), 13);
  EXPECT_NEAR(m.age().days(), 2 * 30.44, 1e-9);
  // The known diagnosis in the phenopacket is never used.
  EXPECT_EQ(notes.size(), 2u);
  EXPECT_THAT(notes[0], HasSubstr("phenotypicFeatures[3]"));
  EXPECT_THAT(notes[1], HasSubstr("measurements[1]"));
}

TEST(PhenopacketTest, MalformedJsonIsAnError) {
  auto patient = PatientFromPhenopacketJson("{\"subject\": [", nullptr);
  EXPECT_EQ(patient.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(patient.status().message()), HasSubstr("Phenopacket"));
}

TEST(PhenopacketTest, MissingSexBecomesUnknown) {
  auto patient = PatientFromPhenopacketJson("{\"id\": \"x\"}", nullptr);
  ASSERT_TRUE(patient.ok());
  EXPECT_EQ(patient->sex(), cds::v1::UNKNOWN_SEX);
}

TEST(PhenopacketTest, OnsetClassesAndCuries) {
  EXPECT_EQ(OnsetClassDays("HP:0003577"), 0.0);
  EXPECT_EQ(OnsetClassDays("HP:0003593"), 196.0);
  EXPECT_FALSE(OnsetClassDays("HP:0000001").has_value());
  EXPECT_EQ(CodeFromCurie("OMIM:304790", "").system(), "OMIM");
  EXPECT_EQ(CodeFromCurie("OMIM:304790", "").code(), "OMIM:304790");
  EXPECT_EQ(CodeFromCurie("SNOMED:123", "").system(), "SNOMEDCT");
  EXPECT_EQ(CodeFromCurie("SNOMED:123", "").code(), "123");
  EXPECT_EQ(CodeFromCurie("plain", "").system(), "LOCAL");
}

}  // namespace
}  // namespace cds::cli
