// ThreadSanitizer annotations for Debian's (uninstrumented) Abseil synchronization.
//
// Debian ships libabsl_synchronization.so compiled without -fsanitize=thread, so TSan does
// not see the atomics inside absl::Mutex, absl::CondVar and absl::Notification and reports
// every access to a field guarded by an absl::Mutex as a data race (a false positive: two
// threads incrementing a counter under absl::MutexLock are reported; sanitizers/README.md).
// Rebuilding Abseil is not an option here (Debian's packages are the stack), so TSan builds
// (CDS_SANITIZE=thread) link this file with `-Wl,--wrap=<symbol>` for each entry point
// below: every call that instrumented code (ours, and the inline parts of gRPC/Abseil
// headers) makes into the library goes through a __wrap_ function that calls the real one
// and tells TSan about the happens-before edge it creates (__tsan_release before giving a
// mutex up, __tsan_acquire after taking it). Calls made inside the uninstrumented libraries
// are not annotated; their memory accesses are not instrumented either, so they cannot be
// reported.
//
// Only built with CDS_SANITIZE=thread. The mangled names are those of Debian 12's
// libabsl 20220623 (inline namespace absl::debian3); cmake/Sanitizers.cmake passes
// --wrap for every __wrap_ function defined here (it reads them from this file).

#include <sanitizer/tsan_interface.h>

#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"

using absl::Condition;
using absl::CondVar;
using absl::Duration;
using absl::Mutex;
using absl::Notification;
using absl::Time;

// The member functions are called with `this` as the first argument (Itanium C++ ABI), so
// each is declared here as a free function taking the object pointer first.

