#include "server/audit/journal.h"

#include <fcntl.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <cstring>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"

namespace cds::audit {
namespace {

constexpr uint32_t kMagic = 0x4a414443;  // "CDAJ" on disk
constexpr size_t kHeaderBytes = 12;
// No record comes near this; a larger length field is damage, not a record.
constexpr uint32_t kMaxPayloadBytes = 1 << 24;

// Byte-wise table for the reflected Castagnoli polynomial.
constexpr std::array<uint32_t, 256> MakeCrcTable() {
  std::array<uint32_t, 256> table{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t crc = i;
    for (int bit = 0; bit < 8; ++bit) crc = (crc >> 1) ^ (0x82f63b78u & (0u - (crc & 1u)));
    table[i] = crc;
  }
  return table;
}
constexpr std::array<uint32_t, 256> kCrcTable = MakeCrcTable();

#if defined(__x86_64__)
bool HasCrc32Instruction() {
  static const bool has = __builtin_cpu_supports("sse4.2");
  return has;
}

__attribute__((target("sse4.2"))) uint32_t Crc32cHardware(uint32_t crc, const char* p,
                                                          size_t n) {
  uint64_t wide = crc;
  for (; n >= 8; p += 8, n -= 8) {
    uint64_t word;
    memcpy(&word, p, sizeof word);
    wide = __builtin_ia32_crc32di(wide, word);
  }
  crc = static_cast<uint32_t>(wide);
  for (; n > 0; ++p, --n) crc = __builtin_ia32_crc32qi(crc, static_cast<unsigned char>(*p));
  return crc;
}
#endif

void Put32(uint32_t v, std::string* out) {
  const char bytes[4] = {static_cast<char>(v), static_cast<char>(v >> 8),
                         static_cast<char>(v >> 16), static_cast<char>(v >> 24)};
  out->append(bytes, 4);
}
void Put64(uint64_t v, std::string* out) {
  Put32(static_cast<uint32_t>(v), out);
  Put32(static_cast<uint32_t>(v >> 32), out);
}
void PutText(const std::string& s, std::string* out) {
  Put32(static_cast<uint32_t>(s.size()), out);
  out->append(s);
}

uint32_t Get32(const char* p) {
  const auto* u = reinterpret_cast<const unsigned char*>(p);
  return uint32_t{u[0]} | uint32_t{u[1]} << 8 | uint32_t{u[2]} << 16 | uint32_t{u[3]} << 24;
}
uint64_t Get64(const char* p) { return uint64_t{Get32(p)} | uint64_t{Get32(p + 4)} << 32; }

// Reads the payload's fields in order; false once one does not fit.
class PayloadReader {
 public:
  explicit PayloadReader(absl::string_view payload) : rest_(payload) {}
  bool Int64(int64_t* v) {
    if (rest_.size() < 8) return false;
    *v = static_cast<int64_t>(Get64(rest_.data()));
    rest_.remove_prefix(8);
    return true;
  }
  bool Int32(int* v) {
    if (rest_.size() < 4) return false;
    *v = static_cast<int32_t>(Get32(rest_.data()));
    rest_.remove_prefix(4);
    return true;
  }
  bool Text(std::string* s) {
    if (rest_.size() < 4) return false;
    const uint32_t n = Get32(rest_.data());
    rest_.remove_prefix(4);
    if (rest_.size() < n) return false;
    s->assign(rest_.data(), n);
    rest_.remove_prefix(n);
    return true;
  }
  bool done() const { return rest_.empty(); }

