// Spawning a jailed child (parent side). The child is cloned into fresh user,
// mount, pid, net, ipc, uts and cgroup namespaces, gets its id maps from us, and
// execs `program` while the host root is still visible: its loader and libraries
// come from the host. The program must call sandbox::EnterJail() first thing in
// main (sandbox/jail.h), which pivots into the rootfs and locks the process down.
#pragma once

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
  int input_fd = -1;              // borrowed; the child's fd 0
  int channel_fd = -1;            // borrowed; the child's fd 3
  int stderr_fd = -1;             // borrowed; the child's fds 1 and 2
  const policy::Policy* policy = nullptr;
  int data_fd = -1;  // borrowed; the child's fd 6 (write-only), or none
  JailData data;     // what the extractor does with file data
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
  Child& operator=(Child&&) = default;
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

// Clones the child, writes setgroups=deny and the uid/gid maps from
// policy.ids, and returns once the program was exec'd. A failure in the
// child before exec comes back as kPeer (the jail could not be made) naming the setup step.
Result<Child> Spawn(const SpawnRequest& request);

}  // namespace layerx::sandbox
