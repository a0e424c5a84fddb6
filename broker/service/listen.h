// The service's listening socket (its own, or systemd's), and the signals
// that stop it (SIGTERM, SIGINT) as events of the loop.
#pragma once

#include <kj/async-unix.h>
#include <signal.h>

#include <functional>
#include <initializer_list>
#include <string>

#include "layerx/layerx.hpp"
#include "policy/result.h"
#include "sandbox/fd.h"

namespace layerx::serve {

// The listening socket: ours at options.socket (then *ours is its path, to
// unlink at exit), or systemd's fd 3. Taken before the event loop exists,
// whose own fds would otherwise take the number. kPolicy for no socket or a
// bad path, kOs otherwise.
Result<sandbox::UniqueFd> ListenSocket(const ServeOptions& options, std::string* ours);

// Blocks `signals` on this thread for the scope (and on threads made in it).
class SignalMask {
 public:
  explicit SignalMask(std::initializer_list<int> signals);
  ~SignalMask();
  SignalMask(const SignalMask&) = delete;
  SignalMask& operator=(const SignalMask&) = delete;

 private:
  sigset_t old_;
};

// SIGTERM and SIGINT through a signalfd (they must be blocked: SignalMask).
class StopSignals {
 public:
  Status Open(kj::UnixEventPort& port);
  // Calls `stop` with "SIGTERM" or "SIGINT" for each one that comes, forever.
  kj::Promise<void> Watch(std::function<void(const char* why)> stop);

 private:
  sandbox::UniqueFd fd_;
  kj::Own<kj::UnixEventPort::FdObserver> observer_;
};

}  // namespace layerx::serve
