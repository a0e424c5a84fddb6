// Spawning a jailed child (parent side). The child is cloned into fresh user,
// mount, pid, net, ipc, uts and cgroup namespaces, gets its id maps from us, and
// execs `program` while the host root is still visible: its loader and libraries
// come from the host. The program must call sandbox::EnterJail() first thing in
// main (sandbox/jail.h), which pivots into the rootfs and locks the process down.
//
// In two steps when the input is not known yet: SpawnWaiting() returns a child
// that execs, pivots into the rootfs and then waits, holding nothing of a
// layer; Start() hands it its input and its sealed config (where its data may
// go, the seccomp programs) in one message, after which it locks itself down
// and runs. The broker spawns layer N+1's jail this way while layer N applies.
#pragma once

#include <linux/filter.h>
#include <sys/types.h>

#include <string>
#include <vector>

#include "policy/policy.h"
#include "policy/result.h"
#include "sandbox/fd.h"
#include "sandbox/jail_config.h"

namespace layerx::sandbox {

struct SpawnRequest {
  int program_fd = -1;            // borrowed; the binary to exec (O_PATH is enough)
  std::vector<std::string> argv;  // argv[0] included
  int rootfs_fd = -1;             // borrowed; becomes the jail's "/"
  int input_fd = -1;              // borrowed; the child's fd 0 (Spawn only)
  int channel_fd = -1;            // borrowed; the child's fd 3
  int stderr_fd = -1;             // borrowed; the child's fds 1 and 2
  const policy::Policy* policy = nullptr;
  int data_fd = -1;  // borrowed; the child's fd 6 (write-only), or none
  JailData data;     // what the extractor does with file data (Spawn only)
};

struct ExitStatus {
  bool exited = false;  // true: `code` is the exit status; false: killed by `signal`
  int code = 0;
  int signal = 0;
};

class Child {
 public:
  Child(UniqueFd pidfd, pid_t pid) : pidfd_(std::move(pidfd)), pid_(pid) {}
  Child(Child&&) = default;
  // The child held before is killed and reaped first.
  Child& operator=(Child&& other) noexcept {
    if (this != &other) {
      if (!reaped_ && pidfd_.valid()) {
        Kill();
        (void)Wait();
      }
      pidfd_ = std::move(other.pidfd_);
      pid_ = other.pid_;
      reaped_ = other.reaped_;
    }
    return *this;
  }
  // Kills (SIGKILL) and reaps a child that was not waited for: no orphans.
  ~Child();

  pid_t pid() const { return pid_; }
  int pidfd() const { return pidfd_.get(); }

  void Kill();
  // Waits for the child to end and reaps it.
  Result<ExitStatus> Wait();

 private:
  UniqueFd pidfd_;
  pid_t pid_ = -1;
  bool reaped_ = false;
};

// A child exec'd and waiting in EnterJail for Start(). Destroyed unstarted, it
// is killed and reaped (~Child); its socket's end also ends its wait.
class WaitingChild {
 public:
  WaitingChild(Child child, UniqueFd start, UniqueFd status, const policy::Policy* policy,
               bool has_data_fd, std::vector<sock_filter> program)
      : child_(std::move(child)),
        start_(std::move(start)),
        status_(std::move(status)),
        policy_(policy),
        has_data_fd_(has_data_fd),
        program_(std::move(program)) {}
  WaitingChild(WaitingChild&&) = default;
  WaitingChild& operator=(WaitingChild&&) = default;

  pid_t pid() const { return child_.pid(); }

  // Sends the child `input_fd` (borrowed; its fd 0) and its config for
  // `data`, and gives up the child. A failure before its exec is kPeer naming
  // the step; a child that died after it (its jail setup failed) is still
  // returned: its exit status and stderr say why.
  Result<Child> Start(int input_fd, const JailData& data) &&;

 private:
  Child child_;
  UniqueFd start_;   // our end of the child's fd 5
  UniqueFd status_;  // EOF once it exec'd; a StatusReport if it failed before
  const policy::Policy* policy_;
  bool has_data_fd_;
  std::vector<sock_filter> program_;  // the policy's filter, compiled while the child starts
};

// Clones the child, writes setgroups=deny and the uid/gid maps from
// policy.ids, and returns while the child execs; it then waits for Start().
// `input_fd` and `data` of the request are not used. A failure in the child
// before exec comes back from Start as kPeer (the jail could not be made)
// naming the setup step.
Result<WaitingChild> SpawnWaiting(const SpawnRequest& request);

// SpawnWaiting, then Start with the request's input and data.
Result<Child> Spawn(const SpawnRequest& request);

}  // namespace layerx::sandbox
