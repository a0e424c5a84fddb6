// One layer through one jailed extractor (layer_runner.h): the Session's
// spawn, blob feed and hashing, clock, stderr and reaping (layer_session.h);
// the records it reads back are layer_records.cc's.
#include "broker/engine/layer_runner.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/magic.h>
#include <poll.h>
#include <signal.h>
#include <spdlog/spdlog.h>
#include <sys/vfs.h>
#include <time.h>
#include <unistd.h>

#include <memory>
#include <vector>

#include "broker/engine/layer_session.h"
#include "broker/log/logging.h"
#include "extractor/digest.h"
#include "sandbox/spawn.h"
#include "sandbox/sys.h"

namespace layerx::broker {

using sandbox::UniqueFd;

namespace {


// A filesystem whose files' owner and mode are the kernel's own word.
bool OnLocalFilesystem(int fd) {
  struct statfs fs;
  if (::fstatfs(fd, &fs) != 0) return false;
  switch (static_cast<unsigned long>(fs.f_type)) {
    case EXT4_SUPER_MAGIC:  // ext2, ext3 too
    case XFS_SUPER_MAGIC:
    case BTRFS_SUPER_MAGIC:
    case TMPFS_MAGIC:
    case F2FS_SUPER_MAGIC:
    case OVERLAYFS_SUPER_MAGIC:
      return true;
    default:
      return false;
  }
}
constexpr size_t kMaxStderrBytes = 64 * 1024;

}  // namespace

Status Session::Feed() {
  while (true) {
    if (feed_off_ == feed_len_) {
      if (blob_eof_) {
        feed_.reset();  // EOF for the extractor
        return {};
      }
      LX_ASSIGN_OR_RETURN(std::optional<size_t> n, ReadBlob());
      if (!n) return {};  // a stream with nothing yet: poll waits for it
      if (*n == 0) continue;
    }
    ssize_t w = ::write(feed_.get(), feed_mem_ + feed_off_, feed_len_ - feed_off_);
    if (w < 0) {
      if (errno == EAGAIN) return {};
      if (errno == EINTR) continue;
      if (errno == EPIPE) {
        // The extractor stopped reading (done or dead): its messages and exit
        // status tell which. The rest of the blob is hashed once it is known
        // to have succeeded (a failed layer's blob need not be read on).
        feed_.reset();
        feed_len_ = 0;
        feed_off_ = 0;
        return {};
      }
      return Fail(OsError(errno, "write layer to extractor"));
    }
    feed_off_ += static_cast<size_t>(w);
  }
}

// One chunk of a blob the extractor reads itself (direct_), hashed meanwhile.
Status Session::HashSome() {
  LX_TRY(ReadBlob());
  if (report_.compressed_bytes > ctx_.policy->limits.max_layer_bytes) {
    return Fail(MakeError(ErrorKind::kLimitExceeded, "blob is over max_layer_bytes={}",
                          ctx_.policy->limits.max_layer_bytes));
  }
  return {};
}

// Reads and hashes the rest of the blob, so the digest always covers all of it.
Status Session::DrainBlob() {
  while (!blob_eof_) {
    LX_ASSIGN_OR_RETURN(std::optional<size_t> n, ReadBlob());
    // Bytes after the end of the tar stream: a stream that never ends must
    // not keep the broker hashing until the clock runs out.
    if (report_.compressed_bytes > ctx_.policy->limits.max_layer_bytes) {
      return Fail(MakeError(ErrorKind::kLimitExceeded,
                            "blob goes on past max_layer_bytes={} after its tar stream ended",
                            ctx_.policy->limits.max_layer_bytes));
    }
    if (n) continue;
    // A stream that is slow to end: wait for it, within the clock.
    if (ctx_.cancel && ctx_.cancel->load())
      return Fail(MakeError(ErrorKind::kCancelled, "interrupted"));
    if (sandbox::MonotonicNs() >= deadline_) return Fail(TimeoutError());
    struct pollfd pfd = {blob_.get(), POLLIN, 0};
    (void)::poll(&pfd, 1, 100);
  }
  feed_len_ = 0;
  feed_off_ = 0;
  return {};
}

// The next chunk of the blob into the feed buffer, hashed and counted; 0 at its end;
// nullopt when the blob is a stream with nothing to read yet.
Result<std::optional<size_t>> Session::ReadBlob() {
  if (feed_mem_ == nullptr) {
    // The job's buffer, or our own; never zeroed (it is only read into).
    feed_mem_ = ctx_.feed_buffer;
    if (feed_mem_ == nullptr) {
      own_feed_mem_ = sandbox::ReadBuffer(kFeedBufferBytes);
      feed_mem_ = own_feed_mem_.data();
    }
  }
  ssize_t n;
  do {
    n = ::read(blob_.get(), feed_mem_, kFeedBufferBytes);
  } while (n < 0 && errno == EINTR);
  if (n < 0 && errno == EAGAIN) {
    feed_len_ = 0;
    feed_off_ = 0;
    return std::optional<size_t>();
  }
  if (n < 0) return Fail(OsError(errno, "read layer"));
  feed_len_ = static_cast<size_t>(n);
  feed_off_ = 0;
  if (hashed_ != nullptr) {
    report_.compressed_bytes = hashed_->BytesSoFar();
  } else {
    sha_.Update(feed_mem_, static_cast<size_t>(n));
    report_.compressed_bytes += static_cast<uint64_t>(n);
  }
  blob_eof_ = n == 0;
  return std::optional<size_t>(static_cast<size_t>(n));
}

Error Session::TimeoutError() const {
  if (job_clock_) {
    return MakeError(ErrorKind::kLimitExceeded, "job took longer than job_timeout_ms={}",
                     ctx_.policy->limits.job_timeout_ms);
  }
  return MakeError(ErrorKind::kLimitExceeded, "layer took longer than layer_timeout_ms={}",
                   ctx_.policy->limits.layer_timeout_ms);
}

void Session::ReadStderr(bool flush) {
  char buf[4096];
  while (stderr_.valid()) {
    ssize_t n = ::read(stderr_.get(), buf, sizeof(buf));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      if (n == 0) stderr_.reset();
      break;
    }
    for (ssize_t i = 0; i < n; ++i) {
      if (buf[i] == '\n' || stderr_line_.size() >= 1024) {
        if (stderr_bytes_ < kMaxStderrBytes) log_->warn("stderr: pid={} {:?}", pid_, stderr_line_);
        stderr_bytes_ += stderr_line_.size();
        last_stderr_ = std::move(stderr_line_);
        stderr_line_.clear();
        if (buf[i] == '\n') continue;
      }
      stderr_line_ += buf[i];
    }
  }
  if (flush && !stderr_line_.empty()) {
    last_stderr_ = std::move(stderr_line_);
    stderr_line_.clear();
  }
}

