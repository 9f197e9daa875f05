#pragma once

// The audit journal: an append-only file beside the SQLite database (`<db>.journal`) that
// holds each record from the moment its call may be answered until a background thread has
// imported it into the database. A write() to it is what makes a record survive a crash or
// SIGKILL of the server; it costs a few µs where a SQLite commit cost some 50 (three B-tree
// pages, WAL frames and file locks per transaction). Each record is one frame:
//
//   magic (4 bytes) | payload length (4) | CRC32C of the payload (4) | payload
//
// all integers little-endian; the payload holds the record's id, times, status and its
// text fields, each length-prefixed. Ids increase along the file. A crash can leave only the
// last frame torn (records are only ever appended); an invalid frame with a valid one after
// it is damage from elsewhere, which start-up refuses to guess about.

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "server/audit/audit_log.h"

namespace cds::audit {

// CRC-32C (Castagnoli), as in iSCSI and ext4: crc32c("123456789") == 0xe3069283.
uint32_t Crc32c(absl::string_view data);

// The journal that belongs to the database at `db_path`.
std::string JournalPath(const std::string& db_path);

// Appends the frame of `record` (its id included) to `out`.
void AppendJournalFrame(const AuditRecord& record, std::string* out);

struct JournalContents {
  std::vector<AuditRecord> records;  // the valid frames from the start, ids increasing
  size_t valid_bytes = 0;            // where the first invalid frame (or the end) begins
  // An invalid frame is followed by a valid one: not a torn tail but damage.
  bool damaged = false;
};

// Reads frames from the start of `bytes` up to the first invalid one (bad magic, length or
// CRC, truncated, or an id not above the previous one). With `check_damage`, also looks
// past that frame for a valid one (sets `damaged`).
JournalContents ParseJournal(absl::string_view bytes, bool check_damage);

// The whole file at `path`; "" when it does not exist.
absl::StatusOr<std::string> ReadJournalFile(const std::string& path);

}  // namespace cds::audit
