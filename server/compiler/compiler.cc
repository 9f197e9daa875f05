#include "server/compiler/compiler.h"

#include <openssl/evp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <optional>
#include <tuple>
#include <utility>

#include "absl/base/casts.h"
#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "google/protobuf/io/tokenizer.h"
#include "google/protobuf/text_format.h"

namespace cds::compiler {
namespace {

using ::google::protobuf::Message;
using ::google::protobuf::TextFormat;

// Where a message sits in its source file: its parse-info tree (for its fields' locations)
// and its own first line.
struct Src {
  const TextFormat::ParseInfoTree* tree = nullptr;
  int line = 0;
  int column = 0;
};

// The location of `field` (element `index` when repeated) of `parent`, and its tree when
// the field is a message.
Src Child(const Src& parent, const Message& parent_msg, const char* field, int index = -1) {
  Src child;
  if (parent.tree == nullptr) return child;
  const auto* fd = parent_msg.GetDescriptor()->FindFieldByName(field);
  if (fd == nullptr) return child;
  const auto loc = parent.tree->GetLocation(fd, index);
  if (loc.line >= 0) {
    child.line = loc.line + 1;
    child.column = loc.column + 1;
  } else {
    child.line = parent.line;
  }
  if (fd->type() == google::protobuf::FieldDescriptor::TYPE_MESSAGE) {
    child.tree = parent.tree->GetTreeForNested(fd, index);
  }
  return child;
}

// Collects the text-format parser's errors as issues.
class IssueCollector : public google::protobuf::io::ErrorCollector {
 public:
  IssueCollector(std::string file, std::vector<Issue>* issues)
      : file_(std::move(file)), issues_(issues) {}
  void AddError(int line, google::protobuf::io::ColumnNumber column,
                const std::string& message) override {
    issues_->push_back(Issue{Issue::Severity::kError, file_, line + 1, column + 1, "",
                             absl::StrCat("syntax: ", message)});
  }
  void AddWarning(int line, google::protobuf::io::ColumnNumber column,
                  const std::string& message) override {
    issues_->push_back(Issue{Issue::Severity::kWarning, file_, line + 1, column + 1, "",
                             absl::StrCat("syntax: ", message)});
  }

 private:
  std::string file_;
  std::vector<Issue>* issues_;
};

// The lines a compiled rule set keeps from ruleset.textproto: the `source` of each evidence
// item and action (1-based, where the field's name starts, as the parser's location tree
// records it).
struct SourceLines {
  std::vector<int> actions;                // per top-level `actions` entry
  std::vector<std::vector<int>> evidence;  // per top-level `hypotheses` entry, per `evidence`
};

// Finds SourceLines in text-format `text` without parsing it into messages, for the plain
// syntax rule sets are written in: `name: value` and `name { ... }` (':' optional), `#`
// comments, quoted strings (adjacent ones too), an optional ';' or ',' after a field.
// Anything else (list syntax, extensions, `<...>` messages, nesting deeper than the
// parser's limit, a token out of place) gives nullopt: the caller then uses the tree.
class SourceLineScanner {
 public:
  explicit SourceLineScanner(absl::string_view text) : text_(text) {}

  std::optional<SourceLines> Scan() {
    if (!Body(0, Scope::kTop)) return std::nullopt;
    return std::move(lines_);
  }

 private:
  enum class Scope { kTop, kHypothesis, kOther };
  static constexpr int kMaxDepth = 100;  // TextFormat::Parser's default recursion limit

  bool AtEnd() const { return pos_ >= text_.size(); }
  bool Peek(char c) const { return !AtEnd() && text_[pos_] == c; }

  // Whitespace (as the tokenizer counts it) and comments; counts lines.
  void Skip() {
    while (!AtEnd()) {
      const char c = text_[pos_];
      if (c == '\n') {
        ++line_;
        ++pos_;
      } else if (c == ' ' || c == '\t' || c == '\r' || c == '\v' || c == '\f') {
        ++pos_;
      } else if (c == '#') {
        while (!AtEnd() && text_[pos_] != '\n') ++pos_;
      } else {
        return;
      }
    }
  }

  static bool IsIdentifierStart(char c) {
    return absl::ascii_isalpha(static_cast<unsigned char>(c)) || c == '_';
  }
  static bool IsIdentifierChar(char c) {
    return absl::ascii_isalnum(static_cast<unsigned char>(c)) || c == '_';
  }

  // One quoted string; false when it does not end on its line.
  bool String() {
    const char quote = text_[pos_++];
    while (!AtEnd()) {
      const char c = text_[pos_++];
      if (c == '\n') return false;
      if (c == quote) return true;
      if (c == '\\') {
        if (AtEnd() || text_[pos_] == '\n') return false;
        ++pos_;
      }
    }
    return false;
  }

  // A scalar: one or more adjacent strings, or an optionally negative number or identifier.
  bool Value() {
    if (Peek('"') || Peek('\'')) {
      while (Peek('"') || Peek('\'')) {
        if (!String()) return false;
        Skip();
      }
      return true;
    }
    if (Peek('-')) {
      ++pos_;
      Skip();
    }
    const size_t start = pos_;
    while (!AtEnd()) {
      const char c = text_[pos_];
      const bool exponent_sign = (c == '+' || c == '-') && pos_ > start &&
                                 (text_[pos_ - 1] == 'e' || text_[pos_ - 1] == 'E');
      if (!IsIdentifierChar(c) && c != '.' && !exponent_sign) break;
      ++pos_;
    }
    return pos_ > start;
  }

  // The fields of one message, up to its closing '}' (or the end of the text at depth 0).
  bool Body(int depth, Scope scope) {
    if (depth > kMaxDepth) return false;
    while (true) {
      Skip();
      if (AtEnd()) return depth == 0;
      if (Peek('}')) {
        if (depth == 0) return false;
        ++pos_;
        return true;
      }
      if (!IsIdentifierStart(text_[pos_])) return false;
      const int name_line = line_ + 1;
      const size_t name_start = pos_;
      while (!AtEnd() && IsIdentifierChar(text_[pos_])) ++pos_;
      const absl::string_view name = text_.substr(name_start, pos_ - name_start);
      Skip();
      const bool colon = Peek(':');
      if (colon) {
        ++pos_;
        Skip();
      }
      if (Peek('{')) {
        ++pos_;
        Scope inner = Scope::kOther;
        if (scope == Scope::kTop && name == "actions") lines_.actions.push_back(name_line);
        if (scope == Scope::kTop && name == "hypotheses") {
          lines_.evidence.emplace_back();
          inner = Scope::kHypothesis;
        }
        if (scope == Scope::kHypothesis && name == "evidence") {
          lines_.evidence.back().push_back(name_line);
        }
        if (!Body(depth + 1, inner)) return false;
      } else if (!colon || !Value()) {
        return false;
      }
      Skip();
      if (Peek(';') || Peek(',')) ++pos_;
    }
  }

  absl::string_view text_;
  size_t pos_ = 0;
  int line_ = 0;  // 0-based, as the tokenizer counts
  SourceLines lines_;
};

// The forms below are checked by hand, not with std::regex: a compile checks thousands of
// ids and codes, and each std::regex_match allocated its own matcher state.

// [a-z][a-z0-9_]* (ASCII only).
bool IsIdentifier(absl::string_view id) {
  if (id.empty() || !absl::ascii_islower(static_cast<unsigned char>(id[0]))) return false;
  return std::all_of(id.begin() + 1, id.end(), [](char c) {
    const auto u = static_cast<unsigned char>(c);
    return absl::ascii_islower(u) || absl::ascii_isdigit(u) || c == '_';
  });
}

// 0|[1-9][0-9]*
bool IsVersionNumber(absl::string_view part) {
  if (part.empty() || (part.size() > 1 && part[0] == '0')) return false;
  return std::all_of(part.begin(), part.end(),
                     [](char c) { return absl::ascii_isdigit(static_cast<unsigned char>(c)); });
}

// MAJOR.MINOR.PATCH, each a version number.
bool IsSemver(absl::string_view version) {
  const std::vector<absl::string_view> parts = absl::StrSplit(version, '.');
  return parts.size() == 3 && std::all_of(parts.begin(), parts.end(), IsVersionNumber);
}

// HP:[0-9]{7}
bool IsHpoCode(absl::string_view code) {
  return code.size() == 10 && absl::StartsWith(code, "HP:") &&
         std::all_of(code.begin() + 3, code.end(), [](char c) {
           return absl::ascii_isdigit(static_cast<unsigned char>(c));
         });
}

bool IsProbability(double p) { return std::isfinite(p) && p > 0 && p < 1; }

std::string FormatNumber(double v) { return absl::StrFormat("%g", v); }

std::string FormatDays(double days) {
  if (days >= 365.25 && std::fabs(days / 365.25 - std::round(days / 365.25)) < 0.01) {
    return absl::StrCat(FormatNumber(std::round(days / 365.25)), " y");
  }
  if (days >= 30 && std::fabs(days / 30.44 - std::round(days / 30.44)) < 0.05) {
    return absl::StrCat(FormatNumber(std::round(days / 30.44)), " mo");
  }
  return absl::StrCat(FormatNumber(days), " d");
}

std::string DescribeRange(const DayRange& range) {
  const bool has_from = range.from > -1e300;
  const bool has_to = range.to < 1e300;
  if (has_from && has_to) return absl::StrCat(FormatDays(range.from), "-", FormatDays(range.to));
  if (has_to) return absl::StrCat("before ", FormatDays(range.to));
  if (has_from) return absl::StrCat("from ", FormatDays(range.from));
  return "";
}

std::string SexName(cds::v1::Sex sex) {
  switch (sex) {
    case cds::v1::MALE: return "male";
    case cds::v1::FEMALE: return "female";
    case cds::v1::OTHER_SEX: return "other";
    case cds::v1::UNKNOWN_SEX: return "unknown";
    default: return "unspecified";
  }
}

// The whole compilation of one rule set: passes over the parsed messages that append to
// `issues_` and fill `out_`.
class Compilation {
 public:
  // Without `locations`, the files are parsed without the parser's location tree, the
  // kept source lines come from SourceLineScanner, and the compilation gives up (complete()
  // false) at the first issue, whose location it could not give.
  Compilation(const RuleSetSource& source, bool locations)
      : source_(source), locations_(locations) {}

  // False when a compilation without locations gave up: compile again with them.
  bool complete() const { return complete_; }