Error Session::ExitError(const sandbox::ExitStatus& status) {
  if (!status.exited) {
    const char* name = sigabbrev_np(status.signal);
    std::string why = status.signal == SIGSYS ? " (forbidden syscall, seccomp)" : "";
    return MakeError(ErrorKind::kPeer, "extractor killed by SIG{}{}", name ? name : "?", why);
  }
  if (!last_stderr_.empty()) {
    return MakeError(ErrorKind::kPeer, "extractor exited with status {}: {:?}", status.code,
                     last_stderr_);
  }
  return MakeError(ErrorKind::kPeer, "extractor exited with status {}", status.code);
}

Result<PendingJail> SpawnJail(const RunContext& ctx) {
  LX_ASSIGN_OR_RETURN(sandbox::Pipe errpipe, sandbox::MakePipe(0));
  LX_ASSIGN_OR_RETURN(auto sockets, sandbox::MakeSocketPair());
  // The extractor's own open of the image: write-only, so it can neither read
  // it (the lower layers' data) nor map it.
  UniqueFd data_fd;
  if (ctx.data_fd >= 0) {
    LX_ASSIGN_OR_RETURN(data_fd, sandbox::ReopenFd(ctx.data_fd, O_WRONLY));
  }
  int64_t start = sandbox::MonotonicNs();
  sandbox::SpawnRequest request{
      .program_fd = ctx.extractor_fd,
      .argv = {"layerx-extractor"},
      .rootfs_fd = ctx.rootfs_fd,
      .channel_fd = sockets.second.get(),
      .stderr_fd = errpipe.write.get(),
      .policy = ctx.policy,
      .data_fd = data_fd.get(),
  };
  request.argv.insert(request.argv.end(), ctx.extractor_args.begin(), ctx.extractor_args.end());
  LX_ASSIGN_OR_RETURN(sandbox::WaitingChild child, sandbox::SpawnWaiting(request));
  Logger("extractor")->debug("spawned: pid={} spawn_ms={:.2f}", child.pid(),
                             (sandbox::MonotonicNs() - start) / 1e6);
  return PendingJail{.child = std::move(child),
                     .channel = std::move(sockets.first),
                     .err = std::move(errpipe.read),
                     .spawned_ns = sandbox::MonotonicNs()};
}

