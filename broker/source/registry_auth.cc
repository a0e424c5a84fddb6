#include "broker/source/registry_auth.h"

#include <fcntl.h>
#include <openssl/evp.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <nlohmann/json.hpp>

#include "broker/source/registry_ref.h"
#include "sandbox/sys.h"

namespace layerx::broker {
namespace {

constexpr uint64_t kMaxAuthFileBytes = 4 * 1024 * 1024;
constexpr size_t kMaxHelperAnswer = 64 * 1024;
constexpr int kHelperTimeoutMs = 30'000;

// Docker's first config file: one object of registry keys, as `auths` is now.
constexpr const char* kLegacyDockerCfg = ".dockercfg";

bool IsLegacyDockerCfg(const std::string& path) {
  size_t slash = path.rfind('/');
  return path.compare(slash == std::string::npos ? 0 : slash + 1, std::string::npos,
                      kLegacyDockerCfg) == 0;
}

std::string Env(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr ? std::string(v) : std::string();
}

// The file's bytes, or nullopt when it is missing, unreadable or not a regular
// file: each of those is skipped, as skopeo skips a file it cannot use.
Result<std::optional<std::string>> ReadAuthFile(const std::string& path) {
  auto text = sandbox::ReadRegularFile(path, kMaxAuthFileBytes);
  if (text) return std::optional<std::string>(std::move(*text));
  if (text.error().kind() == ErrorKind::kLimitExceeded) {
    return Fail(std::move(text).error().With("auth file"));
  }
  return std::optional<std::string>();  // missing, EACCES, EISDIR and the like: skipped
}

// containers/image normalizeAuthFileKey: a key with a scheme is cut at its first
// '/' ("https://index.docker.io/v1/" -> "index.docker.io"; docker login long
// wrote URLs into ~/.docker/config.json); one without is kept whole, so a
// namespace key ("quay.io/org") never stands for the registry; then docker.io's
// aliases are one.
std::string NormalizeKey(const std::string& key) {
  std::string stripped = key;
  bool had_scheme = false;
  for (std::string_view scheme : {"http://", "https://"}) {
    if (stripped.starts_with(scheme)) {
      stripped.erase(0, scheme.size());
      had_scheme = true;
      break;
    }
  }
  if (had_scheme) stripped = stripped.substr(0, stripped.find('/'));
  return NormalizeRegistry(stripped);
}

// base64("user:pass") -> Credentials through OpenSSL's decoder. The error
// names neither the value nor any part of it.
Result<Credentials> DecodeAuth(const std::string& b64, const std::string& where) {
  auto bad = [&] {
    return std::unexpected(
        MakeError(ErrorKind::kPolicy, "{}: \"auth\" is not base64 of \"user:password\"", where));
  };
  if (b64.empty() || b64.size() % 4 != 0 || b64.size() > 64 * 1024) return bad();
  std::string out(b64.size() / 4 * 3, '\0');
  int n = EVP_DecodeBlock(reinterpret_cast<unsigned char*>(out.data()),
                          reinterpret_cast<const unsigned char*>(b64.data()),
                          static_cast<int>(b64.size()));
  if (n < 0) return bad();
  // EVP_DecodeBlock counts the padding as zero bytes; drop them.
  size_t len = static_cast<size_t>(n);
  size_t pad = 0;
  for (size_t i = b64.size(); i > 0 && b64[i - 1] == '=' && pad < 2; --i) ++pad;
  if (pad > len) return bad();
  out.resize(len - pad);
  size_t colon = out.find(':');
  if (colon == std::string::npos || colon == 0) {
    OPENSSL_cleanse(out.data(), out.size());
    return bad();
  }
  Credentials c{out.substr(0, colon), out.substr(colon + 1)};
  OPENSSL_cleanse(out.data(), out.size());
  return c;
}

}  // namespace

void WipeString(std::string& s) {
  s.resize(s.capacity());  // within the capacity: no reallocation
  OPENSSL_cleanse(s.data(), s.size());
  s.clear();
}

Credentials::~Credentials() {
  WipeString(username);
  WipeString(password);
  WipeString(identity_token);
}

void WipeJson(nlohmann::json& doc) {
  if (doc.is_string()) {
    WipeString(doc.get_ref<std::string&>());
  } else if (doc.is_structured()) {
    for (auto& item : doc) WipeJson(item);
  }
}

namespace {

// Runs `docker-credential-NAME get` (found in $PATH, as skopeo runs it: the
// docker-credential-helpers protocol) with `server` on its stdin, and reads
// its answer: {"ServerURL": ..., "Username": ..., "Secret": ...}. nullopt
// when the helper says it has none ("credentials not found in native
// keychain"). The helper gets no fd but its stdin and stdout (stderr is
// /dev/null), default signal dispositions, a process group of its own, and
// 30 s for everything: past that, or once it exited and its stdout stayed
// open (a child it left), the group is killed. SECURITY: its output is never
// quoted (a helper may print credentials and then fail) and is wiped once
// read.
Result<std::optional<Credentials>> FromHelper(const std::string& name, const std::string& server,
                                              const std::string& where) {
  const std::string program = "docker-credential-" + name;
  auto fail = [&](std::string_view why) {
    return std::unexpected(
        MakeError(ErrorKind::kPolicy, "{}: credential helper {}: {}", where, program, why));
  };
  if (name.empty() || name.find('/') != std::string::npos || name.find('\0') != std::string::npos) {
    return fail("not a helper name");
  }
  LX_ASSIGN_OR_RETURN(sandbox::Pipe in, sandbox::MakePipe(0));
  LX_ASSIGN_OR_RETURN(sandbox::Pipe out, sandbox::MakePipe(O_NONBLOCK));
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, in.read.get(), 0);
  posix_spawn_file_actions_adddup2(&actions, out.write.get(), 1);
  posix_spawn_file_actions_addopen(&actions, 2, "/dev/null", O_WRONLY, 0);
  posix_spawn_file_actions_addclosefrom_np(&actions, 3);  // a host's fds without O_CLOEXEC too
  posix_spawnattr_t attr;
  posix_spawnattr_init(&attr);
  sigset_t none, all;
  sigemptyset(&none);
  sigfillset(&all);
  posix_spawnattr_setsigmask(&attr, &none);
  posix_spawnattr_setsigdefault(&attr, &all);  // SIGPIPE ignored by the CLI, not by the helper
  posix_spawnattr_setpgroup(&attr, 0);
  posix_spawnattr_setflags(&attr,
                           POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETPGROUP);
  std::string arg_get = "get";
  char* argv[] = {const_cast<char*>(program.c_str()), arg_get.data(), nullptr};
  pid_t pid = -1;
  int rc = ::posix_spawnp(&pid, program.c_str(), &actions, &attr, argv, environ);
  posix_spawn_file_actions_destroy(&actions);
  posix_spawnattr_destroy(&attr);
  if (rc != 0) {
    // EACCES as execvp(3) gives it: a dir of $PATH or a file there not searchable.
    return fail(rc == ENOENT   ? std::string("not found in $PATH")
                : rc == EACCES ? std::string("not found in $PATH, or not executable (EACCES)")
                               : fmt::format("cannot run it: {}", strerror(rc)));
  }
  in.read.reset();
  out.write.reset();
  {
    sandbox::ScopedSigpipeBlock no_sigpipe;  // a helper that does not read its stdin
    // As docker's client sends it: the server, no newline.
    (void)sandbox::WriteAll(in.write.get(), std::as_bytes(std::span(server)));
    in.write.reset();
  }
  // Its exit, seen beside its stdout: a child it left holding stdout does
  // not keep us waiting for an end of file.
  sandbox::UniqueFd exited(static_cast<int>(::syscall(SYS_pidfd_open, pid, 0)));
  std::string answer;
  answer.reserve(kMaxHelperAnswer);  // never reallocated: no copy of it left unwiped
  char buf[4096];
  enum class End { kEof, kExited, kTimeout, kTooLong, kError } end = End::kError;
  int64_t grace_end = 0;  // once it exited: what it wrote is read for 100 ms more
  const int64_t deadline = sandbox::MonotonicNs() + int64_t{kHelperTimeoutMs} * 1'000'000;
  for (;;) {
    const int64_t now = sandbox::MonotonicNs();
    if (now >= deadline) {
      end = End::kTimeout;
      break;
    }
    if (grace_end != 0 && now >= grace_end) {
      end = End::kExited;
      break;
    }
    const int64_t until = grace_end != 0 ? grace_end : deadline;
    struct pollfd fds[2] = {
        {.fd = out.read.get(), .events = POLLIN, .revents = 0},
        {.fd = grace_end == 0 ? exited.get() : -1, .events = POLLIN, .revents = 0}};
    int n =
        ::poll(fds, 2, static_cast<int>(std::min<int64_t>((until - now) / 1'000'000 + 1, 1000)));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) break;
    if (fds[1].revents != 0) grace_end = sandbox::MonotonicNs() + 100'000'000;
    if (fds[0].revents == 0) continue;
    ssize_t got = ::read(out.read.get(), buf, sizeof(buf));
    if (got < 0 && (errno == EINTR || errno == EAGAIN)) continue;
    if (got < 0) break;
    if (got == 0) {
      end = End::kEof;
      break;
    }
    if (answer.size() + static_cast<size_t>(got) > kMaxHelperAnswer) {
      end = End::kTooLong;
      break;
    }
    answer.append(buf, static_cast<size_t>(got));
  }
  OPENSSL_cleanse(buf, sizeof(buf));
  // The helper is waited for within the time that is left (then killed),
  // first without reaping it: while it is a zombie its process group cannot
  // be taken by another, so the kill of the group (a child it left behind)
  // reaches its own and no one else's.
  for (;;) {
    siginfo_t info = {};
    int w = ::waitid(P_PID, static_cast<id_t>(pid), &info, WEXITED | WNOHANG | WNOWAIT);
    if (w == 0 && info.si_pid == pid) break;  // exited, not reaped
    if (w < 0 && errno != EINTR) break;       // ECHILD: a host's SIGCHLD handler took it
    if (end != End::kEof || sandbox::MonotonicNs() >= deadline) {
      if (end == End::kEof) end = End::kTimeout;
      break;
    }
    struct pollfd pfd = {.fd = exited.get(), .events = POLLIN, .revents = 0};
    (void)::poll(&pfd, 1, 50);
  }
  ::kill(-pid, SIGKILL);
  int status = 0;
  bool reaped = false;
  for (;;) {
    pid_t w = ::waitpid(pid, &status, 0);
    if (w == pid) {
      reaped = true;
      break;
    }
    if (errno != EINTR) break;
  }
  auto wipe = [&] { OPENSSL_cleanse(answer.data(), answer.size()); };
  switch (end) {
    case End::kTimeout:
      wipe();
      return fail(fmt::format("no answer within {} s", kHelperTimeoutMs / 1000));
    case End::kTooLong:
      wipe();
      return fail(fmt::format("an answer over {} bytes", kMaxHelperAnswer));
    case End::kError:
      wipe();
      return fail("its output could not be read");
    case End::kEof:
    case End::kExited:
      break;
  }
  if (!reaped) {
    wipe();
    return fail("its exit status was lost (reaped elsewhere)");
  }
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    // docker-credential-helpers' answer when it has none, compared whole as
    // docker's client compares it: none here.
    std::string_view said = answer;
    while (!said.empty() && (said.back() == '\n' || said.back() == '\r' || said.back() == ' ')) {
      said.remove_suffix(1);
    }
    const bool not_found = said == "credentials not found in native keychain";
    wipe();
    if (not_found) return std::optional<Credentials>();
    return fail(WIFEXITED(status) ? fmt::format("exit {}", WEXITSTATUS(status))
                                  : fmt::format("killed by signal {}", WTERMSIG(status)));
  }
  nlohmann::json doc = nlohmann::json::parse(answer, nullptr, /*allow_exceptions=*/false);
  wipe();
  auto text = [&](const char* key) -> std::optional<std::string> {
    if (!doc.is_object()) return std::nullopt;
    auto it = doc.find(key);
    if (it == doc.end() || !it->is_string()) return std::nullopt;
    return it->get<std::string>();
  };
  std::optional<std::string> user = text("Username"), secret = text("Secret");
  WipeJson(doc);
  if (!user || !secret) {
    if (secret) OPENSSL_cleanse(secret->data(), secret->size());
    return fail("its answer is not JSON with \"Username\" and \"Secret\"");
  }
  if (*user == "<token>") {  // an identity token (OAuth2 refresh token)
    OPENSSL_cleanse(user->data(), user->size());
    if (secret->empty()) return fail("it gave an empty identity token");
    Credentials c;
    c.identity_token = std::move(*secret);
    return std::optional<Credentials>(std::move(c));
  }
  if (user->empty() && secret->empty()) return std::optional<Credentials>();
  Credentials c{std::move(*user), std::move(*secret)};
  return std::optional<Credentials>(std::move(c));
}