  CompileResult Run() {
    out_ = std::make_shared<CompiledRuleSet>();
    ParseFiles();
    if (!locations_ && (!parsed_rule_set_ || !source_lines_.has_value())) complete_ = false;
    if (parsed_rule_set_ && complete_) {
      using Pass = void (Compilation::*)();
      for (Pass pass : {&Compilation::CheckMetadata, &Compilation::IndexReferences,
                        &Compilation::CompileConcepts, &Compilation::CompileLabs,
                        &Compilation::CompileDerivations, &Compilation::CompileHypotheses,
                        &Compilation::CompileActions, &Compilation::CheckScreening,
                        &Compilation::CheckTests, &Compilation::LintUnusedConcepts,
                        &Compilation::BuildTriggerIndex,
                        &Compilation::LintActionsThatCannotFire}) {
        if (!locations_ && !issues_.empty()) break;
        (this->*pass)();
      }
    }
    if (!locations_ && !issues_.empty()) complete_ = false;
    CompileResult result;
    result.issues = std::move(issues_);
    const bool has_error =
        std::any_of(result.issues.begin(), result.issues.end(),
                    [](const Issue& i) { return i.severity == Issue::Severity::kError; });
    if (!has_error && complete_) {
      FoldDemographicEvidence(out_.get());
      out_->digest = DigestFiles(source_.files);
      BuildWireFragments(out_.get());
      out_->concepts_by_hpo.Build(out_->concepts_by_code);
      out_->excluded_concepts_by_hpo.Build(out_->concepts_by_excluded_code);
      result.rule_set = std::move(out_);
    }
    return result;
  }

 private:
  // ---- issue reporting ----------------------------------------------------------------
  void Error(const std::string& file, const Src& at, const std::string& rule_id,
             const std::string& message) {
    issues_.push_back(Issue{Issue::Severity::kError, file, at.line, at.column, rule_id, message});
  }
  void Warn(const std::string& file, const Src& at, const std::string& rule_id,
            const std::string& message) {
    issues_.push_back(
        Issue{Issue::Severity::kWarning, file, at.line, at.column, rule_id, message});
  }

  // ---- pass: parse --------------------------------------------------------------------
  void ParseFiles() {
    const SourceFile* rules_file = nullptr;
    const SourceFile* tests_file = nullptr;
    for (const SourceFile& f : source_.files) {
      if (f.path == kRuleSetFile) {
        rules_file = &f;
      } else if (f.path == kTestsFile) {
        tests_file = &f;
      } else {
        Warn(f.path, Src{}, "", "file is not part of a rule set and is ignored");
      }
    }
    if (rules_file == nullptr) {
      Error(kRuleSetFile, Src{}, "", "missing: a rule set needs a ruleset.textproto");
      return;
    }
    if (Parse(*rules_file, &out_->definition, &rules_tree_)) parsed_rule_set_ = true;
    if (parsed_rule_set_ && !locations_) ScanSourceLines(rules_file->content);
    if (tests_file != nullptr && Parse(*tests_file, &out_->tests, &tests_tree_)) {
      parsed_tests_ = true;
    }
  }

  bool Parse(const SourceFile& file, Message* message, TextFormat::ParseInfoTree* tree) {
    IssueCollector collector(file.path, &issues_);
    TextFormat::Parser parser;
    parser.RecordErrorsTo(&collector);
    if (locations_) parser.WriteLocationsTo(tree);
    // Unknown fields and extensions are errors (the parser's default); say so explicitly.
    parser.AllowUnknownField(false);
    parser.AllowUnknownExtension(false);
    return parser.ParseFromString(file.content, message);
  }

  // Sets source_lines_ when the scan follows the text and finds every entry parsed.
  void ScanSourceLines(absl::string_view text) {
    std::optional<SourceLines> lines = SourceLineScanner(text).Scan();
    const cds::v1::RuleSet& rs = out_->definition;
    if (!lines.has_value() || lines->actions.size() != static_cast<size_t>(rs.actions_size()) ||
        lines->evidence.size() != static_cast<size_t>(rs.hypotheses_size())) {
      return;
    }
    for (int i = 0; i < rs.hypotheses_size(); ++i) {
      if (lines->evidence[i].size() != static_cast<size_t>(rs.hypotheses(i).evidence_size())) {
        return;
      }
    }
    source_lines_ = std::move(lines);
  }

  // ---- pass: metadata -----------------------------------------------------------------
  void CheckMetadata() {
    const cds::v1::RuleSet& rs = out_->definition;
    const Src root{&rules_tree_, 1, 1};
    if (!rs.has_metadata()) {
      Error(kRuleSetFile, root, "", "metadata is missing");
      return;
    }
    const Src at = Child(root, rs, "metadata");
    const auto& md = rs.metadata();
    if (!IsIdentifier(md.name())) {
      Error(kRuleSetFile, Child(at, md, "name"), "",
            "metadata.name must be a lower-case identifier ([a-z][a-z0-9_]*)");
    } else if (!source_.expected_name.empty() && md.name() != source_.expected_name) {
      Error(kRuleSetFile, Child(at, md, "name"), "",
            absl::StrCat("metadata.name '", md.name(), "' does not match its directory '",
                         source_.expected_name, "'"));
    }
    if (!IsSemver(md.version())) {
      Error(kRuleSetFile, Child(at, md, "version"), "",
            "metadata.version must be a semantic version MAJOR.MINOR.PATCH");
    } else if (!source_.expected_version.empty() && md.version() != source_.expected_version) {
      Error(kRuleSetFile, Child(at, md, "version"), "",
            absl::StrCat("metadata.version '", md.version(), "' does not match its directory '",
                         source_.expected_version, "'"));
    }
    if (md.status() == cds::v1::RuleSetMetadata::STATUS_UNSPECIFIED) {
      Error(kRuleSetFile, at, "", "metadata.status is required (DRAFT, ACTIVE or RETIRED)");
    }
    if (md.title().empty()) Error(kRuleSetFile, at, "", "metadata.title is required");
    if (md.disclaimer().empty()) {
      Error(kRuleSetFile, at, "",
            "metadata.disclaimer is required: users must be told the output supports, and does "
            "not replace, a clinician's judgement");
    }
    const double min_show = md.min_probability_to_show();
    if (!std::isfinite(min_show) || min_show < 0 || min_show >= 1) {
      Error(kRuleSetFile, Child(at, md, "min_probability_to_show"), "",
            "metadata.min_probability_to_show must be in [0, 1)");
    } else if (min_show > 0) {
      CheckProvenance(md.min_probability_provenance(), md.has_min_probability_provenance(),
                      Child(at, md, "min_probability_to_show"), "",
                      "metadata.min_probability_to_show");
    }
    if (!md.ontology().empty()) {
      if (!source_.ontology_provider) {
        Error(kRuleSetFile, Child(at, md, "ontology"), "",
              absl::StrCat("metadata.ontology '", md.ontology(),
                           "' is named but no ontology directory is available"));
      } else {
        auto loaded = source_.ontology_provider(md.ontology());
        if (!loaded.ok()) {
          Error(kRuleSetFile, Child(at, md, "ontology"), "",
                absl::StrCat("metadata.ontology '", md.ontology(),
                             "' cannot be loaded: ", loaded.status().message()));
        } else {
          out_->ontology = *std::move(loaded);
        }
      }
    }
    out_->name = md.name();
    out_->version = md.version();
    out_->disclaimer = md.disclaimer();
    out_->min_probability_to_show = min_show > 0 ? min_show : 0.01;
    for (int i = 0; i < md.reference_ids_size(); ++i) {
      pending_reference_checks_.push_back(
          {md.reference_ids(i), Child(at, md, "reference_ids", i), ""});
    }
  }

  // ---- pass: references ---------------------------------------------------------------
  void IndexReferences() {
    const cds::v1::RuleSet& rs = out_->definition;
    const Src root{&rules_tree_, 1, 1};
    for (int i = 0; i < rs.references_size(); ++i) {
      const auto& ref = rs.references(i);
      const Src at = Child(root, rs, "references", i);
      if (ref.id().empty()) {
        Error(kRuleSetFile, at, "", "reference without an id");
        continue;
      }
      if (ref.citation().empty()) {
        Error(kRuleSetFile, at, ref.id(), "reference has no citation");
      }
      if (!references_.emplace(ref.id(), i).second) {
        Error(kRuleSetFile, at, ref.id(), absl::StrCat("duplicate reference id '", ref.id(), "'"));
      }
    }
    for (const auto& check : pending_reference_checks_) {
      CheckReferenceId(check.id, check.at, check.rule_id);
    }
  }

  void CheckReferenceId(const std::string& id, const Src& at, const std::string& rule_id) {
    if (!references_.contains(id)) {
      Error(kRuleSetFile, at, rule_id, absl::StrCat("unknown reference id '", id, "'"));
    }
  }

  std::vector<cds::v1::Reference> ResolveReferences(
      const google::protobuf::RepeatedPtrField<std::string>& ids, const Src& at,
      const Message& msg, const char* field, const std::string& rule_id) {
    std::vector<cds::v1::Reference> refs;
    for (int i = 0; i < ids.size(); ++i) {
      auto it = references_.find(ids[i]);
      if (it == references_.end()) {
        CheckReferenceId(ids[i], Child(at, msg, field, i), rule_id);
        continue;
      }
      refs.push_back(out_->definition.references(it->second));
    }
    return refs;
  }

  // Every number needs a source or an explicit assumption.
  void CheckProvenance(const cds::v1::Provenance& p, bool present, const Src& at,
                       const std::string& rule_id, const std::string& what) {
    if (!present || (p.reference_ids().empty() && !p.assumption())) {
      Error(kRuleSetFile, at, rule_id,
            absl::StrCat(what, " needs a provenance: cite reference_ids or mark it "
                               "assumption: true"));
      return;
    }
    if (p.assumption() && p.note().empty()) {
      Warn(kRuleSetFile, at, rule_id, absl::StrCat(what, " is an assumption without a note"));
    }
    for (const std::string& id : p.reference_ids()) CheckReferenceId(id, at, rule_id);
  }

  // ---- pass: concepts -----------------------------------------------------------------
  void CompileConcepts() {
    const cds::v1::RuleSet& rs = out_->definition;
    const Src root{&rules_tree_, 1, 1};
    for (int i = 0; i < rs.concepts_size(); ++i) {
      const auto& concept_def = rs.concepts(i);
      const Src at = Child(root, rs, "concepts", i);
      if (!IsIdentifier(concept_def.id())) {
        Error(kRuleSetFile, at, concept_def.id(),
              "concept id must be a lower-case identifier ([a-z][a-z0-9_]*)");
        continue;
      }
      const int32_t index = static_cast<int32_t>(out_->concepts.size());
      if (!concept_index_.emplace(concept_def.id(), index).second) {
        Error(kRuleSetFile, at, concept_def.id(),
              absl::StrCat("duplicate concept id '", concept_def.id(), "'"));
        continue;
      }
      const std::string& label =
          concept_def.label().empty() ? concept_def.id() : concept_def.label();
      out_->concepts.push_back(
          CompiledConcept{concept_def.id(), label, absl::StrCat("Not yet recorded: ", label)});
      concept_locations_.push_back(at);
      if (concept_def.codes().empty()) {
        Error(kRuleSetFile, at, concept_def.id(), "concept has no codes");
      }
      for (int c = 0; c < concept_def.codes_size(); ++c) {
        const auto& code = concept_def.codes(c);
        const Src code_at = Child(at, concept_def, "codes", c);
        std::string key;
        if (!CheckCode(code, code_at, concept_def.id(), &key)) continue;
        const auto& present = out_->concepts_by_code[key];
        if (std::find(present.begin(), present.end(), index) != present.end() &&
            out_->ontology == nullptr) {
          Warn(kRuleSetFile, code_at, concept_def.id(),
               absl::StrCat("code ", code.code(), " is listed twice"));
          continue;
        }
        if (out_->ontology != nullptr && absl::StartsWith(key, "HPO|")) {
          IndexThroughOntology(code.code(), index, code_at, concept_def.id());
        } else {
          AddToIndex(&out_->concepts_by_code, key, index);
          AddToIndex(&out_->concepts_by_excluded_code, key, index);
        }
      }
    }
  }