Status Session::Run(const LayerInput& layer, std::optional<PendingJail> jail,
                    const std::function<void()>& started) {
  sandbox::ScopedSigpipeBlock no_sigpipe;  // a dead extractor is EPIPE on its input
  UniqueFd hashed_input;
  if (layer.fd >= 0 && layer.hashed != nullptr) {
    // A pipe its maker feeds and hashes (a registry pull): the extractor gets
    // it as its fd 0; we keep an open file description of our own, non-
    // blocking, to drain what the extractor leaves after the tar stream.
    hashed_ = layer.hashed;
    LX_ASSIGN_OR_RETURN(hashed_input, sandbox::Dup(layer.fd));
    LX_ASSIGN_OR_RETURN(blob_, sandbox::ReopenFd(layer.fd, O_RDONLY | O_NONBLOCK));
  } else if (layer.fd >= 0) {
    // A descriptor a client passed (layerx serve): read from its start, never
    // blocking (a stream must not wedge the job past its clock or a cancel).
    LX_ASSIGN_OR_RETURN(blob_, sandbox::Dup(layer.fd));
    int flags = ::fcntl(blob_.get(), F_GETFL);
    if (flags < 0 || ::fcntl(blob_.get(), F_SETFL, flags | O_NONBLOCK) != 0) {
      return Fail(OsError(errno, "fcntl"));
    }
    (void)::lseek(blob_.get(), 0, SEEK_SET);  // ESPIPE for a stream
  } else if (layer.dir_fd >= 0) {
    // Found by name (a layout, a staged archive): a regular file only, opened
    // so that the open cannot block; a fifo or device is refused here.
    LX_ASSIGN_OR_RETURN(blob_, sandbox::OpenRegularFile(layer.dir_fd, layer.path,
                                                        RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS));
  } else {
    // A plain file named by the caller: the same. Only a descriptor the
    // caller passed (above) may be a stream.
    LX_ASSIGN_OR_RETURN(blob_, sandbox::OpenRegularFile(AT_FDCWD, layer.path, 0));
  }
  LX_ASSIGN_OR_RETURN(struct stat st, sandbox::Fstat(blob_.get()));
  if (S_ISDIR(st.st_mode)) return Fail(MakeError(ErrorKind::kInvalidInput, "is a directory"));
  blob_bytes_ = S_ISREG(st.st_mode) ? static_cast<uint64_t>(st.st_size) : layer.expected_bytes;
  // A file found by name that no one but us (or root) can change: the
  // extractor reads it itself, through its own read-only open, while we hash
  // it here, so its bytes pass through no pipe. Both see the same bytes only
  // because no one else can write them in between: owner and mode say so on a
  // local filesystem (on a network or FUSE one the server decides). Anything
  // else (a client's fd, a stream, a file others may write) is fed through
  // the pipe, hashed as it goes in. The jail can only read its fd 0
  // (sandbox::CompileFdFilter).
  sandbox::JailData data = ctx_.data;
  UniqueFd direct_input;
  if (layer.fd < 0 && S_ISREG(st.st_mode) && (st.st_uid == ::geteuid() || st.st_uid == 0) &&
      (st.st_mode & 022) == 0 && data.mode == sandbox::DataMode::kImage &&
      OnLocalFilesystem(blob_.get())) {
    LX_ASSIGN_OR_RETURN(direct_input, sandbox::ReopenFd(blob_.get(), O_RDONLY));
    direct_ = true;
    data.copy_input = data.mode == sandbox::DataMode::kImage && ctx_.window_at_front ? 1 : 0;
  }
  LX_ASSIGN_OR_RETURN(sandbox::Pipe input, sandbox::MakePipe(0));
  if (direct_) {
    input.write.reset();
    input.read = std::move(direct_input);
  } else if (hashed_ != nullptr) {
    input.write.reset();
    input.read = std::move(hashed_input);
  }
  if (input.write.valid()) ::fcntl(input.write.get(), F_SETPIPE_SZ, 1 << 20);  // best effort

  int64_t start = sandbox::MonotonicNs();
  if (!jail) {
    LX_ASSIGN_OR_RETURN(PendingJail spawned, SpawnJail(ctx_));
    jail.emplace(std::move(spawned));
  }
  const int64_t ahead_ns = start - jail->spawned_ns;
  LX_ASSIGN_OR_RETURN(sandbox::Child child, std::move(jail->child).Start(input.read.get(), data));
  pid_ = child.pid();
  input.read.reset();
  feed_ = std::move(input.write);
  stderr_ = std::move(jail->err);
  for (int fd : {feed_.get(), jail->channel.get(), stderr_.get()}) {
    if (fd >= 0) LX_TRY(sandbox::SetNonBlocking(fd));
  }
  records_.Open(std::move(jail->channel));
  log_->debug("started: layer={} pid={} start_ms={:.2f} spawned_ahead_ms={:.2f}", layer.index,
              child.pid(), (sandbox::MonotonicNs() - start) / 1e6,
              ahead_ns > 0 ? ahead_ns / 1e6 : 0.0);
  if (started) started();

  deadline_ = start + static_cast<int64_t>(ctx_.policy->limits.layer_timeout_ms) * 1'000'000;
  if (ctx_.job_deadline_ns > 0 && ctx_.job_deadline_ns < deadline_) {
    deadline_ = ctx_.job_deadline_ns;
    job_clock_ = true;
  }
  bool exited = false;
  while (!exited || !records_.eof() || stderr_.valid()) {
    if (ctx_.cancel && ctx_.cancel->load()) {
      return Fail(MakeError(ErrorKind::kCancelled, "interrupted"));  // ~Child kills and reaps
    }
    int64_t now = sandbox::MonotonicNs();
    if (now >= deadline_) return Fail(TimeoutError());
    struct pollfd fds[4];
    int n = 0;
    int feed_idx = -1, chan_idx = -1, err_idx = -1, pid_idx = -1;
    if (feed_.valid()) {
      // With nothing buffered, wait for the blob (a stream may be slow);
      // otherwise for room in the extractor's pipe.
      bool need_input = feed_off_ == feed_len_ && !blob_eof_;
      fds[feed_idx = n++] =
          need_input ? pollfd{blob_.get(), POLLIN, 0} : pollfd{feed_.get(), POLLOUT, 0};
    }
    if (!records_.eof()) fds[chan_idx = n++] = {records_.fd(), POLLIN, 0};
    if (stderr_.valid()) fds[err_idx = n++] = {stderr_.get(), POLLIN, 0};
    if (!exited) fds[pid_idx = n++] = {child.pidfd(), POLLIN, 0};
    // A blob the extractor reads itself is hashed between polls.
    const bool hashing = direct_ && !blob_eof_;
    int timeout_ms =
        hashing ? 0 : static_cast<int>(std::min<int64_t>((deadline_ - now) / 1'000'000 + 1, 100));
    int rc = ::poll(fds, static_cast<nfds_t>(n), timeout_ms);
    if (rc < 0) {
      if (errno == EINTR) continue;
      return Fail(OsError(errno, "poll"));
    }
    if (feed_idx >= 0 && fds[feed_idx].revents) LX_TRY(Feed());
    if (hashing) LX_TRY(HashSome());
    if (hashed_ != nullptr) {
      hashed_->RelayLogs();
      report_.compressed_bytes = hashed_->BytesSoFar();
      if (report_.compressed_bytes > ctx_.policy->limits.max_layer_bytes) {
        return Fail(MakeError(ErrorKind::kLimitExceeded, "blob is over max_layer_bytes={}",
                              ctx_.policy->limits.max_layer_bytes));
      }
    }
    if (chan_idx >= 0 && fds[chan_idx].revents) LX_TRY(records_.Read());
    Report(layer.index, false);
    if (err_idx >= 0 && fds[err_idx].revents) ReadStderr(false);
    if (pid_idx >= 0 && fds[pid_idx].revents) {
      exited = true;
      feed_.reset();
    }
  }
  ReadStderr(true);
  LX_ASSIGN_OR_RETURN(sandbox::ExitStatus status, child.Wait());
  if (records_.failure()) return Fail(*records_.failure());
  if (!status.exited || status.code != 0) return Fail(ExitError(status));
  // The extractor is gone; hash what it did not read so the digest covers the blob.
  LX_TRY(DrainBlob());
  report_.total_ns = sandbox::MonotonicNs() - start;
  if (hashed_ != nullptr) {
    // The stream ended: its maker hashed all of it before closing it.
    std::optional<HashedStream::Whole> whole = hashed_->Finished();
    if (!whole) return Fail(MakeError(ErrorKind::kIntegrity, "blob stream ended early"));
    report_.compressed_digest = whole->digest;
    report_.compressed_bytes = whole->bytes;
  } else {
    report_.compressed_digest = sha_.Finish();
  }
  // An uncompressed layer's tar stream is the blob: the extractor leaves its
  // digest to us. (Claimed of a compressed layer, it would name the blob's
  // digest as the diff_id, which then fails the config's check.)
  if (records_.got_summary() && report_.uncompressed_digest.empty()) {
    report_.uncompressed_digest = report_.compressed_digest;
  }
  if (!records_.got_summary())
    return Fail(MakeError(ErrorKind::kPeer, "extractor ended without a summary"));
  report_.setup_ns -= start;
  Report(layer.index, true);
  return {};
}

