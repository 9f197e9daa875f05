#pragma once

// The one pair of status macros the project uses (this Abseil has none of its own).

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define CDS_STATUS_CONCAT_INNER_(x, y) x##y
#define CDS_STATUS_CONCAT_(x, y) CDS_STATUS_CONCAT_INNER_(x, y)

// Returns from the enclosing function when `expr` is not OK.
#define CDS_RETURN_IF_ERROR(expr)                   \
  do {                                              \
    ::absl::Status cds_status_ = (expr);            \
    if (!cds_status_.ok()) return cds_status_;      \
  } while (0)

// `lhs` = value of the StatusOr `rexpr`, or returns its status.
#define CDS_ASSIGN_OR_RETURN(lhs, rexpr) \
  CDS_ASSIGN_OR_RETURN_IMPL_(CDS_STATUS_CONCAT_(cds_statusor_, __LINE__), lhs, rexpr)

#define CDS_ASSIGN_OR_RETURN_IMPL_(statusor, lhs, rexpr) \
  auto statusor = (rexpr);                               \
  if (!statusor.ok()) return statusor.status();          \
  lhs = std::move(statusor).value()