  static void AddToIndex(absl::flat_hash_map<std::string, std::vector<int32_t>>* index,
                         const std::string& key, int32_t concept_index) {
    auto& list = (*index)[key];
    if (std::find(list.begin(), list.end(), concept_index) == list.end()) {
      list.push_back(concept_index);
    }
  }

  // A PRESENT finding matches the concept when its term is the code or below it; an
  // EXCLUDED finding rules the concept out when its term is the code or above it (ruling
  // out "Diarrhea" rules out "Chronic diarrhea", not the other way round). Every term is
  // indexed under its primary, alternative and obsolete ids.
  void IndexThroughOntology(const std::string& code, int32_t concept_index, const Src& at,
                            const std::string& rule_id) {
    const ontology::Ontology& onto = *out_->ontology;
    const std::optional<int32_t> term = onto.Resolve(code);
    if (!term) {
      Error(kRuleSetFile, at, rule_id,
            absl::StrCat("HPO code ", code,
                         onto.Knows(code) ? " is obsolete without a replacement" : " is not in",
                         " ontology release ", onto.release()));
      return;
    }
    if (!onto.IsLive(code)) {
      Warn(kRuleSetFile, at, rule_id,
           absl::StrCat("HPO code ", code, " is not a current id in ", onto.release(), "; use ",
                        onto.Id(*term), " (", onto.Label(*term), ")"));
    }
    auto index_term = [&](absl::flat_hash_map<std::string, std::vector<int32_t>>* index,
                          int32_t t) {
      AddToIndex(index, CodeKey("HPO", onto.Id(t)), concept_index);
      for (const std::string& alias : onto.AliasesOf(t)) {
        AddToIndex(index, CodeKey("HPO", alias), concept_index);
      }
    };
    for (int32_t d : onto.DescendantsOrSelf(*term)) index_term(&out_->concepts_by_code, d);
    for (int32_t a : onto.AncestorsOrSelf(*term)) index_term(&out_->concepts_by_excluded_code, a);
  }

  bool CheckCode(const cds::v1::Code& code, const Src& at, const std::string& rule_id,
                 std::string* key) {
    if (code.code().empty()) {
      Error(kRuleSetFile, at, rule_id, "code without a code value");
      return false;
    }
    const std::string system = NormalizeSystem(code.system(), code.code());
    if (system.empty()) {
      Error(kRuleSetFile, at, rule_id, absl::StrCat("code ", code.code(), " has no system"));
      return false;
    }
    if (system == "HPO" && !IsHpoCode(code.code())) {
      Error(kRuleSetFile, at, rule_id,
            absl::StrCat("HPO code '", code.code(), "' is not of the form HP:0000000"));
      return false;
    }
    *key = CodeKey(system, code.code());
    return true;
  }

  // ---- pass: labs ---------------------------------------------------------------------
  void CompileLabs() {
    const cds::v1::RuleSet& rs = out_->definition;
    const Src root{&rules_tree_, 1, 1};
    for (int i = 0; i < rs.labs_size(); ++i) {
      const auto& lab = rs.labs(i);
      const Src at = Child(root, rs, "labs", i);
      if (!IsIdentifier(lab.id())) {
        Error(kRuleSetFile, at, lab.id(), "lab id must be a lower-case identifier");
        continue;
      }
      const int32_t index = static_cast<int32_t>(out_->labs.size());
      if (!lab_index_.emplace(lab.id(), index).second) {
        Error(kRuleSetFile, at, lab.id(), absl::StrCat("duplicate lab id '", lab.id(), "'"));
        continue;
      }
      CompiledLab compiled;
      compiled.id = lab.id();
      compiled.label = lab.label().empty() ? lab.id() : lab.label();
      compiled.no_result = absl::StrCat("No result yet: ", compiled.label);
      compiled.missing_warning =
          absl::StrCat("no usable ", compiled.label, " measurement; it would change the suggestions");
      compiled.canonical_unit = lab.canonical_unit();
      if (lab.canonical_unit().empty()) {
        Error(kRuleSetFile, at, lab.id(), "lab has no canonical_unit");
      } else {
        compiled.unit_factors[absl::AsciiStrToLower(lab.canonical_unit())] = 1.0;
      }
      if (lab.codes().empty()) Error(kRuleSetFile, at, lab.id(), "lab has no codes");
      for (int c = 0; c < lab.codes_size(); ++c) {
        std::string key;
        const Src code_at = Child(at, lab, "codes", c);
        if (!CheckCode(lab.codes(c), code_at, lab.id(), &key)) continue;
        if (!out_->labs_by_code.emplace(key, index).second) {
          Error(kRuleSetFile, code_at, lab.id(),
                absl::StrCat("code ", lab.codes(c).code(), " already belongs to another lab"));
        }
      }
      for (int c = 0; c < lab.conversions_size(); ++c) {
        const auto& conv = lab.conversions(c);
        const Src conv_at = Child(at, lab, "conversions", c);
        if (conv.unit().empty()) {
          Error(kRuleSetFile, conv_at, lab.id(), "conversion without a unit");
          continue;
        }
        if (!std::isfinite(conv.factor()) || conv.factor() <= 0) {
          Error(kRuleSetFile, conv_at, lab.id(),
                absl::StrCat("conversion factor for '", conv.unit(), "' must be positive"));
          continue;
        }
        CheckProvenance(conv.provenance(), conv.has_provenance(), conv_at, lab.id(),
                        absl::StrCat("conversion from '", conv.unit(), "'"));
        if (!compiled.unit_factors.emplace(absl::AsciiStrToLower(conv.unit()), conv.factor())
                 .second) {
          Error(kRuleSetFile, conv_at, lab.id(),
                absl::StrCat("unit '", conv.unit(), "' is converted twice"));
        }
      }
      for (int l = 0; l < lab.limits_size(); ++l) {
        const auto& limit = lab.limits(l);
        const Src limit_at = Child(at, lab, "limits", l);
        CompiledReferenceLimit compiled_limit;
        if (!CompileAgeRange(limit.age(), limit_at, lab.id(), "limit age", &compiled_limit.ages)) {
          continue;
        }
        if (!limit.has_lower() && !limit.has_upper()) {
          Error(kRuleSetFile, limit_at, lab.id(), "reference limit has neither lower nor upper");
          continue;
        }
        if ((limit.has_lower() && !std::isfinite(limit.lower())) ||
            (limit.has_upper() && !std::isfinite(limit.upper())) ||
            (limit.has_lower() && limit.has_upper() && limit.lower() > limit.upper())) {
          Error(kRuleSetFile, limit_at, lab.id(), "reference limit lower must not exceed upper");
          continue;
        }
        CheckProvenance(limit.provenance(), limit.has_provenance(), limit_at, lab.id(),
                        "reference limit");
        if (limit.has_lower()) compiled_limit.lower = limit.lower();
        if (limit.has_upper()) compiled_limit.upper = limit.upper();
        for (const auto& other : compiled.limits) {
          if (other.ages.from < compiled_limit.ages.to &&
              compiled_limit.ages.from < other.ages.to) {
            Error(kRuleSetFile, limit_at, lab.id(), "reference limits overlap in age");
            break;
          }
        }
        compiled.limits.push_back(compiled_limit);
      }
      out_->labs.push_back(std::move(compiled));
    }
  }

  void CompileDerivations() {
    const cds::v1::RuleSet& rs = out_->definition;
    const Src root{&rules_tree_, 1, 1};
    out_->derivations_by_percent_lab.assign(out_->labs.size(), {});
    for (int i = 0; i < rs.labs_size(); ++i) {
      const auto& lab = rs.labs(i);
      if (!lab.has_derived_from()) continue;
      auto target = lab_index_.find(lab.id());
      if (target == lab_index_.end()) continue;  // already reported
      const Src at = Child(Child(root, rs, "labs", i), lab, "derived_from");
      const auto& d = lab.derived_from();
      auto percent = lab_index_.find(d.percent_lab());
      auto total = lab_index_.find(d.total_lab());
      if (percent == lab_index_.end() || total == lab_index_.end()) {
        Error(kRuleSetFile, at, lab.id(),
              absl::StrCat("derived_from names unknown lab '",
                           percent == lab_index_.end() ? d.percent_lab() : d.total_lab(), "'"));
        continue;
      }
      if (out_->labs[percent->second].canonical_unit != "%") {
        Error(kRuleSetFile, at, lab.id(),
              absl::StrCat("percent_lab '", d.percent_lab(), "' must have canonical_unit \"%\""));
        continue;
      }
      if (out_->labs[total->second].canonical_unit != lab.canonical_unit()) {
        Error(kRuleSetFile, at, lab.id(),
              absl::StrCat("total_lab '", d.total_lab(), "' must have the canonical unit of '",
                           lab.id(), "' (", lab.canonical_unit(), ")"));
        continue;
      }
      if (!std::isfinite(d.max_days_apart()) || d.max_days_apart() < 0) {
        Error(kRuleSetFile, at, lab.id(), "max_days_apart must not be negative");
        continue;
      }
      out_->derivations_by_percent_lab[percent->second].push_back(CompiledDerivation{
          target->second, percent->second, total->second,
          d.max_days_apart() > 0 ? d.max_days_apart() : 1.0});
    }
  }

  bool CompileAgeRange(const cds::v1::AgeRange& range, const Src& at, const std::string& rule_id,
                       const std::string& what, DayRange* out) {
    if (range.has_from()) {
      const AgeDays from = ToDays(range.from());
      if (!from.error.empty()) {
        Error(kRuleSetFile, at, rule_id, absl::StrCat(what, " 'from' ", from.error));
        return false;
      }
      if (from.set) out->from = from.days;
    }
    if (range.has_to()) {
      const AgeDays to = ToDays(range.to());
      if (!to.error.empty()) {
        Error(kRuleSetFile, at, rule_id, absl::StrCat(what, " 'to' ", to.error));
        return false;
      }
      if (to.set) out->to = to.days;
    }
    if (out->from >= out->to) {
      Error(kRuleSetFile, at, rule_id, absl::StrCat(what, " is empty ('from' is not before 'to')"));
      return false;
    }
    return true;
  }