Result<LayerReport> RunLayer(const RunContext& ctx, const LayerInput& layer, ImageTree& tree,
                             std::optional<PendingJail> jail, const std::function<void()>& started) {
  LayerReport report;
  report.index = layer.index;
  report.path = layer.path;
  // What the tree holds so far is lower to this layer's records (whiteouts and
  // opaque markers hide lower entries only).
  const bool to_image = ctx.data.mode == sandbox::DataMode::kImage ||
                        ctx.data.mode == sandbox::DataMode::kTreeAndImage;
  tree.BeginLayer(
      DataWindow{.enabled = to_image, .start = ctx.data.start, .block_size = ctx.data.block_size});
  Session session(ctx, tree, report);
  LX_TRY(session.Run(layer, std::move(jail), started));
  if (to_image) {
    // What the records point at must be what the layer wrote: inside the
    // file as it stands now. The next layer starts past all of it.
    LX_ASSIGN_OR_RETURN(struct stat st, sandbox::Fstat(ctx.data_fd));
    const uint64_t bs = ctx.data.block_size;
    uint64_t end = (static_cast<uint64_t>(st.st_size) + bs - 1) / bs * bs;
    if (tree.layer_data_end() > end) {
      return Fail(MakeError(ErrorKind::kPeer,
                            "bad record: data extents end at {}, past the {} bytes written",
                            tree.layer_data_end(), end));
    }
    report.data_end = std::max(end, ctx.data.start);
  }
  return report;
}

}  // namespace layerx::broker
