// The jail's second thread: a compressed layer is decompressed on it, up to
// 16 MiB ahead of the tar reader and the applier on the first thread; the
// diff_id's hash goes to whichever of the two has time. On two cores the
// halves of a gzip layer, inflate and parse + write, then overlap instead of
// taking turns.
//
// The thread is made before the seccomp filter goes on (EnterJail's
// before_seccomp hook), so the filter never allows clone: it starts with no
// capability and no_new_privs like the first, and gets the same filters (TSYNC).
// It waits, holding nothing, until a layer's stream is handed to it.
#pragma once

#include <cstddef>
#include <functional>
#include <memory>
#include <span>

#include "policy/result.h"

namespace layerx::extractor {

class ReadAhead {
 public:
  // Fills the block it is given and returns how many bytes it put there; 0 at
  // the end of the stream. Runs on the thread.
  using Produce = std::function<Result<size_t>(std::span<std::byte>)>;
  // Sees every block once, in order, on one thread at a time: the reader's
  // when it takes a block the thread has not hashed, the thread's when it is
  // ahead of the reader (so the slower of the two does less).
  using Hash = std::function<void(std::span<const std::byte>)>;

  // Makes the thread; nullptr when it cannot be made (the reader then
  // decompresses on its own thread, as before).
  static std::shared_ptr<ReadAhead> Spawn();
  ~ReadAhead();  // Stop()

  // Hands the thread its stream (once). `produce` and what it holds are
  // dropped on the thread once it ends.
  Status Start(Produce produce, Hash hash);
  // The next block, in order: its bytes, valid until the next call; an empty
  // span at the end, once every block has been hashed; the producer's error
  // where it came in the stream.
  Result<std::span<const std::byte>> Next();
  // The thread stops after the block it is on, drops `produce` there and
  // parks; this does not wait for it (it may be blocked reading a pipe that
  // never ends). The thread never exits: the process's exit ends it.
  void Stop();

  struct State;  // shared with the thread

 private:
  explicit ReadAhead(std::shared_ptr<State> state) : state_(std::move(state)) {}
  std::shared_ptr<State> state_;
};

}  // namespace layerx::extractor