  // ---- pass: conditions ---------------------------------------------------------------
  // Compiles `cond` into out_->conditions; returns its id or -1 on error (already reported).
  ConditionId CompileCondition(const cds::v1::Condition& cond, const Src& at,
                               const std::string& rule_id, bool allow_probability) {
    CompiledCondition c;
    using K = CompiledCondition::Kind;
    switch (cond.kind_case()) {
      case cds::v1::Condition::KIND_NOT_SET:
        Error(kRuleSetFile, at, rule_id, "condition is empty (set finding, lab, sex, all, ...)");
        return -1;
      case cds::v1::Condition::kFinding: {
        const auto& f = cond.finding();
        const Src f_at = Child(at, cond, "finding");
        auto it = concept_index_.find(f.concept());
        if (it == concept_index_.end()) {
          Error(kRuleSetFile, f_at, rule_id, absl::StrCat("unknown concept '", f.concept(), "'"));
          return -1;
        }
        c.kind = K::kFinding;
        c.ref = it->second;
        used_concepts_.insert(it->second);
        if (f.has_onset() &&
            !CompileAgeRange(f.onset(), Child(f_at, f, "onset"), rule_id, "onset", &c.ages)) {
          return -1;
        }
        c.description = out_->concepts[c.ref].label;
        if (!c.ages.unbounded()) {
          absl::StrAppend(&c.description, " (onset ", DescribeRange(c.ages), ")");
        }
        break;
      }
      case cds::v1::Condition::kLab: {
        const auto& l = cond.lab();
        const Src l_at = Child(at, cond, "lab");
        auto it = lab_index_.find(l.lab());
        if (it == lab_index_.end()) {
          Error(kRuleSetFile, l_at, rule_id, absl::StrCat("unknown lab '", l.lab(), "'"));
          return -1;
        }
        c.kind = K::kLab;
        c.ref = it->second;
        const CompiledLab& lab = out_->labs[c.ref];
        bool needs_upper = false;
        bool needs_lower = false;
        switch (l.threshold_case()) {
          case cds::v1::LabCondition::THRESHOLD_NOT_SET:
            Error(kRuleSetFile, l_at, rule_id, "lab condition has no threshold");
            return -1;
          case cds::v1::LabCondition::kAboveUpperLimitTimes:
            c.lab_threshold = CompiledCondition::LabThreshold::kAboveUpperTimes;
            c.value = l.above_upper_limit_times();
            needs_upper = true;
            c.description = c.value == 1
                                ? absl::StrCat(lab.label, " above the upper limit for age")
                                : absl::StrCat(lab.label, " above ", FormatNumber(c.value),
                                               " x the upper limit for age");
            break;
          case cds::v1::LabCondition::kBelowLowerLimitTimes:
            c.lab_threshold = CompiledCondition::LabThreshold::kBelowLowerTimes;
            c.value = l.below_lower_limit_times();
            needs_lower = true;
            c.description = c.value == 1
                                ? absl::StrCat(lab.label, " below the lower limit for age")
                                : absl::StrCat(lab.label, " below ", FormatNumber(c.value),
                                               " x the lower limit for age");
            break;
          case cds::v1::LabCondition::kAbove:
            c.lab_threshold = CompiledCondition::LabThreshold::kAbove;
            c.value = l.above();
            c.description =
                absl::StrCat(lab.label, " > ", FormatNumber(c.value), " ", lab.canonical_unit);
            break;
          case cds::v1::LabCondition::kBelow:
            c.lab_threshold = CompiledCondition::LabThreshold::kBelow;
            c.value = l.below();
            c.description =
                absl::StrCat(lab.label, " < ", FormatNumber(c.value), " ", lab.canonical_unit);
            break;
        }
        if (!std::isfinite(c.value) || c.value < 0 ||
            ((needs_upper || needs_lower) && c.value <= 0)) {
          Error(kRuleSetFile, l_at, rule_id, "lab threshold must be a positive finite number");
          return -1;
        }
        const bool has_upper = std::any_of(lab.limits.begin(), lab.limits.end(),
                                           [](const auto& lim) { return lim.upper.has_value(); });
        const bool has_lower = std::any_of(lab.limits.begin(), lab.limits.end(),
                                           [](const auto& lim) { return lim.lower.has_value(); });
        if ((needs_upper && !has_upper) || (needs_lower && !has_lower)) {
          Warn(kRuleSetFile, l_at, rule_id,
               absl::StrCat("lab '", lab.id,
                            "' has no default reference limit for this threshold: it fires only "
                            "when the laboratory supplies its own range"));
        }
        if (l.has_measured_at() &&
            !CompileAgeRange(l.measured_at(), Child(l_at, l, "measured_at"), rule_id,
                             "measured_at", &c.ages)) {
          return -1;
        }
        if (!c.ages.unbounded()) {
          absl::StrAppend(&c.description, " (measured ", DescribeRange(c.ages), ")");
        }
        break;
      }
      case cds::v1::Condition::kSex:
        if (cond.sex() != cds::v1::MALE && cond.sex() != cds::v1::FEMALE &&
            cond.sex() != cds::v1::OTHER_SEX) {
          Error(kRuleSetFile, at, rule_id, "sex condition must be MALE, FEMALE or OTHER_SEX");
          return -1;
        }
        c.kind = K::kSex;
        c.count = cond.sex();
        c.description = absl::StrCat("Sex ", SexName(cond.sex()));
        break;
      case cds::v1::Condition::kAge:
        c.kind = K::kAge;
        if (!CompileAgeRange(cond.age(), Child(at, cond, "age"), rule_id, "age", &c.ages)) {
          return -1;
        }
        if (c.ages.unbounded()) {
          Error(kRuleSetFile, at, rule_id, "age condition needs 'from' or 'to'");
          return -1;
        }
        c.description = absl::StrCat("Age ", DescribeRange(c.ages));
        break;
      case cds::v1::Condition::kFamily: {
        const auto& fam = cond.family();
        const Src fam_at = Child(at, cond, "family");
        c.kind = K::kFamily;
        if (fam.line() == cds::v1::FamilyHistoryCondition::LINE_UNSPECIFIED) {
          Error(kRuleSetFile, fam_at, rule_id, "family condition needs line (ANY_LINE or MATERNAL_X_LINE)");
          return -1;
        }
        c.family_line = fam.line();
        c.family_sex = fam.sex();
        c.family_or_died_in_infancy = fam.or_died_in_infancy();
        if (!fam.affected_concept().empty()) {
          auto it = concept_index_.find(fam.affected_concept());
          if (it == concept_index_.end()) {
            Error(kRuleSetFile, fam_at, rule_id,
                  absl::StrCat("unknown concept '", fam.affected_concept(), "'"));
            return -1;
          }
          c.ref = it->second;
          used_concepts_.insert(it->second);
        } else if (!fam.or_died_in_infancy()) {
          Error(kRuleSetFile, fam_at, rule_id,
                "family condition needs affected_concept or or_died_in_infancy");
          return -1;
        }
        if (fam.min_count() < 0) {
          Error(kRuleSetFile, fam_at, rule_id, "family min_count must not be negative");
          return -1;
        }
        c.count = fam.min_count() == 0 ? 1 : fam.min_count();
        std::string who = fam.sex() == cds::v1::MALE     ? "male relative"
                          : fam.sex() == cds::v1::FEMALE ? "female relative"
                                                         : "relative";
        std::string what = c.ref >= 0 ? out_->concepts[c.ref].label : "";
        if (fam.or_died_in_infancy()) {
          what = what.empty() ? "death in infancy" : absl::StrCat(what, " or death in infancy");
        }
        c.description = absl::StrCat(
            c.count > 1 ? absl::StrCat(c.count, "+ ") : "", who,
            fam.line() == cds::v1::FamilyHistoryCondition::MATERNAL_X_LINE
                ? " in the maternal X line"
                : "",
            " with ", what);
        break;
      }
      case cds::v1::Condition::kConsanguinity:
        c.kind = K::kConsanguinity;
        c.count = cond.consanguinity() ? 1 : 0;
        c.description = cond.consanguinity() ? "Consanguineous parents" : "Parents not consanguineous";
        break;
      case cds::v1::Condition::kAll:
      case cds::v1::Condition::kAny: {
        const bool is_all = cond.kind_case() == cds::v1::Condition::kAll;
        const auto& list = is_all ? cond.all() : cond.any();
        const Src list_at = Child(at, cond, is_all ? "all" : "any");
        if (list.conditions().empty()) {
          Error(kRuleSetFile, list_at, rule_id,
                absl::StrCat(is_all ? "all" : "any", " has no conditions"));
          return -1;
        }
        c.kind = is_all ? K::kAll : K::kAny;
        if (!CompileChildren(list.conditions(), list_at, list, rule_id, allow_probability,
                             &c.children)) {
          return -1;
        }
        c.description = JoinChildren(c.children, is_all ? " and " : " or ");
        break;
      }
      case cds::v1::Condition::kNot: {
        c.kind = K::kNot;
        const ConditionId child =
            CompileCondition(cond.not_(), Child(at, cond, "not"), rule_id, allow_probability);
        if (child < 0) return -1;
        c.children.push_back(child);
        c.description = absl::StrCat("not (", out_->conditions[child].description, ")");
        break;
      }
      case cds::v1::Condition::kAtLeast: {
        const auto& al = cond.at_least();
        const Src al_at = Child(at, cond, "at_least");
        if (al.count() < 1 || al.count() > al.conditions_size()) {
          Error(kRuleSetFile, al_at, rule_id,
                absl::StrCat("at_least count must be between 1 and the number of conditions (",
                             al.conditions_size(), ")"));
          return -1;
        }
        c.kind = K::kAtLeast;
        c.count = al.count();
        if (!CompileChildren(al.conditions(), al_at, al, rule_id, allow_probability,
                             &c.children)) {
          return -1;
        }
        c.description =
            absl::StrCat("at least ", al.count(), " of: ", JoinChildren(c.children, "; "));
        break;
      }
      case cds::v1::Condition::kProbability: {
        const auto& p = cond.probability();
        const Src p_at = Child(at, cond, "probability");
        if (!allow_probability) {
          Error(kRuleSetFile, p_at, rule_id,
                "probability conditions are allowed only in action rules");
          return -1;
        }
        auto it = hypothesis_index_.find(p.hypothesis());
        if (it == hypothesis_index_.end()) {
          Error(kRuleSetFile, p_at, rule_id,
                absl::StrCat("unknown hypothesis '", p.hypothesis(), "'"));
          return -1;
        }
        if (!std::isfinite(p.at_least()) || p.at_least() < 0 || p.at_least() > 1) {
          Error(kRuleSetFile, p_at, rule_id, "probability at_least must be in [0, 1]");
          return -1;
        }
        if (p.in_top() < 0) {
          Error(kRuleSetFile, p_at, rule_id, "probability in_top must not be negative");
          return -1;
        }
        c.kind = K::kProbability;
        c.ref = it->second;
        c.value = p.at_least();
        c.count = p.in_top();
        out_->max_in_top = std::max(out_->max_in_top, c.count);
        c.description = absl::StrCat("P(", out_->hypotheses[c.ref].title, ") >= ",
                                     FormatNumber(c.value));
        if (c.count > 0) absl::StrAppend(&c.description, ", within the top ", c.count);
        break;
      }
    }
    // Identical conditions (the same test on the same fact, e.g. "sex MALE" or an age band
    // that many hypotheses weigh) share one id, so the engine's per-call memo evaluates
    // each once however many rules use it.
    std::string key = absl::StrCat(static_cast<int>(c.kind), "|", c.ref, "|", c.count, "|",
                                   absl::Hex(absl::bit_cast<uint64_t>(c.value)), "|",
                                   static_cast<int>(c.lab_threshold), "|",
                                   absl::Hex(absl::bit_cast<uint64_t>(c.ages.from)), "|",
                                   absl::Hex(absl::bit_cast<uint64_t>(c.ages.to)), "|",
                                   static_cast<int>(c.family_line), "|",
                                   static_cast<int>(c.family_sex), "|",
                                   c.family_or_died_in_infancy ? 1 : 0, "|",
                                   absl::StrJoin(c.children, ","), "|", c.description);
    auto [it, inserted] = condition_ids_.emplace(
        std::move(key), static_cast<ConditionId>(out_->conditions.size()));
    if (inserted) out_->conditions.push_back(std::move(c));
    return it->second;
  }