extern "C" {

// Mutex: exclusive and shared locking.
void __real__ZN4absl7debian35Mutex4LockEv(Mutex* mu);
void __real__ZN4absl7debian35Mutex6UnlockEv(Mutex* mu);
void __real__ZN4absl7debian35Mutex10ReaderLockEv(Mutex* mu);
void __real__ZN4absl7debian35Mutex12ReaderUnlockEv(Mutex* mu);
bool __real__ZN4absl7debian35Mutex7TryLockEv(Mutex* mu);
bool __real__ZN4absl7debian35Mutex13ReaderTryLockEv(Mutex* mu);

void __wrap__ZN4absl7debian35Mutex4LockEv(Mutex* mu) {
  __real__ZN4absl7debian35Mutex4LockEv(mu);
  __tsan_acquire(mu);
}
void __wrap__ZN4absl7debian35Mutex6UnlockEv(Mutex* mu) {
  __tsan_release(mu);
  __real__ZN4absl7debian35Mutex6UnlockEv(mu);
}
void __wrap__ZN4absl7debian35Mutex10ReaderLockEv(Mutex* mu) {
  __real__ZN4absl7debian35Mutex10ReaderLockEv(mu);
  __tsan_acquire(mu);
}
void __wrap__ZN4absl7debian35Mutex12ReaderUnlockEv(Mutex* mu) {
  __tsan_release(mu);
  __real__ZN4absl7debian35Mutex12ReaderUnlockEv(mu);
}
bool __wrap__ZN4absl7debian35Mutex7TryLockEv(Mutex* mu) {
  const bool locked = __real__ZN4absl7debian35Mutex7TryLockEv(mu);
  if (locked) __tsan_acquire(mu);
  return locked;
}
bool __wrap__ZN4absl7debian35Mutex13ReaderTryLockEv(Mutex* mu) {
  const bool locked = __real__ZN4absl7debian35Mutex13ReaderTryLockEv(mu);
  if (locked) __tsan_acquire(mu);
  return locked;
}
// Conditions. Abseil evaluates a waiter's Condition inside the library, at moments TSan
// cannot see as "lock held" (the reacquisition happens in uninstrumented code), so the
// instrumented condition function would race with the writer that made it true. Instead the
// wrappers evaluate the condition themselves while holding the (annotated) lock and, while it
// is false, release the lock, sleep briefly and take it again: the same semantics, with
// polling latency, in TSan builds only. Exclusive mode only (the project never waits on a
// Condition under a reader lock; ReaderLockWhen* are left unwrapped).
namespace {
// REQUIRES: mu held exclusively (annotated). True when `c` holds, false at `deadline`.
bool PollUntil(Mutex* mu, const Condition& c, Time deadline) {
  while (!c.Eval()) {
    if (absl::Now() >= deadline) return false;
    mu->Unlock();
    absl::SleepFor(absl::Microseconds(200));
    mu->Lock();
  }
  return true;
}
}  // namespace

void __wrap__ZN4absl7debian35Mutex8LockWhenERKNS0_9ConditionE(Mutex* mu, const Condition& c) {
  mu->Lock();
  PollUntil(mu, c, absl::InfiniteFuture());
}
// The *WithTimeout / *WithDeadline forms hold the mutex on return whatever they return.
bool __wrap__ZN4absl7debian35Mutex19LockWhenWithTimeoutERKNS0_9ConditionENS0_8DurationE(
    Mutex* mu, const Condition& c, Duration d) {
  const Time deadline = absl::Now() + d;
  mu->Lock();
  return PollUntil(mu, c, deadline);
}
bool __wrap__ZN4absl7debian35Mutex20LockWhenWithDeadlineERKNS0_9ConditionENS0_4TimeE(
    Mutex* mu, const Condition& c, Time t) {
  mu->Lock();
  return PollUntil(mu, c, t);
}
void __wrap__ZN4absl7debian35Mutex5AwaitERKNS0_9ConditionE(Mutex* mu, const Condition& c) {
  PollUntil(mu, c, absl::InfiniteFuture());
}
bool __wrap__ZN4absl7debian35Mutex16AwaitWithTimeoutERKNS0_9ConditionENS0_8DurationE(
    Mutex* mu, const Condition& c, Duration d) {
  return PollUntil(mu, c, absl::Now() + d);
}
bool __wrap__ZN4absl7debian35Mutex17AwaitWithDeadlineERKNS0_9ConditionENS0_4TimeE(
    Mutex* mu, const Condition& c, Time t) {
  return PollUntil(mu, c, t);
}

// CondVar: the mutex is given up while waiting and held again on return.
void __real__ZN4absl7debian37CondVar4WaitEPNS0_5MutexE(CondVar* cv, Mutex* mu);
bool __real__ZN4absl7debian37CondVar15WaitWithTimeoutEPNS0_5MutexENS0_8DurationE(CondVar* cv,
                                                                                Mutex* mu,
                                                                                Duration d);
bool __real__ZN4absl7debian37CondVar16WaitWithDeadlineEPNS0_5MutexENS0_4TimeE(CondVar* cv,
                                                                              Mutex* mu, Time t);
void __wrap__ZN4absl7debian37CondVar4WaitEPNS0_5MutexE(CondVar* cv, Mutex* mu) {
  __tsan_release(mu);
  __real__ZN4absl7debian37CondVar4WaitEPNS0_5MutexE(cv, mu);
  __tsan_acquire(mu);
}
bool __wrap__ZN4absl7debian37CondVar15WaitWithTimeoutEPNS0_5MutexENS0_8DurationE(CondVar* cv,
                                                                                Mutex* mu,
                                                                                Duration d) {
  __tsan_release(mu);
  const bool timed_out =
      __real__ZN4absl7debian37CondVar15WaitWithTimeoutEPNS0_5MutexENS0_8DurationE(cv, mu, d);
  __tsan_acquire(mu);
  return timed_out;
}
bool __wrap__ZN4absl7debian37CondVar16WaitWithDeadlineEPNS0_5MutexENS0_4TimeE(CondVar* cv,
                                                                              Mutex* mu,
                                                                              Time t) {
  __tsan_release(mu);
  const bool timed_out =
      __real__ZN4absl7debian37CondVar16WaitWithDeadlineEPNS0_5MutexENS0_4TimeE(cv, mu, t);
  __tsan_acquire(mu);
  return timed_out;
}

// Notification: Notify() happens before every wait that returns.
void __real__ZN4absl7debian312Notification6NotifyEv(Notification* n);
void __real__ZNK4absl7debian312Notification19WaitForNotificationEv(const Notification* n);
bool __real__ZNK4absl7debian312Notification30WaitForNotificationWithTimeoutENS0_8DurationE(
    const Notification* n, Duration d);
bool __real__ZNK4absl7debian312Notification31WaitForNotificationWithDeadlineENS0_4TimeE(
    const Notification* n, Time t);
void __wrap__ZN4absl7debian312Notification6NotifyEv(Notification* n) {
  __tsan_release(n);
  __real__ZN4absl7debian312Notification6NotifyEv(n);
}
void __wrap__ZNK4absl7debian312Notification19WaitForNotificationEv(const Notification* n) {
  __real__ZNK4absl7debian312Notification19WaitForNotificationEv(n);
  __tsan_acquire(const_cast<Notification*>(n));
}
bool __wrap__ZNK4absl7debian312Notification30WaitForNotificationWithTimeoutENS0_8DurationE(
    const Notification* n, Duration d) {
  const bool notified =
      __real__ZNK4absl7debian312Notification30WaitForNotificationWithTimeoutENS0_8DurationE(n,
                                                                                           d);
  if (notified) __tsan_acquire(const_cast<Notification*>(n));
  return notified;
}
bool __wrap__ZNK4absl7debian312Notification31WaitForNotificationWithDeadlineENS0_4TimeE(
    const Notification* n, Time t) {
  const bool notified =
      __real__ZNK4absl7debian312Notification31WaitForNotificationWithDeadlineENS0_4TimeE(n, t);
  if (notified) __tsan_acquire(const_cast<Notification*>(n));
  return notified;
}

}  // extern "C"