// containers/image authKeysForKey: "host/ns/repo" -> "host/ns/repo",
// "host/ns", "host": the entries an auth.json may hold for a repository, the
// most specific first.
std::vector<std::string> KeysFor(const std::string& registry, const std::string& repository) {
  std::vector<std::string> keys;
  std::string key = repository.empty() ? registry : registry + "/" + repository;
  for (;;) {
    keys.push_back(key);
    if (key.size() <= registry.size()) break;
    key.resize(key.rfind('/'));
  }
  return keys;
}

}  // namespace

Result<Credentials> ParseCreds(const std::string& user_colon_pass) {
  size_t colon = user_colon_pass.find(':');
  if (colon == std::string::npos || colon == 0) {
    return std::unexpected(
        MakeError(ErrorKind::kPolicy, "--creds: want USER:PASSWORD (the user name non-empty)"));
  }
  return Credentials{user_colon_pass.substr(0, colon), user_colon_pass.substr(colon + 1)};
}

std::vector<std::string> AuthFilePaths() {
  std::vector<std::string> paths;
  if (std::string f = Env("REGISTRY_AUTH_FILE"); !f.empty()) {
    paths.push_back(f);
    return paths;  // skopeo: a file the user named is the only one
  }
  if (std::string run = Env("XDG_RUNTIME_DIR"); !run.empty()) {
    paths.push_back(run + "/containers/auth.json");
  } else {
    paths.push_back(fmt::format("/run/containers/{}/auth.json", ::getuid()));
  }
  std::string home = Env("HOME");
  std::string config = Env("XDG_CONFIG_HOME");
  if (config.empty() && !home.empty()) config = home + "/.config";
  if (!config.empty()) paths.push_back(config + "/containers/auth.json");
  // Docker's own: $DOCKER_CONFIG (the dir CI systems point elsewhere) instead of
  // ~/.docker, then the legacy ~/.dockercfg.
  if (std::string docker = Env("DOCKER_CONFIG"); !docker.empty()) {
    paths.push_back(docker + "/config.json");
  } else if (!home.empty()) {
    paths.push_back(home + "/.docker/config.json");
  }
  if (!home.empty()) paths.push_back(home + "/" + kLegacyDockerCfg);
  return paths;
}