  bool CompileChildren(const google::protobuf::RepeatedPtrField<cds::v1::Condition>& children,
                       const Src& at, const Message& parent, const std::string& rule_id,
                       bool allow_probability, std::vector<ConditionId>* out) {
    bool ok = true;
    for (int i = 0; i < children.size(); ++i) {
      const ConditionId id = CompileCondition(children[i], Child(at, parent, "conditions", i),
                                              rule_id, allow_probability);
      if (id < 0) {
        ok = false;
        continue;
      }
      out->push_back(id);
    }
    return ok;
  }

  std::string JoinChildren(const std::vector<ConditionId>& children, const char* sep) {
    std::vector<std::string> parts;
    for (ConditionId id : children) parts.push_back(out_->conditions[id].description);
    return absl::StrJoin(parts, sep);
  }

  // ---- pass: hypotheses ---------------------------------------------------------------
  void CompileHypotheses() {
    const cds::v1::RuleSet& rs = out_->definition;
    const Src root{&rules_tree_, 1, 1};
    // Ids first, so that probability conditions in actions can refer to any hypothesis.
    for (int i = 0; i < rs.hypotheses_size(); ++i) {
      const auto& h = rs.hypotheses(i);
      const Src at = Child(root, rs, "hypotheses", i);
      if (!IsIdentifier(h.id())) {
        Error(kRuleSetFile, at, h.id(), "hypothesis id must be a lower-case identifier");
        continue;
      }
      if (!rule_ids_.insert(h.id()).second) {
        Error(kRuleSetFile, at, h.id(), absl::StrCat("duplicate rule id '", h.id(), "'"));
        continue;
      }
      hypothesis_index_.emplace(h.id(), static_cast<int32_t>(out_->hypotheses.size()));
      CompiledHypothesis compiled;
      compiled.id = h.id();
      compiled.title = h.title().empty() ? h.id() : h.title();
      out_->hypotheses.push_back(std::move(compiled));
      hypothesis_sources_.push_back(i);
    }
    double pretest_sum = 0;
    for (size_t hi = 0; hi < out_->hypotheses.size(); ++hi) {
      const auto& h = rs.hypotheses(hypothesis_sources_[hi]);
      const Src at = Child(root, rs, "hypotheses", hypothesis_sources_[hi]);
      CompiledHypothesis& compiled = out_->hypotheses[hi];
      if (h.title().empty()) Error(kRuleSetFile, at, h.id(), "hypothesis has no title");
      if (h.has_code()) {
        std::string key;
        CheckCode(h.code(), Child(at, h, "code"), h.id(), &key);
        compiled.code = h.code();
        compiled.code.set_system(NormalizeSystem(h.code().system(), h.code().code()));
      } else {
        Warn(kRuleSetFile, at, h.id(), "hypothesis has no disease code (OMIM or ORPHA)");
      }
      compiled.detail = h.detail();
      if (!IsProbability(h.pretest_probability())) {
        Error(kRuleSetFile, Child(at, h, "pretest_probability"), h.id(),
              "pretest_probability must be in (0, 1)");
      } else {
        pretest_sum += h.pretest_probability();
      }
      CheckProvenance(h.pretest_provenance(), h.has_pretest_provenance(),
                      Child(at, h, "pretest_probability"), h.id(), "pretest_probability");
      compiled.pretest_probability = h.pretest_probability();
      if (h.has_max_probability()) {
        if (!std::isfinite(h.max_probability()) || h.max_probability() <= 0 ||
            h.max_probability() > 1) {
          Error(kRuleSetFile, Child(at, h, "max_probability"), h.id(),
                "max_probability must be in (0, 1]");
        } else {
          compiled.max_probability = h.max_probability();
        }
        CheckProvenance(h.max_probability_provenance(), h.has_max_probability_provenance(),
                        Child(at, h, "max_probability"), h.id(), "max_probability");
      }
      compiled.references = ResolveReferences(h.reference_ids(), at, h, "reference_ids", h.id());
      absl::flat_hash_map<std::string, int32_t> groups;
      absl::flat_hash_set<std::string> evidence_ids;
      for (int e = 0; e < h.evidence_size(); ++e) {
        const auto& ev = h.evidence(e);
        const Src ev_at = Child(at, h, "evidence", e);
        const std::string rule_id = absl::StrCat(h.id(), "/", ev.id());
        if (!IsIdentifier(ev.id())) {
          Error(kRuleSetFile, ev_at, rule_id, "evidence id must be a lower-case identifier");
          continue;
        }
        if (!evidence_ids.insert(ev.id()).second) {
          Error(kRuleSetFile, ev_at, rule_id, absl::StrCat("duplicate evidence id '", ev.id(), "'"));
          continue;
        }
        CompiledEvidence compiled_ev;
        compiled_ev.id = rule_id;
        compiled_ev.hypothesis = static_cast<int32_t>(hi);
        compiled_ev.source = absl::StrCat(
            kRuleSetFile, ":",
            locations_ ? ev_at.line : source_lines_->evidence[hypothesis_sources_[hi]][e]);
        if (!ev.has_when()) {
          Error(kRuleSetFile, ev_at, rule_id, "evidence has no 'when' condition");
          continue;
        }
        compiled_ev.condition = CompileCondition(ev.when(), Child(ev_at, ev, "when"), rule_id,
                                                 /*allow_probability=*/false);
        compiled_ev.description =
            !ev.description().empty()
                ? ev.description()
                : (compiled_ev.condition >= 0 ? out_->conditions[compiled_ev.condition].description
                                              : ev.id());
        if (!CompileWeight(ev, ev_at, rule_id, &compiled_ev)) continue;
        CheckProvenance(ev.provenance(), ev.has_provenance(), ev_at, rule_id, "evidence weight");
        if (!ev.group().empty()) {
          auto [it, inserted] =
              groups.emplace(ev.group(), static_cast<int32_t>(groups.size()));
          compiled_ev.group = it->second;
        }
        if (compiled_ev.condition < 0) continue;
        compiled.evidence.push_back(static_cast<int32_t>(out_->evidence.size()));
        out_->evidence.push_back(std::move(compiled_ev));
      }
      compiled.group_count = static_cast<int32_t>(groups.size());
      out_->max_group_count = std::max(out_->max_group_count, compiled.group_count);
      if (h.evidence().empty()) Warn(kRuleSetFile, at, h.id(), "hypothesis has no evidence");
    }
    if (pretest_sum >= 1) {
      Error(kRuleSetFile, root, "",
            absl::StrCat("pretest probabilities sum to ", FormatNumber(pretest_sum),
                         ": the differential needs them to sum to less than 1"));
    }
  }

  bool CompileWeight(const cds::v1::EvidenceRule& ev, const Src& at, const std::string& rule_id,
                     CompiledEvidence* out) {
    switch (ev.weight_case()) {
      case cds::v1::EvidenceRule::WEIGHT_NOT_SET:
        Error(kRuleSetFile, at, rule_id, "evidence needs frequencies or likelihood_ratios");
        return false;
      case cds::v1::EvidenceRule::kFrequencies: {
        const auto& f = ev.frequencies();
        const Src f_at = Child(at, ev, "frequencies");
        if (!IsProbability(f.in_hypothesis()) || !IsProbability(f.in_comparison())) {
          Error(kRuleSetFile, f_at, rule_id,
                "frequencies must be in (0, 1) exclusive (a frequency of 0 or 1 would make one "
                "finding decide alone)");
          return false;
        }
        out->lr_positive = f.in_hypothesis() / f.in_comparison();
        out->lr_negative = (1 - f.in_hypothesis()) / (1 - f.in_comparison());
        out->p_hypothesis = f.in_hypothesis();
        out->p_comparison = f.in_comparison();
        break;
      }
      case cds::v1::EvidenceRule::kLikelihoodRatios: {
        const auto& lr = ev.likelihood_ratios();
        const Src lr_at = Child(at, ev, "likelihood_ratios");
        if (!lr.has_positive() && !lr.has_negative()) {
          Error(kRuleSetFile, lr_at, rule_id, "likelihood_ratios needs positive or negative");
          return false;
        }
        if ((lr.has_positive() && (!std::isfinite(lr.positive()) || lr.positive() <= 0)) ||
            (lr.has_negative() && (!std::isfinite(lr.negative()) || lr.negative() <= 0))) {
          Error(kRuleSetFile, lr_at, rule_id, "likelihood ratios must be positive and finite");
          return false;
        }
        out->lr_positive = lr.has_positive() ? lr.positive() : 1.0;
        out->lr_negative = lr.has_negative() ? lr.negative() : 1.0;
        // LR+ = p/q and LR- = (1-p)/(1-q) give q = (1 - LR-) / (LR+ - LR-) when the two
        // ratios point in opposite directions.
        if ((out->lr_positive > 1 && out->lr_negative < 1) ||
            (out->lr_positive < 1 && out->lr_negative > 1)) {
          const double q = (1 - out->lr_negative) / (out->lr_positive - out->lr_negative);
          const double p = out->lr_positive * q;
          if (q > 0 && q < 1 && p > 0 && p < 1) {
            out->p_hypothesis = p;
            out->p_comparison = q;
          }
        }
        break;
      }
    }
    // Implausible strength is usually a typo (e.g. a percentage written as a fraction).
    constexpr double kImplausibleLr = 1000;
    if (out->lr_positive > kImplausibleLr || out->lr_positive < 1 / kImplausibleLr ||
        out->lr_negative > kImplausibleLr || out->lr_negative < 1 / kImplausibleLr) {
      Warn(kRuleSetFile, at, rule_id,
           absl::StrCat("implausible likelihood ratio (LR+ ", FormatNumber(out->lr_positive),
                        ", LR- ", FormatNumber(out->lr_negative), ")"));
    }
    return true;
  }

