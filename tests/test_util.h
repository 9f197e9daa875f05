#pragma once

// Helpers for the integration tests: run the real cds-server and cdsctl binaries as
// subprocesses (no in-process fakes), and scratch directories.

#include <sys/types.h>

#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace cds::testing {

// A cds-server child process. Start() waits for its "listening on HOST:PORT" log line,
// so tests can pass --listen 127.0.0.1:0 and use the port the kernel chose. Its stderr
// is collected (and drained, so the child never blocks on a full pipe). Not thread-safe.
class ServerProcess {
 public:
  ServerProcess() = default;
  ServerProcess(const ServerProcess&) = delete;
  ServerProcess& operator=(const ServerProcess&) = delete;
  // Kills the child if it is still running.
  ~ServerProcess();

  // Starts `binary` with `args`. False (with the reason in *error, and the child's
  // stderr) when it exits or does not report a port within `timeout_seconds`. A
  // cds-server given no --tls_* flag gets --insecure_dev (plaintext on loopback), unless
  // --insecure_dev is already there.
  bool Start(const std::string& binary, const std::vector<std::string>& args,
             std::string* error, int timeout_seconds = 60);

  int port() const { return port_; }
  pid_t pid() const { return pid_; }
  std::string address() const { return "127.0.0.1:" + std::to_string(port_); }

  // Sends `signal` and waits for the exit. Returns the exit status (128 + signal number
  // when killed by a signal), or -1 when it had to be killed after `timeout_seconds`.
  int Stop(int signal, int timeout_seconds = 30);
  // Waits for an exit caused otherwise (e.g. a signal sent with kill(pid(), ...) while the
  // test goes on calling); like Stop, kills the child after `timeout_seconds`.
  int WaitForExit(int timeout_seconds = 30);

  // Everything the child wrote to stderr so far.
  std::string Stderr() const;

 private:
  void ReadLoop();

  pid_t pid_ = -1;
  int read_fd_ = -1;
  int port_ = 0;
  std::thread reader_;
  mutable std::mutex mu_;
  std::condition_variable changed_;
  std::string stderr_;  // guarded by mu_
  bool eof_ = false;    // guarded by mu_
};

struct CommandResult {
  int exit_code = -1;  // 128 + signal number when killed by a signal
  std::string out;
  std::string err;
  int64_t max_rss_kib = 0;  // the command's peak resident memory (getrusage's ru_maxrss)
};

// Runs argv[0] (a path) with its arguments, waits for it and returns its output.
CommandResult RunCommand(const std::vector<std::string>& argv);

// A fresh directory under $TMPDIR (or /tmp), removed with everything in it on destruction.
class TempDir {
 public:
  TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  ~TempDir();
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// Writes `content` to `path`, creating parent directories. False on failure.
bool WriteFile(const std::string& path, const std::string& content);
// The file's content, or "" when it cannot be read.
std::string ReadFileOrEmpty(const std::string& path);

// Makes <rules_root>/ontology point at the repository's rules/ontology/, so that a copy
// of a bundled rule set in a scratch rules directory finds the ontology it names.
bool LinkOntologies(const std::string& rules_root);

// A TCP port on 127.0.0.1 that nothing listened on a moment ago.
int UnusedPort();

}  // namespace cds::testing