 private:
  absl::string_view rest_;
};

bool DecodePayload(absl::string_view payload, AuditRecord* r) {
  PayloadReader in(payload);
  int64_t time_us = 0;
  const bool ok = in.Int64(&r->id) && in.Int64(&time_us) && in.Int64(&r->latency_us) &&
                  in.Int32(&r->status_code) && in.Text(&r->caller) && in.Text(&r->method) &&
                  in.Text(&r->rule_set) && in.Text(&r->digest) && in.Text(&r->pseudonym) &&
                  in.Text(&r->evaluation_id) && in.Text(&r->top_suggestions) && in.done();
  r->time = absl::FromUnixMicros(time_us);
  return ok;
}

// The frame at the start of `bytes`: its length, or 0 when it is not a valid frame.
size_t ValidFrame(absl::string_view bytes, AuditRecord* record) {
  if (bytes.size() < kHeaderBytes || Get32(bytes.data()) != kMagic) return 0;
  const uint32_t length = Get32(bytes.data() + 4);
  if (length > kMaxPayloadBytes || bytes.size() - kHeaderBytes < length) return 0;
  const absl::string_view payload = bytes.substr(kHeaderBytes, length);
  if (Crc32c(payload) != Get32(bytes.data() + 8)) return 0;
  if (!DecodePayload(payload, record)) return 0;
  return kHeaderBytes + length;
}

}  // namespace

uint32_t Crc32c(absl::string_view data) {
  uint32_t crc = 0xffffffffu;
  const char* p = data.data();
  size_t n = data.size();
#if defined(__x86_64__)
  // SSE 4.2's crc32 instruction computes this very CRC, 8 bytes at a time: a frame costs
  // some 50 instructions instead of 3 k with the table.
  if (HasCrc32Instruction()) {
    crc = Crc32cHardware(crc, p, n);
    n = 0;
  }
#endif
  for (; n > 0; ++p, --n) {
    crc = kCrcTable[(crc ^ static_cast<unsigned char>(*p)) & 0xffu] ^ (crc >> 8);
  }
  return crc ^ 0xffffffffu;
}

std::string JournalPath(const std::string& db_path) { return db_path + ".journal"; }

void AppendJournalFrame(const AuditRecord& r, std::string* out) {
  const size_t start = out->size();
  out->append(kHeaderBytes, '\0');  // filled in below, once the payload's length is known
  Put64(static_cast<uint64_t>(r.id), out);
  Put64(static_cast<uint64_t>(absl::ToUnixMicros(r.time)), out);
  Put64(static_cast<uint64_t>(r.latency_us), out);
  Put32(static_cast<uint32_t>(r.status_code), out);
  PutText(r.caller, out);
  PutText(r.method, out);
  PutText(r.rule_set, out);
  PutText(r.digest, out);
  PutText(r.pseudonym, out);
  PutText(r.evaluation_id, out);
  PutText(r.top_suggestions, out);
  const size_t length = out->size() - start - kHeaderBytes;
  std::string header;
  header.reserve(kHeaderBytes);
  Put32(kMagic, &header);
  Put32(static_cast<uint32_t>(length), &header);
  Put32(Crc32c(absl::string_view(*out).substr(start + kHeaderBytes)), &header);
  out->replace(start, kHeaderBytes, header);
}

JournalContents ParseJournal(absl::string_view bytes, bool check_damage) {
  JournalContents contents;
  size_t offset = 0;
  while (offset < bytes.size()) {
    AuditRecord record;
    const size_t length = ValidFrame(bytes.substr(offset), &record);
    if (length == 0) break;
    if (!contents.records.empty() && record.id <= contents.records.back().id) break;
    contents.records.push_back(std::move(record));
    offset += length;
  }
  contents.valid_bytes = offset;
  if (check_damage && offset < bytes.size()) {
    // A torn write leaves at most one partial frame at the end: any valid frame after the
    // invalid one means something else went wrong.
    for (size_t at = offset + 1; at + kHeaderBytes <= bytes.size() && !contents.damaged; ++at) {
      if (Get32(bytes.data() + at) != kMagic) continue;
      AuditRecord record;
      contents.damaged = ValidFrame(bytes.substr(at), &record) != 0;
    }
  }
  return contents;
}

absl::StatusOr<std::string> ReadJournalFile(const std::string& path) {
  const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    if (errno == ENOENT) return std::string();
    return absl::UnavailableError(absl::StrCat("cannot open the audit journal ", path));
  }
  std::string bytes;
  char buffer[1 << 16];
  while (true) {
    const ssize_t n = read(fd, buffer, sizeof buffer);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      close(fd);
      return absl::UnavailableError(absl::StrCat("cannot read the audit journal ", path));
    }
    if (n == 0) break;
    bytes.append(buffer, static_cast<size_t>(n));
  }
  close(fd);
  return bytes;
}

}  // namespace cds::audit