  // ---- pass: actions ------------------------------------------------------------------
  void CompileActions() {
    const cds::v1::RuleSet& rs = out_->definition;
    const Src root{&rules_tree_, 1, 1};
    for (int i = 0; i < rs.actions_size(); ++i) {
      const auto& a = rs.actions(i);
      const Src at = Child(root, rs, "actions", i);
      if (!IsIdentifier(a.id())) {
        Error(kRuleSetFile, at, a.id(), "action id must be a lower-case identifier");
        continue;
      }
      if (!rule_ids_.insert(a.id()).second) {
        Error(kRuleSetFile, at, a.id(), absl::StrCat("duplicate rule id '", a.id(), "'"));
        continue;
      }
      CompiledAction compiled;
      compiled.id = a.id();
      compiled.kind = a.kind();
      if (a.kind() != cds::v1::TEST && a.kind() != cds::v1::REFERRAL &&
          a.kind() != cds::v1::TREATMENT && a.kind() != cds::v1::ALERT) {
        Error(kRuleSetFile, at, a.id(), "action kind must be TEST, REFERRAL, TREATMENT or ALERT");
      }
      if (a.urgency() == cds::v1::URGENCY_UNSPECIFIED) {
        Error(kRuleSetFile, at, a.id(), "action urgency is required (INFO, WARNING, CRITICAL)");
      }
      if (a.title().empty()) Error(kRuleSetFile, at, a.id(), "action has no title");
      if (a.has_code()) {
        std::string key;
        CheckCode(a.code(), Child(at, a, "code"), a.id(), &key);
        compiled.code = a.code();
        compiled.code.set_system(NormalizeSystem(a.code().system(), a.code().code()));
      }
      compiled.title = a.title();
      compiled.detail = a.detail();
      compiled.urgency = a.urgency();
      compiled.priority = a.priority();
      compiled.source =
          absl::StrCat(kRuleSetFile, ":", locations_ ? at.line : source_lines_->actions[i]);
      compiled.references = ResolveReferences(a.reference_ids(), at, a, "reference_ids", a.id());
      if (a.has_information() && !CompileInformation(a, at, &compiled)) continue;
      if (!a.has_when()) {
        if (!a.has_information()) {
          Error(kRuleSetFile, at, a.id(), "action has no 'when' condition");
          continue;
        }
      } else {
        compiled.condition =
            CompileCondition(a.when(), Child(at, a, "when"), a.id(), /*allow_probability=*/true);
        if (compiled.condition < 0) continue;
      }
      CheckActionProvenance(a, at);
      if (!compiled.reveals.empty()) {
        out_->information_actions.push_back(static_cast<int32_t>(out_->actions.size()));
      }
      action_locations_.push_back(at);
      out_->actions.push_back(std::move(compiled));
    }
  }

  // An action decided on numbers (a probability threshold, an age, a lab limit, a count, a
  // minimum gain) needs them sourced like every other number. Only a warning when missing:
  // versions published before ActionRule.provenance existed must still load.
  void CheckActionProvenance(const cds::v1::ActionRule& a, const Src& at) {
    const bool has_numbers = (a.has_when() && ConditionHasNumbers(a.when())) ||
                             (a.has_information() && a.information().min_gain_bits() != 0);
    if (a.has_provenance()) {
      CheckProvenance(a.provenance(), true, Child(at, a, "provenance"), a.id(),
                      "the action's set of thresholds");
    } else if (has_numbers) {
      Warn(kRuleSetFile, at, a.id(),
           "the numbers this action is decided on need a provenance: cite reference_ids or "
           "mark it assumption: true");
    }
  }

  static bool AgeRangeSet(const cds::v1::AgeRange& range) {
    return range.has_from() || range.has_to();
  }

  static bool ConditionHasNumbers(const cds::v1::Condition& cond) {
    using C = cds::v1::Condition;
    auto any_child = [](const auto& conditions) {
      return std::any_of(conditions.begin(), conditions.end(), ConditionHasNumbers);
    };
    switch (cond.kind_case()) {
      case C::kFinding:
        return AgeRangeSet(cond.finding().onset());
      case C::kLab:
        return true;  // every lab condition has a threshold
      case C::kAge:
        return AgeRangeSet(cond.age());
      case C::kFamily:
        return cond.family().min_count() > 1;
      case C::kAll:
        return any_child(cond.all().conditions());
      case C::kAny:
        return any_child(cond.any().conditions());
      case C::kNot:
        return ConditionHasNumbers(cond.not_());
      case C::kAtLeast:
        return true;  // the count
      case C::kProbability:
        return true;  // the threshold
      case C::kSex:
      case C::kConsanguinity:
      case C::KIND_NOT_SET:
        return false;
    }
    return false;
  }

  bool CompileInformation(const cds::v1::ActionRule& a, const Src& at, CompiledAction* out) {
    const auto& info = a.information();
    const Src info_at = Child(at, a, "information");
    bool ok = true;
    if (a.kind() != cds::v1::TEST) {
      Error(kRuleSetFile, info_at, a.id(), "only TEST actions can have an information value");
      ok = false;
    }
    for (const std::string& lab : info.labs()) {
      auto it = lab_index_.find(lab);
      if (it == lab_index_.end()) {
        Error(kRuleSetFile, info_at, a.id(), absl::StrCat("unknown lab '", lab, "'"));
        ok = false;
        continue;
      }
      out->reveals.push_back(FactKey{FactKey::Kind::kLab, it->second});
    }
    for (const std::string& concept_id : info.concepts()) {
      auto it = concept_index_.find(concept_id);
      if (it == concept_index_.end()) {
        Error(kRuleSetFile, info_at, a.id(), absl::StrCat("unknown concept '", concept_id, "'"));
        ok = false;
        continue;
      }
      used_concepts_.insert(it->second);
      out->reveals.push_back(FactKey{FactKey::Kind::kConcept, it->second});
    }
    if (info.family_history()) out->reveals.push_back(FactKey{FactKey::Kind::kFamily, 0});
    constexpr size_t kMaxRevealed = 4;  // outcomes are enumerated: 2^n
    if (out->reveals.empty() || out->reveals.size() > kMaxRevealed) {
      Error(kRuleSetFile, info_at, a.id(), "information must name between 1 and 4 labs, concepts or family_history");
      ok = false;
    }
    if (info.min_gain_bits() < 0 || !std::isfinite(info.min_gain_bits())) {
      Error(kRuleSetFile, info_at, a.id(), "min_gain_bits must not be negative");
      ok = false;
    }
    if (info.min_gain_bits() > 0) out->min_gain_bits = info.min_gain_bits();
    return ok;
  }

  // ---- pass: screening target ---------------------------------------------------------
  void CheckScreening() {
    const auto& md = out_->definition.metadata();
    if (!md.has_screening()) return;
    const Src root{&rules_tree_, 1, 1};
    const Src at = Child(Child(root, out_->definition, "metadata"), md, "screening");
    const auto& screening = md.screening();
    if (!hypothesis_index_.contains(screening.hypothesis())) {
      Error(kRuleSetFile, at, "",
            absl::StrCat("screening names unknown hypothesis '", screening.hypothesis(), "'"));
    }
    if (!IsProbability(screening.alert_threshold())) {
      Error(kRuleSetFile, at, "", "screening alert_threshold must be in (0, 1)");
    }
    CheckProvenance(screening.provenance(), screening.has_provenance(), at, "",
                    "screening alert_threshold");
  }

  // ---- pass: embedded test cases ------------------------------------------------------
  void CheckTests() {
    if (!parsed_tests_) return;
    const auto& tests = out_->tests;
    const Src root{&tests_tree_, 1, 1};
    absl::flat_hash_set<std::string> names;
    auto check_hypothesis = [&](const std::string& id, const Src& at, const std::string& name) {
      if (!hypothesis_index_.contains(id)) {
        issues_.push_back(Issue{Issue::Severity::kError, kTestsFile, at.line, at.column, name,
                                absl::StrCat("unknown hypothesis '", id, "'")});
      }
    };
    auto check_action = [&](const std::string& id, const Src& at, const std::string& name) {
      const bool known = std::any_of(out_->actions.begin(), out_->actions.end(),
                                     [&](const CompiledAction& a) { return a.id == id; });
      if (!known) {
        issues_.push_back(Issue{Issue::Severity::kError, kTestsFile, at.line, at.column, name,
                                absl::StrCat("unknown action '", id, "'")});
      }
    };
    for (int i = 0; i < tests.cases_size(); ++i) {
      const auto& tc = tests.cases(i);
      const Src at = Child(root, tests, "cases", i);
      if (tc.name().empty() || !names.insert(tc.name()).second) {
        issues_.push_back(Issue{Issue::Severity::kError, kTestsFile, at.line, at.column, tc.name(),
                                "test case needs a unique name"});
      }
      if (!tc.has_patient()) {
        issues_.push_back(Issue{Issue::Severity::kError, kTestsFile, at.line, at.column, tc.name(),
                                "test case has no patient"});
      }
      const auto& ex = tc.expect();
      const Src ex_at = Child(at, tc, "expect");
      if (!ex.top_diagnosis().empty()) check_hypothesis(ex.top_diagnosis(), ex_at, tc.name());
      for (const auto& id : ex.not_top_diagnosis()) check_hypothesis(id, ex_at, tc.name());
      for (const auto& id : ex.diagnoses_in_top()) check_hypothesis(id, ex_at, tc.name());
      for (const auto& bound : ex.probabilities()) check_hypothesis(bound.hypothesis(), ex_at, tc.name());
      for (const auto& id : ex.actions()) check_action(id, ex_at, tc.name());
      for (const auto& id : ex.absent_actions()) check_action(id, ex_at, tc.name());
      for (const auto& id : ex.actions_in_top()) check_action(id, ex_at, tc.name());
    }
  }

  // ---- lint ---------------------------------------------------------------------------
  void LintUnusedConcepts() {
    for (size_t i = 0; i < out_->concepts.size(); ++i) {
      if (!used_concepts_.contains(static_cast<int32_t>(i))) {
        Warn(kRuleSetFile, concept_locations_[i], out_->concepts[i].id,
             "concept is not used by any rule");
      }
    }
  }

