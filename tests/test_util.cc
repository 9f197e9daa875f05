#include "tests/test_util.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

namespace cds::testing {
namespace {

std::vector<char*> Argv(const std::vector<std::string>& args) {
  std::vector<char*> argv;
  for (const std::string& arg : args) argv.push_back(const_cast<char*>(arg.c_str()));
  argv.push_back(nullptr);
  return argv;
}

int DecodeWaitStatus(int status) {
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return -1;
}

// The port in the first "listening on HOST:PORT" line of `log`, or 0.
int ParsePort(const std::string& log) {
  const std::string marker = "listening on ";
  const size_t at = log.find(marker);
  if (at == std::string::npos) return 0;
  const size_t end = log.find('\n', at);
  if (end == std::string::npos) return 0;  // line not complete yet
  const std::string address = log.substr(at + marker.size(), end - at - marker.size());
  const size_t colon = address.rfind(':');
  if (colon == std::string::npos) return 0;
  return std::atoi(address.c_str() + colon + 1);
}

bool NeedsInsecureDev(const std::string& binary, const std::vector<std::string>& args) {
  if (binary.size() < 10 || binary.compare(binary.size() - 10, 10, "cds-server") != 0) {
    return false;
  }
  for (const std::string& arg : args) {
    if (arg.rfind("--tls_", 0) == 0 || arg.rfind("--insecure_dev", 0) == 0 ||
        arg == "--no_auto_insecure_dev") {
      return false;
    }
  }
  return true;
}

}  // namespace

ServerProcess::~ServerProcess() {
  if (pid_ > 0) {
    kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
  }
  if (reader_.joinable()) reader_.join();
  if (read_fd_ >= 0) close(read_fd_);
}

bool ServerProcess::Start(const std::string& binary, const std::vector<std::string>& args,
                          std::string* error, int timeout_seconds) {
  int fds[2];
  if (pipe2(fds, O_CLOEXEC) != 0) {
    *error = std::string("pipe: ") + std::strerror(errno);
    return false;
  }
  std::vector<std::string> full = {binary};
  full.insert(full.end(), args.begin(), args.end());
  if (NeedsInsecureDev(binary, args)) full.push_back("--insecure_dev");
  std::vector<char*> argv = Argv(full);
  pid_ = fork();
  if (pid_ < 0) {
    *error = std::string("fork: ") + std::strerror(errno);
    return false;
  }
  if (pid_ == 0) {
    // A server must not outlive its test, even when the test binary is killed (a ctest
    // timeout): the kernel kills it when the thread that started it exits.
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    dup2(fds[1], STDERR_FILENO);
    execv(binary.c_str(), argv.data());
    _exit(127);
  }
  close(fds[1]);
  read_fd_ = fds[0];
  reader_ = std::thread([this] { ReadLoop(); });

  std::unique_lock<std::mutex> lock(mu_);
  const bool reported = changed_.wait_for(lock, std::chrono::seconds(timeout_seconds), [&] {
    return eof_ || ParsePort(stderr_) != 0;
  });
  port_ = ParsePort(stderr_);
  if (port_ != 0) return true;
  *error = std::string(reported ? "server exited before listening" : "server did not report a port in time") +
           "; its stderr:\n" + stderr_;
  return false;
}

void ServerProcess::ReadLoop() {
  char buffer[4096];
  while (true) {
    const ssize_t n = read(read_fd_, buffer, sizeof(buffer));
    if (n < 0 && errno == EINTR) continue;
    std::lock_guard<std::mutex> lock(mu_);
    if (n <= 0) {
      eof_ = true;
      changed_.notify_all();
      return;
    }
    stderr_.append(buffer, static_cast<size_t>(n));
    changed_.notify_all();
  }
}

int ServerProcess::Stop(int signal, int timeout_seconds) {
  if (pid_ <= 0) return -1;
  kill(pid_, signal);
  return WaitForExit(timeout_seconds);
}

int ServerProcess::WaitForExit(int timeout_seconds) {
  if (pid_ <= 0) return -1;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(timeout_seconds);
  int status = 0;
  int result = -1;
  while (true) {
    const pid_t done = waitpid(pid_, &status, WNOHANG);
    if (done == pid_) {
      result = DecodeWaitStatus(status);
      break;
    }
    if (std::chrono::steady_clock::now() > deadline) {
      kill(pid_, SIGKILL);
      waitpid(pid_, &status, 0);
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  pid_ = -1;
  if (reader_.joinable()) reader_.join();
  return result;
}

std::string ServerProcess::Stderr() const {
  std::lock_guard<std::mutex> lock(mu_);
  return stderr_;
}

CommandResult RunCommand(const std::vector<std::string>& args) {
  CommandResult result;
  TempDir dir;
  const std::string out_path = dir.path() + "/stdout";
  const std::string err_path = dir.path() + "/stderr";
  std::vector<char*> argv = Argv(args);
  const pid_t pid = fork();
  if (pid < 0) return result;
  if (pid == 0) {
    const int out = open(out_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
    const int err = open(err_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
    if (out < 0 || err < 0) _exit(126);
    dup2(out, STDOUT_FILENO);
    dup2(err, STDERR_FILENO);
    execv(args[0].c_str(), argv.data());
    _exit(127);
  }
  int status = 0;
  struct rusage usage = {};
  while (wait4(pid, &status, 0, &usage) < 0 && errno == EINTR) {
  }
  result.exit_code = DecodeWaitStatus(status);
  result.max_rss_kib = usage.ru_maxrss;
  result.out = ReadFileOrEmpty(out_path);
  result.err = ReadFileOrEmpty(err_path);
  return result;
}

TempDir::TempDir() {
  const char* base = std::getenv("TMPDIR");
  std::string templ = std::string(base != nullptr && *base != '\0' ? base : "/tmp") +
                      "/cds_test_XXXXXX";
  if (mkdtemp(templ.data()) != nullptr) path_ = templ;
}

TempDir::~TempDir() {
  std::error_code ignored;
  if (!path_.empty()) std::filesystem::remove_all(path_, ignored);
}

bool WriteFile(const std::string& path, const std::string& content) {
  std::error_code error;
  std::filesystem::create_directories(std::filesystem::path(path).parent_path(), error);
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << content;
  return static_cast<bool>(out);
}

std::string ReadFileOrEmpty(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream content;
  content << in.rdbuf();
  return content.str();
}

bool LinkOntologies(const std::string& rules_root) {
  std::error_code error;
  std::filesystem::create_directories(rules_root, error);
  std::filesystem::create_directory_symlink(std::string(CDS_SOURCE_DIR) + "/rules/ontology",
                                            rules_root + "/ontology", error);
  return !error;
}

int UnusedPort() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  socklen_t len = sizeof(addr);
  int port = 0;
  if (bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0 &&
      getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0) {
    port = ntohs(addr.sin_port);
  }
  close(fd);
  return port;
}

}  // namespace cds::testing
