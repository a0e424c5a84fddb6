#include "extractor/read_ahead.h"

#include <sys/mman.h>

#include <condition_variable>
#include <mutex>
#include <optional>
#include <thread>

namespace layerx::extractor {

namespace {

// 64 blocks of 256 KiB (16 MiB, eight huge pages where the kernel gives them:
// a fresh 4 KiB page costs a fault each, dear in a new process). One is held
// by the tar reader, the rest filled ahead: enough to carry the inflate through
// a stretch of small files, where the tar reader is slower per byte than the
// inflate (with 8 blocks the inflate waited for room 17-32 times a layer).
constexpr size_t kBlock = 256 * 1024;
constexpr size_t kBlocks = 64;
constexpr size_t kRing = kBlock * kBlocks;

}  // namespace

struct ReadAhead::State {
  std::mutex mu;
  std::condition_variable cv;  // both ways: a block filled, a block freed, a start, a stop
  Produce produce;             // set by Start, dropped on the thread when it ends
  bool running = false;  // the thread is in Run: its own start (rseq, robust list) is done
  bool started = false;
  bool stop = false;
  bool end = false;                // the producer returned 0
  std::optional<Error> error;      // the producer failed, after `produced` blocks
  uint64_t produced = 0;           // blocks filled
  uint64_t taken = 0;              // blocks handed to the reader
  uint64_t freed = 0;              // blocks it has given back
  size_t sizes[kBlocks] = {};
  std::byte* ring = nullptr;

  ~State() {
    if (ring != nullptr) ::munmap(ring, kRing);
  }

  std::span<std::byte> Block(uint64_t n) { return {ring + (n % kBlocks) * kBlock, kBlock}; }

  [[noreturn]] void Run() {
    std::unique_lock lock(mu);
    running = true;
    cv.notify_all();
    cv.wait(lock, [&] { return started || stop; });
    while (!stop) {
      cv.wait(lock, [&] { return stop || produced - freed < kBlocks; });
      if (stop) break;
      std::span<std::byte> block = Block(produced);
      lock.unlock();
      Result<size_t> got = produce(block);
      lock.lock();
      if (!got) {
        error = std::move(got).error();
      } else if (*got == 0) {
        end = true;
      } else {
        sizes[produced % kBlocks] = *got;
        ++produced;
      }
      cv.notify_all();
      if (error || end) break;
    }
    Produce dropped = std::move(produce);
    produce = nullptr;
    lock.unlock();
    dropped = nullptr;  // what the stream held (the decompressor) goes here
    // Parked, never returning: a thread's exit makes calls of its own
    // (sigaltstack under ASan, the stack's madvise) that the jail's filter
    // need not allow. The process's exit ends it.
    lock.lock();
    for (;;) cv.wait(lock);
  }
};

std::shared_ptr<ReadAhead> ReadAhead::Spawn() {
  auto state = std::make_shared<State>();
  try {
    std::thread([state] { state->Run(); }).detach();
  } catch (const std::system_error&) {
    return nullptr;
  }
  // The filter goes on when Spawn returns: glibc's start of the thread (rseq,
  // set_robust_list) must be over by then, or the filter would see it.
  {
    std::unique_lock lock(state->mu);
    state->cv.wait(lock, [&] { return state->running; });
  }
  return std::shared_ptr<ReadAhead>(new ReadAhead(std::move(state)));
}

ReadAhead::~ReadAhead() { Stop(); }

Status ReadAhead::Start(Produce produce) {
  void* ring = ::mmap(nullptr, kRing + (2u << 20), PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (ring == MAP_FAILED) return Fail(Error(ErrorKind::kOs, errno, "read-ahead buffer"));
  // Aligned to 2 MiB, the rest unmapped: one huge page where the kernel gives one.
  auto at = reinterpret_cast<uintptr_t>(ring);
  uintptr_t aligned = (at + (2u << 20) - 1) & ~uintptr_t{(2u << 20) - 1};
  if (aligned > at) ::munmap(ring, aligned - at);
  if (uintptr_t tail = at + kRing + (2u << 20) - (aligned + kRing); tail > 0) {
    ::munmap(reinterpret_cast<void*>(aligned + kRing), tail);
  }
  ::madvise(reinterpret_cast<void*>(aligned), kRing, MADV_HUGEPAGE);
  std::lock_guard lock(state_->mu);
  if (state_->started) return Fail(MakeError(ErrorKind::kInternal, "read-ahead started twice"));
  state_->ring = reinterpret_cast<std::byte*>(aligned);
  state_->produce = std::move(produce);
  state_->started = true;
  state_->cv.notify_all();
  return {};
}

Result<std::span<const std::byte>> ReadAhead::Next() {
  State& s = *state_;
  std::unique_lock lock(s.mu);
  if (s.taken > s.freed) {
    s.freed = s.taken;  // the block handed out last time is done with
    s.cv.notify_all();
  }
  s.cv.wait(lock, [&] { return s.produced > s.taken || s.error || s.end; });
  if (s.produced > s.taken) {
    uint64_t n = s.taken++;
    return std::span<const std::byte>(s.Block(n).data(), s.sizes[n % kBlocks]);
  }
  if (s.error) return Fail(*s.error);
  return std::span<const std::byte>();
}

void ReadAhead::Stop() {
  std::lock_guard lock(state_->mu);
  state_->stop = true;
  state_->cv.notify_all();
}

}  // namespace layerx::extractor