  // Conditions that no patient can satisfy: a posterior above the hypothesis' ceiling, a
  // rank deeper than the differential, two sexes or disjoint ages required together, and
  // tests whose result no evidence would weigh.
  bool CanNeverHold(ConditionId id, std::string* why) const {
    const CompiledCondition& c = out_->conditions[id];
    using K = CompiledCondition::Kind;
    switch (c.kind) {
      case K::kProbability: {
        const auto& h = out_->hypotheses[c.ref];
        if (h.max_probability && c.value > *h.max_probability) {
          *why = absl::StrCat("P(", h.id, ") >= ", FormatNumber(c.value),
                              " is above its max_probability ", FormatNumber(*h.max_probability));
          return true;
        }
        if (c.count > static_cast<int32_t>(out_->hypotheses.size())) {
          *why = absl::StrCat("in_top ", c.count, " is deeper than the ", out_->hypotheses.size(),
                              " hypotheses");
          return true;
        }
        return false;
      }
      case K::kAll: {
        int sex = -1;
        DayRange ages;
        for (ConditionId child : c.children) {
          if (CanNeverHold(child, why)) return true;
          const CompiledCondition& leaf = out_->conditions[child];
          if (leaf.kind == K::kSex) {
            if (sex >= 0 && sex != leaf.count) {
              *why = "it requires two different sexes at once";
              return true;
            }
            sex = leaf.count;
          }
          if (leaf.kind == K::kAge) {
            ages.from = std::max(ages.from, leaf.ages.from);
            ages.to = std::min(ages.to, leaf.ages.to);
            if (ages.from >= ages.to) {
              *why = "it requires ages that do not overlap";
              return true;
            }
          }
        }
        return false;
      }
      case K::kAny: {
        std::string first;
        for (ConditionId child : c.children) {
          std::string child_why;
          if (!CanNeverHold(child, &child_why)) return false;
          if (first.empty()) first = child_why;
        }
        *why = first;
        return true;
      }
      case K::kAtLeast: {
        int possible = 0;
        std::string first;
        for (ConditionId child : c.children) {
          std::string child_why;
          if (CanNeverHold(child, &child_why)) {
            if (first.empty()) first = child_why;
          } else {
            ++possible;
          }
        }
        if (possible < c.count) {
          *why = first;
          return true;
        }
        return false;
      }
      default:
        return false;
    }
  }

  void LintActionsThatCannotFire() {
    for (size_t a = 0; a < out_->actions.size(); ++a) {
      const CompiledAction& action = out_->actions[a];
      std::string why;
      if (action.condition >= 0 && CanNeverHold(action.condition, &why)) {
        Warn(kRuleSetFile, action_locations_[a], action.id,
             absl::StrCat("action can never fire: ", why));
        continue;
      }
      if (action.reveals.empty()) continue;
      bool weighed = false;
      for (const FactKey& key : action.reveals) {
        weighed = weighed || !out_->FrequenciesOn(key).hypotheses.empty();
      }
      if (!weighed) {
        Warn(kRuleSetFile, action_locations_[a], action.id,
             "action can never fire: no evidence with a frequency weighs what the test reveals");
      }
    }
  }

  // ---- pass: index --------------------------------------------------------------------
  // Lists each evidence item and action under every fact that can give one of its leaves a
  // known value; a rule none of whose facts are known evaluates to UNKNOWN and is skipped.
  void BuildTriggerIndex() {
    out_->rules_by_concept.assign(out_->concepts.size(), {});
    out_->rules_by_lab.assign(out_->labs.size(), {});
    out_->actions_by_hypothesis.assign(out_->hypotheses.size(), {});
    for (size_t i = 0; i < out_->evidence.size(); ++i) {
      IndexRule(out_->evidence[i].condition, RuleRef{RuleRef::Kind::kEvidence, static_cast<int32_t>(i)});
    }
    // Per action with a support set, which of sex, age, family and consanguinity is in it
    // (bits 3-6, as TriggerKey kinds); -1 for an action listed under all its leaves.
    std::vector<int> support_kinds(out_->actions.size(), -1);
    for (size_t i = 0; i < out_->actions.size(); ++i) {
      if (out_->actions[i].condition < 0) continue;
      const RuleRef ref{RuleRef::Kind::kAction, static_cast<int32_t>(i)};
      // An action fires only when its condition is TRUE: it needs evaluating only when one
      // of the facts without which it cannot be is known (e.g. the findings of "infant and
      // any of these findings", not the age every patient has). rules_on_sex and the like
      // still list it, since they also say what the rule set weighs.
      std::vector<TriggerKey> support;
      if (!Support(out_->actions[i].condition, /*want_true=*/true, &support)) {
        IndexRule(out_->actions[i].condition, ref);
        continue;
      }
      IndexRule(out_->actions[i].condition, ref, /*patient_level_only=*/true);
      support_kinds[i] = 0;
      for (const TriggerKey& key : support) {
        if (key.first >= 3) {
          support_kinds[i] |= 1 << key.first;
        } else if (key.first == 2) {
          const CompiledCondition& leaf = out_->conditions[key.second];
          out_->actions_by_hypothesis[leaf.ref].push_back({ref.index, leaf.value, leaf.count});
        } else if (std::vector<RuleRef>* list = TriggerList(key); list != nullptr) {
          list->push_back(ref);
        }
      }
    }
    out_->trigger_floor = std::numeric_limits<double>::infinity();
    auto key = [](const ProbabilityTrigger& t) { return std::tie(t.action, t.at_least, t.in_top); };
    for (auto& triggers : out_->actions_by_hypothesis) {
      std::sort(triggers.begin(), triggers.end(),
                [&](const auto& a, const auto& b) { return key(a) < key(b); });
      triggers.erase(std::unique(triggers.begin(), triggers.end(),
                                 [&](const auto& a, const auto& b) { return key(a) == key(b); }),
                     triggers.end());
      for (const ProbabilityTrigger& t : triggers) {
        if (t.in_top == 0) out_->trigger_floor = std::min(out_->trigger_floor, t.at_least);
      }
    }
    // What the engine evaluates when the patient-level fact is known.
    auto candidates = [&](const std::vector<RuleRef>& refs, int kind) {
      std::vector<RuleRef> kept;
      for (const RuleRef& r : refs) {
        if (r.kind == RuleRef::Kind::kAction && support_kinds[r.index] >= 0 &&
            (support_kinds[r.index] & (1 << kind)) == 0) {
          continue;
        }
        kept.push_back(r);
      }
      return kept;
    };
    out_->candidates_on_sex = candidates(out_->rules_on_sex, 3);
    out_->candidates_on_age = candidates(out_->rules_on_age, 4);
    out_->candidates_on_family = candidates(out_->rules_on_family, 5);
    out_->candidates_on_consanguinity = candidates(out_->rules_on_consanguinity, 6);
    out_->labs_weighed_by_evidence.clear();
    for (size_t lab = 0; lab < out_->labs.size(); ++lab) {
      const auto& refs = out_->rules_by_lab[lab];
      if (std::any_of(refs.begin(), refs.end(),
                      [](const RuleRef& r) { return r.kind == RuleRef::Kind::kEvidence; })) {
        out_->labs_weighed_by_evidence.push_back(static_cast<int32_t>(lab));
      }
    }
    SetIdRanks(&out_->hypotheses);
    SetIdRanks(&out_->actions);
    out_->hypotheses_by_pretest.clear();
    out_->pretest_sum = 0;
    for (size_t h = 0; h < out_->hypotheses.size(); ++h) {
      out_->hypotheses_by_pretest.push_back(static_cast<int32_t>(h));
      out_->pretest_sum += out_->hypotheses[h].pretest_probability;
    }
    std::sort(out_->hypotheses_by_pretest.begin(), out_->hypotheses_by_pretest.end(),
              [&](int32_t a, int32_t b) {
                const auto& x = out_->hypotheses[a];
                const auto& y = out_->hypotheses[b];
                if (x.pretest_probability != y.pretest_probability) {
                  return x.pretest_probability > y.pretest_probability;
                }
                return x.id < y.id;
              });
    SetIdRanks(&out_->evidence);
    for (CompiledEvidence& ev : out_->evidence) {
      ev.log_lr_positive = std::log(ev.lr_positive);
      ev.log_lr_negative = std::log(ev.lr_negative);
      ev.strength = std::fabs(ev.log_lr_positive) + std::fabs(ev.log_lr_negative);
      ev.shown_lr_positive = std::exp(ev.log_lr_positive);
      ev.shown_lr_negative = std::exp(ev.log_lr_negative);
    }
    {
      // Every (item, outcome) in explanation order: |log LR| descending, then id rank.
      std::vector<std::pair<int32_t, bool>> outcomes;
      for (size_t e = 0; e < out_->evidence.size(); ++e) {
        outcomes.emplace_back(static_cast<int32_t>(e), true);
        outcomes.emplace_back(static_cast<int32_t>(e), false);
      }
      auto magnitude = [&](const std::pair<int32_t, bool>& o) {
        const CompiledEvidence& ev = out_->evidence[o.first];
        return std::fabs(o.second ? ev.log_lr_positive : ev.log_lr_negative);
      };
      std::sort(outcomes.begin(), outcomes.end(), [&](const auto& a, const auto& b) {
        if (magnitude(a) != magnitude(b)) return magnitude(a) > magnitude(b);
        const int32_t ra = out_->evidence[a.first].id_rank;
        const int32_t rb = out_->evidence[b.first].id_rank;
        if (ra != rb) return ra < rb;
        return a.second && !b.second;  // one item's two outcomes never meet in one list
      });
      for (size_t r = 0; r < outcomes.size(); ++r) {
        CompiledEvidence& ev = out_->evidence[outcomes[r].first];
        (outcomes[r].second ? ev.explain_rank_positive : ev.explain_rank_negative) =
            static_cast<int32_t>(r);
      }
    }
    out_->evidence_scores.clear();
    for (const CompiledEvidence& ev : out_->evidence) {
      EvidenceScore& score = out_->evidence_scores.emplace_back();
      score.condition = ev.condition;
      score.hypothesis = ev.hypothesis;
      score.group = ev.group;
      const CompiledCondition& c = out_->conditions[ev.condition];
      if (c.kind == CompiledCondition::Kind::kFinding && c.ages.unbounded()) {
        score.finding_concept = c.ref;
      }
      score.log_lr_positive = ev.log_lr_positive;
      score.log_lr_negative = ev.log_lr_negative;
    }
    // Per fact, the single-leaf evidence with a frequency, in evidence order (so each
    // hypothesis' items are contiguous).
    std::vector<std::vector<int32_t>> leaf_by_concept(out_->concepts.size());
    std::vector<std::vector<int32_t>> leaf_by_lab(out_->labs.size());
    std::vector<int32_t> leaf_on_family;
    for (size_t i = 0; i < out_->evidence.size(); ++i) {
      const CompiledEvidence& ev = out_->evidence[i];
      if (ev.p_hypothesis < 0) continue;
      const CompiledCondition& c = out_->conditions[ev.condition];
      const int32_t index = static_cast<int32_t>(i);
      switch (c.kind) {
        case CompiledCondition::Kind::kFinding:
          leaf_by_concept[c.ref].push_back(index);
          break;
        case CompiledCondition::Kind::kLab:
          leaf_by_lab[c.ref].push_back(index);
          break;
        case CompiledCondition::Kind::kFamily:
          leaf_on_family.push_back(index);
          break;
        default:
          break;
      }
    }
    out_->frequencies_by_concept.clear();
    for (const auto& items : leaf_by_concept) {
      out_->frequencies_by_concept.push_back(Frequencies(items));
    }
    out_->frequencies_by_lab.clear();
    for (const auto& items : leaf_by_lab) out_->frequencies_by_lab.push_back(Frequencies(items));
    out_->frequencies_on_family = Frequencies(leaf_on_family);
    out_->information_actions_by_hypothesis.assign(out_->hypotheses.size(), {});
    for (int32_t a : out_->information_actions) {
      absl::flat_hash_set<int32_t> moved;
      for (const FactKey& key : out_->actions[a].reveals) {
        for (const auto& in : out_->FrequenciesOn(key).hypotheses) moved.insert(in.hypothesis);
      }
      for (int32_t h : moved) out_->information_actions_by_hypothesis[h].push_back(a);
    }
    for (auto& list : out_->information_actions_by_hypothesis) std::sort(list.begin(), list.end());
  }