namespace {

// Steps 2-4 of registry_auth.h: the auth files, with their credHelpers.
Result<std::optional<Credentials>> FromAuthFiles(const std::string& registry,
                                                 const std::vector<std::string>& auth_files,
                                                 const std::string& repository) {
  const std::string wanted = NormalizeRegistry(registry);
  for (const std::string& path : auth_files) {
    LX_ASSIGN_OR_RETURN(std::optional<std::string> text, ReadAuthFile(path));
    if (!text) continue;
    // No exceptions, and the parser's message is not used: it quotes the bytes
    // it stopped at, which may be a secret.
    nlohmann::json doc = nlohmann::json::parse(*text, nullptr, /*allow_exceptions=*/false);
    OPENSSL_cleanse(text->data(), text->size());
    // Its secrets are wiped too, however this file's turn ends.
    struct WipeOnExit {
      nlohmann::json& doc;
      ~WipeOnExit() { WipeJson(doc); }
    } wipe_doc{doc};
    if (doc.is_discarded() || !doc.is_object()) {
      return std::unexpected(
          MakeError(ErrorKind::kPolicy, "auth file {:?}: not a JSON object", path));
    }
    // The legacy format (~/.dockercfg) is the `auths` object alone: no helpers.
    const bool legacy = IsLegacyDockerCfg(path);
    // A credential helper for the registry comes first, as in skopeo.
    if (auto helpers = doc.find("credHelpers");
        !legacy && helpers != doc.end() && helpers->is_object()) {
      if (auto h = helpers->find(registry); h != helpers->end()) {
        const std::string where = fmt::format("auth file {:?}, credHelpers {:?}", path, registry);
        if (!h->is_string()) {
          return std::unexpected(MakeError(ErrorKind::kPolicy, "{}: not a string", where));
        }
        // A helper that fails ends the search, as in skopeo: another file
        // could hold another identity. One that has none: the next file.
        LX_ASSIGN_OR_RETURN(std::optional<Credentials> c,
                            FromHelper(h->get<std::string>(), registry, where));
        if (c) return c;
        continue;
      }
    }
    const nlohmann::json* auths = &doc;
    if (!legacy) {
      auto found = doc.find("auths");
      if (found == doc.end()) continue;
      auths = &*found;
    }
    if (!auths->is_object()) continue;
    const nlohmann::json* entry = nullptr;
    std::string key;
    // Repository and namespace keys ("quay.io/org") match exactly, the most
    // specific first (skopeo reads them in ~/.docker/config.json too).
    for (const std::string& k : KeysFor(registry, repository)) {
      if (auto exact = auths->find(k); exact != auths->end()) {
        entry = &*exact;
        key = k;
        break;
      }
    }
    if (entry == nullptr) {
      for (auto it = auths->begin(); it != auths->end(); ++it) {
        if (NormalizeKey(it.key()) == wanted) {
          entry = &it.value();
          key = it.key();
          break;
        }
      }
    }
    if (entry == nullptr) continue;
    const std::string where = fmt::format("auth file {:?}, entry {:?}", path, key);
    if (!entry->is_object()) {
      return std::unexpected(MakeError(ErrorKind::kPolicy, "{}: not an object", where));
    }
    // An identity token is what a Bearer realm gets (Docker keeps a user name,
    // or "user:" of ACR's zeros, in `auth`); the entry's `auth`, when it
    // decodes, still serves a registry that asks for Basic, as in skopeo.
    auto auth = entry->find("auth");
    const bool has_auth = auth != entry->end() && auth->is_string();
    if (auto token = entry->find("identitytoken"); token != entry->end() && token->is_string() &&
                                                   !token->get_ref<const std::string&>().empty()) {
      Credentials c;
      if (has_auth) {
        if (auto decoded = DecodeAuth(auth->get_ref<const std::string&>(), where)) {
          c.username = decoded->username;
          c.password = decoded->password;
        }
      }
      c.identity_token = token->get_ref<const std::string&>();
      return std::optional<Credentials>(std::move(c));
    }
    if (!has_auth) {
      // An entry without "auth" (a helper's) gives us nothing to send: keep
      // looking, as skopeo does for an empty entry.
      continue;
    }
    LX_ASSIGN_OR_RETURN(Credentials c, DecodeAuth(auth->get_ref<const std::string&>(), where));
    return std::optional<Credentials>(std::move(c));
  }
  return std::optional<Credentials>();
}

}  // namespace

Result<std::optional<Credentials>> FindCredentials(const std::string& registry,
                                                   const std::optional<std::string>& creds,
                                                   const std::vector<std::string>& auth_files,
                                                   const std::string& repository,
                                                   const std::vector<std::string>& helpers) {
  if (creds) {
    LX_ASSIGN_OR_RETURN(Credentials c, ParseCreds(*creds));
    return std::optional<Credentials>(std::move(c));
  }
  if (helpers.empty()) return FromAuthFiles(registry, auth_files, repository);
  // registries.conf's helpers, in order: none found or failed, the next one.
  std::optional<Error> first_failure;
  for (const std::string& helper : helpers) {
    auto found = helper == kAuthFilesHelper
                     ? FromAuthFiles(registry, auth_files, repository)
                     : FromHelper(helper, registry, "registries.conf credential-helpers");
    if (!found) {
      if (!first_failure) first_failure = std::move(found).error();
      continue;
    }
    if (*found) return found;
  }
  if (first_failure) return Fail(std::move(*first_failure));
  return std::optional<Credentials>();
}

}  // namespace layerx::broker
