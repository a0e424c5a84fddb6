// The service's connections: the listening socket's accept loop, who a peer
// is (SO_PEERCRED, read once at accept), strangers and peers over a cap
// turned away at once with one sentence, each admitted connection's RPC
// system bound to its peer and tenant, and idle connections closed.
#pragma once

#include <kj/async-io.h>
#include <kj/async-unix.h>

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "broker/service/scheduler.h"
#include "broker/service/service_config.h"
#include "policy/result.h"
#include "sandbox/fd.h"

namespace layerx::serve {

class Hub;
struct Connection;

class Connections {
 public:
  // All must outlive the connections; `tasks` holds the disconnect watches.
  Connections(Hub& hub, Scheduler& scheduler, const broker::ServiceConfig& config,
              kj::AsyncIoContext& io, kj::TaskSet& tasks);
  ~Connections();

  // Accepts on `fd` once Start is called; `ours` is the socket's path to
  // unlink when it stops (empty: systemd's).
  void Listen(sandbox::UniqueFd fd, std::string ours);
  void Start();
  // No more connections: the listening socket is closed and its path gone.
  // Those open stay.
  void StopListening();
  // Every tick: idle connections closed, turned-away peers drained.
  void Tick();
  // Every connection closed (their calls' Abandon runs now).
  void Clear();
  size_t size() const { return connections_.size(); }

 private:
  struct TurnedAway {
    sandbox::UniqueFd fd;
    int64_t until_ns;
  };

  kj::Promise<void> AcceptLoop();
  kj::Promise<void> AcceptSome();
  void Accept(sandbox::UniqueFd fd);
  void TurnAway(sandbox::UniqueFd fd, const std::string& sentence);
  void DrainTurnedAway();
  void LogTurnedAway(int tenant, const std::string& what);
  void Drop(uint64_t connection);
  void CloseIdle();

  Hub& hub_;
  Scheduler& scheduler_;
  const broker::ServiceConfig& config_;
  kj::AsyncIoContext& io_;
  kj::TaskSet& tasks_;
  uint64_t next_conn_ = 1;
  std::map<uint64_t, kj::Own<Connection>> connections_;
  std::vector<TurnedAway> turned_away_;
  int64_t turned_away_logged_ns_ = -1'000'000'000;
  uint64_t turned_away_unlogged_ = 0;
  sandbox::UniqueFd listen_fd_;
  std::string socket_path_;  // ours to unlink at exit; empty when systemd's
  kj::Own<kj::UnixEventPort::FdObserver> listen_observer_;
  kj::Maybe<kj::Promise<void>> accepting_;
  bool stopped_ = false;
};

}  // namespace layerx::serve