  // A fact's frequencies from its single-leaf `items` (evidence order): per hypothesis its
  // strongest item (the first of equals), and the comparison population's frequency as the
  // mean of those items' own (facts are taken as independent given the diagnosis).
  FactFrequencies Frequencies(const std::vector<int32_t>& items) const {
    FactFrequencies out;
    double q_sum = 0;
    for (size_t i = 0; i < items.size();) {
      const int32_t h = out_->evidence[items[i]].hypothesis;
      const CompiledEvidence* best = &out_->evidence[items[i]];
      size_t j = i + 1;
      for (; j < items.size() && out_->evidence[items[j]].hypothesis == h; ++j) {
        if (out_->evidence[items[j]].strength > best->strength) best = &out_->evidence[items[j]];
      }
      q_sum += best->p_comparison;
      out.hypotheses.push_back({h, best->p_hypothesis, BernoulliEntropyBits(best->p_hypothesis)});
      i = j;
    }
    if (!out.hypotheses.empty()) {
      out.p_comparison = q_sum / static_cast<double>(out.hypotheses.size());
      out.comparison_entropy_bits = BernoulliEntropyBits(out.p_comparison);
    }
    return out;
  }

  // Sets each item's id_rank: its position among the items' ids in ascending order (the
  // engine breaks ties on it without comparing strings).
  template <typename T>
  static void SetIdRanks(std::vector<T>* items) {
    std::vector<int32_t> by_id(items->size());
    for (size_t i = 0; i < by_id.size(); ++i) by_id[i] = static_cast<int32_t>(i);
    std::sort(by_id.begin(), by_id.end(),
              [&](int32_t a, int32_t b) { return (*items)[a].id < (*items)[b].id; });
    for (size_t r = 0; r < by_id.size(); ++r) (*items)[by_id[r]].id_rank = static_cast<int32_t>(r);
  }

  // A fact the trigger index lists rules under: (kind, index) as in IndexRule.
  using TriggerKey = std::pair<int, int32_t>;

  std::vector<RuleRef>* TriggerList(const TriggerKey& key) {
    switch (key.first) {
      case 0: return &out_->rules_by_concept[key.second];
      case 1: return &out_->rules_by_lab[key.second];
      case 3: return &out_->rules_on_sex;
      case 4: return &out_->rules_on_age;
      case 5: return &out_->rules_on_family;
      case 6: return &out_->rules_on_consanguinity;
    }
    return nullptr;
  }

  // The facts at least one of which must be known for condition `id` to be TRUE (or, with
  // !want_true, FALSE), as a sorted set in `out`; false when there is no such set. A
  // probability leaf counts as a fact for TRUE (key {2, its condition id}: the ranking must
  // reach its hypothesis); it needs none to be FALSE. Sound, not minimal: `all` takes one
  // child's set.
  bool Support(ConditionId id, bool want_true, std::vector<TriggerKey>* out) {
    const CompiledCondition& c = out_->conditions[id];
    using K = CompiledCondition::Kind;
    out->clear();
    switch (c.kind) {
      case K::kFinding: out->push_back({0, c.ref}); return true;
      case K::kLab: out->push_back({1, c.ref}); return true;
      case K::kSex: out->push_back({3, 0}); return true;
      case K::kAge: out->push_back({4, 0}); return true;
      case K::kFamily: out->push_back({5, 0}); return true;
      case K::kConsanguinity: out->push_back({6, 0}); return true;
      case K::kProbability:
        if (!want_true) return false;
        out->push_back({2, id});
        return true;
      case K::kNot: return Support(c.children[0], !want_true, out);
      case K::kAll:
      case K::kAny:
      case K::kAtLeast:
        break;
    }
    // Every child must have the value (all TRUE, any FALSE): one child's set will do,
    // preferably one without sex, age or family, which most patients have.
    const bool every_child = (c.kind == K::kAll) == want_true && c.kind != K::kAtLeast;
    std::vector<TriggerKey> child;
    if (every_child) {
      bool found = false;
      int best_cost = 0;
      for (ConditionId id_child : c.children) {
        if (!Support(id_child, want_true, &child)) continue;
        int cost = static_cast<int>(child.size());
        for (const TriggerKey& key : child) {
          if (key.first >= 3) cost += 1000;
        }
        if (!found || cost < best_cost) {
          found = true;
          best_cost = cost;
          *out = child;
        }
      }
      return found;
    }
    // Some child must have the value (at_least: a TRUE child, or for FALSE a FALSE one).
    for (ConditionId id_child : c.children) {
      if (!Support(id_child, want_true, &child)) return false;
      out->insert(out->end(), child.begin(), child.end());
    }
    std::sort(out->begin(), out->end());
    out->erase(std::unique(out->begin(), out->end()), out->end());
    return true;
  }

  // With `patient_level_only`, lists the rule only under sex, age, family history and
  // consanguinity.
  void IndexRule(ConditionId root, RuleRef ref, bool patient_level_only = false) {
    // Each list gets the rule at most once.
    absl::flat_hash_set<std::pair<int, int32_t>> seen;
    std::vector<ConditionId> stack = {root};
    while (!stack.empty()) {
      const CompiledCondition& c = out_->conditions[stack.back()];
      stack.pop_back();
      using K = CompiledCondition::Kind;
      std::vector<RuleRef>* list = nullptr;
      std::pair<int, int32_t> key;
      switch (c.kind) {
        case K::kFinding: list = &out_->rules_by_concept[c.ref]; key = {0, c.ref}; break;
        case K::kLab: list = &out_->rules_by_lab[c.ref]; key = {1, c.ref}; break;
        case K::kProbability:
          // Evaluated whenever the ranking reaches the hypothesis (a rule without a support
          // set: e.g. a negated probability leaf).
          if (!patient_level_only && ref.kind == RuleRef::Kind::kAction &&
              seen.insert({2, c.ref}).second) {
            out_->actions_by_hypothesis[c.ref].push_back({ref.index, 0.0, 0});
          }
          break;
        case K::kSex: list = &out_->rules_on_sex; key = {3, 0}; break;
        case K::kAge: list = &out_->rules_on_age; key = {4, 0}; break;
        case K::kFamily: list = &out_->rules_on_family; key = {5, 0}; break;
        case K::kConsanguinity: list = &out_->rules_on_consanguinity; key = {6, 0}; break;
        case K::kAll:
        case K::kAny:
        case K::kNot:
        case K::kAtLeast:
          stack.insert(stack.end(), c.children.begin(), c.children.end());
          break;
      }
      if (patient_level_only && key.first < 3) continue;
      if (list != nullptr && seen.insert(key).second) list->push_back(ref);
    }
  }

  struct PendingReference {
    std::string id;
    Src at;
    std::string rule_id;
  };

  const RuleSetSource& source_;
  const bool locations_;
  bool complete_ = true;
  std::optional<SourceLines> source_lines_;  // without locations only
  std::shared_ptr<CompiledRuleSet> out_;
  std::vector<Issue> issues_;
  TextFormat::ParseInfoTree rules_tree_;
  TextFormat::ParseInfoTree tests_tree_;
  bool parsed_rule_set_ = false;
  bool parsed_tests_ = false;
  std::vector<PendingReference> pending_reference_checks_;
  absl::flat_hash_map<std::string, int> references_;
  absl::flat_hash_map<std::string, int32_t> concept_index_;
  std::vector<Src> concept_locations_;
  std::vector<Src> action_locations_;
  absl::flat_hash_set<int32_t> used_concepts_;
  // Condition content -> its id (identical conditions are compiled once).
  absl::flat_hash_map<std::string, ConditionId> condition_ids_;
  absl::flat_hash_map<std::string, int32_t> lab_index_;
  absl::flat_hash_map<std::string, int32_t> hypothesis_index_;
  std::vector<int> hypothesis_sources_;
  absl::flat_hash_set<std::string> rule_ids_;
};

}  // namespace

std::string Issue::ToString() const {
  std::string where = file;
  if (line > 0) absl::StrAppend(&where, ":", line);
  if (line > 0 && column > 0) absl::StrAppend(&where, ":", column);
  return absl::StrCat(where, ": ", severity == Severity::kError ? "error" : "warning", ": ",
                      rule_id.empty() ? "" : absl::StrCat("[", rule_id, "] "), message);
}

std::string CompileResult::IssuesToString() const {
  std::vector<std::string> lines;
  for (const Issue& issue : issues) lines.push_back(issue.ToString());
  return absl::StrJoin(lines, "\n");
}

CompileResult Compile(const RuleSetSource& source) {
  // A compile that finds nothing to report (every publish of a clean rule set) goes without
  // the parser's location tree: recording every field's location was a third of the parse,
  // and freeing the tree as much again. The two kinds of lines it keeps come from a scan of
  // the file. At the first issue (its location unknown), or on syntax the scan does not
  // follow, the rule set is compiled again with the tree: the same result either way.
  Compilation fast(source, /*locations=*/false);
  CompileResult result = fast.Run();
  if (fast.complete()) return result;
  return Compilation(source, /*locations=*/true).Run();
}

std::string DigestFiles(const std::vector<SourceFile>& files) {
  std::vector<const SourceFile*> sorted;
  for (const SourceFile& f : files) sorted.push_back(&f);
  std::sort(sorted.begin(), sorted.end(),
            [](const SourceFile* a, const SourceFile* b) { return a->path < b->path; });
  EVP_MD_CTX* ctx = EVP_MD_CTX_new();
  EVP_DigestInit_ex(ctx, EVP_sha256(), nullptr);
  for (const SourceFile* f : sorted) {
    const std::string header = absl::StrCat(f->path, std::string(1, '\0'), f->content.size(),
                                            std::string(1, '\0'));
    EVP_DigestUpdate(ctx, header.data(), header.size());
    EVP_DigestUpdate(ctx, f->content.data(), f->content.size());
  }
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int length = 0;
  EVP_DigestFinal_ex(ctx, digest, &length);
  EVP_MD_CTX_free(ctx);
  std::string hex = "sha256:";
  for (unsigned int i = 0; i < length; ++i) absl::StrAppendFormat(&hex, "%02x", digest[i]);
  return hex;
}

}  // namespace cds::compiler
