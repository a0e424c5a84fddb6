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
// Blocks ready for the reader past which the thread also hashes.
constexpr uint64_t kLead = 4;

}  // namespace

struct ReadAhead::State {
  std::mutex mu;
  std::condition_variable cv;  // both ways: a block filled, a block freed, a start, a stop
  Produce produce;             // set by Start, dropped on the thread when it ends
  Hash hash;                   // set by Start; called by whichever thread holds `hashing`
  bool running = false;  // the thread is in Run: its own start (rseq, robust list) is done
  bool started = false;
  bool stop = false;
  bool end = false;                // the producer returned 0
  std::optional<Error> error;      // the producer failed, after `produced` blocks
  uint64_t produced = 0;           // blocks filled
  uint64_t taken = 0;              // blocks handed to the reader
  uint64_t freed = 0;              // blocks it has given back
  uint64_t hashed = 0;             // blocks hashed, in order (a block is reused once freed and hashed)
  bool hashing = false;            // a thread is hashing block `hashed`, the lock released
  size_t sizes[kBlocks] = {};
  std::byte* ring = nullptr;

  ~State() {
    if (ring != nullptr) ::munmap(ring, kRing);
  }

  std::span<std::byte> Block(uint64_t n) { return {ring + (n % kBlocks) * kBlock, kBlock}; }

  // Hashes the blocks from `hashed` up to `upto` in order, unless the other
  // thread is hashing (it goes on from where it is). Called and returns with
  // the lock held; hashes with it released (the blocks stay put: none is
  // refilled before it is hashed).
  void HashUpTo(std::unique_lock<std::mutex>& lock, uint64_t upto) {
    while (!hashing && !stop && hashed < upto) {
      hashing = true;
      const uint64_t n = hashed;
      lock.unlock();
      hash(std::span<const std::byte>(Block(n).data(), sizes[n % kBlocks]));
      lock.lock();
      hashing = false;
      hashed = n + 1;
      cv.notify_all();
    }
  }

  [[noreturn]] void Run() {
    std::unique_lock lock(mu);
    running = true;
    cv.notify_all();
    cv.wait(lock, [&] { return started || stop; });
    while (!stop) {
      // A ring full of blocks not yet hashed: hash them here. Not expected
      // (the reader hashes each block it takes that is not hashed yet), but
      // the thread must never wait for room only hashing can make.
      if (produced - hashed >= kBlocks) HashUpTo(lock, produced);
      cv.wait(lock, [&] {
        return stop || produced - std::min(freed, hashed) < kBlocks ||
               (!hashing && produced - hashed >= kBlocks);
      });
      if (stop) break;
      if (produced - std::min(freed, hashed) >= kBlocks) continue;
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
      // Well ahead of the reader: this thread has time to spare, so it takes
      // the hash off the reader, which is then the slower of the two; a
      // block per block made, so it never lets the reader run dry hashing.
      if (produced - taken >= kLead) HashUpTo(lock, hashed + 1);
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
  std::shared_ptr<State> state;
  try {
    state = std::make_shared<State>();
    std::thread([state] { state->Run(); }).detach();
  } catch (...) {  // no thread (EAGAIN at a task limit), no memory
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

Status ReadAhead::Start(Produce produce, Hash hash) {
  {
    std::lock_guard lock(state_->mu);
    if (state_->started) return Fail(MakeError(ErrorKind::kInternal, "read-ahead started twice"));
  }
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
  state_->ring = reinterpret_cast<std::byte*>(aligned);
  state_->produce = std::move(produce);
  state_->hash = std::move(hash);
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
    // The thread is not ahead enough to hash: the reader hashes up to here.
    s.HashUpTo(lock, n + 1);
    return std::span<const std::byte>(s.Block(n).data(), s.sizes[n % kBlocks]);
  }
  if (s.error) return Fail(*s.error);
  // The end: every block hashed before it is said (the thread may be hashing).
  while (s.hashed < s.produced && !s.stop) {
    s.cv.wait(lock, [&] { return !s.hashing; });
    s.HashUpTo(lock, s.produced);
  }
  return std::span<const std::byte>();
}

void ReadAhead::Stop() {
  std::lock_guard lock(state_->mu);
  state_->stop = true;
  state_->cv.notify_all();
}

}  // namespace layerx::extractor
