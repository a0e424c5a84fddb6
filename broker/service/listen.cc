#include "broker/service/listen.h"

#include <fcntl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstring>
#include <span>

#include "sandbox/sys.h"

namespace layerx::serve {

using sandbox::UniqueFd;

namespace {

// Binds `sock` at `dir`/`name` with mode 0666 (anyone who can reach the path
// may connect; SO_PEERCRED decides what they get) and listens. A chmod by path
// after bind would follow whatever another user of a shared `dir` put at the
// name meanwhile (a symlink to a file of root's, made 0666 by root), and the
// umask is the whole process's (Serve() is a library call; its caller may be
// making files in other threads). So the socket is bound in a private dir
// beside its place (0700, a random name), given its mode there, and renamed
// into place, listening, with its mode already set; nothing is ever done to
// `dir`/`name` but that rename (and unlinking a socket a dead service left).
Status BindListening(int sock, const std::string& dir, const std::string& name) {
  LX_ASSIGN_OR_RETURN(UniqueFd parent, sandbox::OpenAt(AT_FDCWD, dir, O_PATH | O_DIRECTORY));
  std::string hidden;
  for (int attempt = 0;; ++attempt) {
    uint64_t nonce = 0;
    LX_TRY(sandbox::GetRandom(std::as_writable_bytes(std::span(&nonce, 1))));
    hidden = fmt::format(".layerx-sock-{:016x}", nonce);
    Status made = sandbox::MkdirAt(parent.get(), hidden, 0700);
    if (made) break;
    if (made.error().err() != EEXIST || attempt == 99) return made;
  }
  auto private_dir = sandbox::OpenAt(parent.get(), hidden, O_PATH | O_DIRECTORY | O_NOFOLLOW);
  // Whatever happens next, the private dir goes (through our fd for its
  // entry; the dir itself by name, which removes only an empty dir).
  struct Cleanup {
    int parent, dir;
    const std::string& name;
    ~Cleanup() {
      if (dir >= 0) (void)::unlinkat(dir, "s", 0);
      (void)::unlinkat(parent, name.c_str(), AT_REMOVEDIR);
    }
  } cleanup{parent.get(), private_dir ? private_dir->get() : -1, hidden};
  if (!private_dir) return Fail(private_dir.error());
  // In a dir others may write, the name could have been swapped between
  // mkdir and open: what we opened must be ours and shut to everyone else.
  LX_ASSIGN_OR_RETURN(struct stat st, sandbox::Fstat(private_dir->get()));
  if (st.st_uid != ::geteuid() || (st.st_mode & 0077) != 0) {
    return Fail(MakeError(ErrorKind::kOs, "private dir {:?} was replaced", hidden));
  }
  // Bound through our fd of the dir, not its name; by name only without /proc.
  struct sockaddr_un addr = {};
  addr.sun_family = AF_UNIX;
  int rc = -1;
  for (const std::string& path :
       {fmt::format("/proc/self/fd/{}/s", private_dir->get()), dir + "/" + hidden + "/s"}) {
    if (path.size() >= sizeof(addr.sun_path)) continue;
    std::memset(addr.sun_path, 0, sizeof(addr.sun_path));
    std::memcpy(addr.sun_path, path.data(), path.size());
    rc = ::bind(sock, reinterpret_cast<struct sockaddr*>(&addr), sizeof(addr));
    if (rc == 0 || errno != ENOENT) break;
  }
  if (rc != 0) return Fail(OsError(errno, "bind"));
  LX_TRY(sandbox::FchmodAtNoFollow(private_dir->get(), "s", 0666));
  if (::listen(sock, 128) != 0) return Fail(OsError(errno, "listen"));
  if (auto old = sandbox::FstatAt(parent.get(), name, AT_SYMLINK_NOFOLLOW);
      old && S_ISSOCK(old->st_mode)) {
    (void)::unlinkat(parent.get(), name.c_str(), 0);  // a socket left by a service that died
  }
  if (::renameat2(private_dir->get(), "s", parent.get(), name.c_str(), RENAME_NOREPLACE) != 0) {
    return Fail(OsError(errno == EEXIST ? EADDRINUSE : errno, "bind"));
  }
  return {};
}

}  // namespace

Result<UniqueFd> ListenSocket(const ServeOptions& options, std::string* ours) {
  UniqueFd fd;
  if (options.socket.empty()) {
    // systemd socket activation: LISTEN_PID is us, LISTEN_FDS >= 1, fd 3.
    const char* pid = ::getenv("LISTEN_PID");
    const char* fds = ::getenv("LISTEN_FDS");
    if (pid == nullptr || fds == nullptr || std::atol(pid) != ::getpid() || std::atoi(fds) < 1) {
      return Fail(MakeError(ErrorKind::kPolicy,
                            "no socket: give --socket PATH, or start from a systemd socket unit"));
    }
    ::unsetenv("LISTEN_PID");
    ::unsetenv("LISTEN_FDS");
    ::unsetenv("LISTEN_FDNAMES");
    int listening = 0, domain = 0;
    socklen_t len = sizeof(int);
    if (::getsockopt(3, SOL_SOCKET, SO_ACCEPTCONN, &listening, &len) != 0 || listening == 0 ||
        ::getsockopt(3, SOL_SOCKET, SO_DOMAIN, &domain, &len) != 0 || domain != AF_UNIX) {
      return Fail(MakeError(ErrorKind::kPolicy, "LISTEN_FDS: fd 3 is not a listening unix socket"));
    }
    ::fcntl(3, F_SETFD, FD_CLOEXEC);
    fd = UniqueFd(3);
    LX_TRY(sandbox::SetNonBlocking(3));
    return fd;
  }
  if (options.socket.size() >= sizeof(sockaddr_un::sun_path)) {
    return Fail(MakeError(ErrorKind::kPolicy, "socket path {:?} is too long", options.socket));
  }
  size_t slash = options.socket.rfind('/');
  // (Not `if (dir.empty()) dir = "/"`: gcc 12 warns about that assignment here, -Wrestrict.)
  std::string dir = slash == std::string::npos ? "."
                    : slash == 0               ? "/"
                                               : options.socket.substr(0, slash);
  std::string name = slash == std::string::npos ? options.socket : options.socket.substr(slash + 1);
  if (name.empty() || name == "." || name == "..") {
    return Fail(MakeError(ErrorKind::kPolicy, "socket path {:?}: not a file name", options.socket));
  }
  int raw = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (raw < 0) return Fail(OsError(errno, "socket"));
  fd = UniqueFd(raw);
  if (Status s = BindListening(raw, dir, name); !s) {
    return Fail(std::move(s).error().With("socket {:?}", options.socket));
  }
  *ours = options.socket;
  return fd;
}

SignalMask::SignalMask(std::initializer_list<int> signals) {
  sigset_t set;
  sigemptyset(&set);
  for (int s : signals) sigaddset(&set, s);
  pthread_sigmask(SIG_BLOCK, &set, &old_);
}

SignalMask::~SignalMask() { pthread_sigmask(SIG_SETMASK, &old_, nullptr); }

Status StopSignals::Open(kj::UnixEventPort& port) {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  int sfd = ::signalfd(-1, &set, SFD_CLOEXEC | SFD_NONBLOCK);
  if (sfd < 0) return Fail(OsError(errno, "signalfd"));
  fd_ = UniqueFd(sfd);
  observer_ = kj::heap<kj::UnixEventPort::FdObserver>(port, fd_.get(),
                                                      kj::UnixEventPort::FdObserver::OBSERVE_READ);
  return {};
}

kj::Promise<void> StopSignals::Watch(std::function<void(const char* why)> stop) {
  return observer_->whenBecomesReadable().then([this, stop]() -> kj::Promise<void> {
    struct signalfd_siginfo info;
    while (::read(fd_.get(), &info, sizeof(info)) == sizeof(info)) {
      stop(info.ssi_signo == SIGTERM ? "SIGTERM" : "SIGINT");
    }
    return Watch(stop);
  });
}

}  // namespace layerx::serve
