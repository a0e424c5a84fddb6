#include "broker/source/registry_auth.h"

#include <fcntl.h>
#include <openssl/evp.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/stat.h>
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

std::string Env(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr ? std::string(v) : std::string();
}

// The file's bytes, or nullopt when it is missing, unreadable or not a regular
// file: each of those is skipped, as skopeo skips a file it cannot use.
Result<std::optional<std::string>> ReadAuthFile(const std::string& path) {
  auto fd = sandbox::OpenRegularFile(AT_FDCWD, path, 0);
  if (!fd) return std::optional<std::string>();
  LX_ASSIGN_OR_RETURN(struct stat st, sandbox::Fstat(fd->get()));
  if (static_cast<uint64_t>(st.st_size) > kMaxAuthFileBytes) {
    return std::unexpected(Error(
        ErrorKind::kLimitExceeded, 0,
        fmt::format("auth file {:?} is {} bytes, over {}", path, st.st_size, kMaxAuthFileBytes)));
  }
  auto out = sandbox::ReadUpTo(fd->get(), static_cast<size_t>(st.st_size));
  if (!out) return std::optional<std::string>();  // EISDIR and the like: skipped too
  return std::optional<std::string>(std::move(*out));
}

// containers/image normalizeAuthFileKey: a key with a scheme is cut at its first
// '/' ("https://index.docker.io/v1/" -> "index.docker.io"), ~/.docker/config.json
// keys too (docker login long wrote URLs there); then docker.io's aliases are one.
std::string NormalizeKey(const std::string& key, bool docker_config) {
  std::string stripped = key;
  bool had_scheme = false;
  for (std::string_view scheme : {"http://", "https://"}) {
    if (stripped.starts_with(scheme)) {
      stripped.erase(0, scheme.size());
      had_scheme = true;
      break;
    }
  }
  if (had_scheme || docker_config) stripped = stripped.substr(0, stripped.find('/'));
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

// What a helper printed, for an error line: its first line, printable ASCII
// only, at most 160 characters (it is an error message, not a secret: a
// helper prints credentials only when it succeeds).
std::string HelperSays(std::string_view out) {
  out = out.substr(0, out.find('\n'));
  std::string said;
  for (char ch : out.substr(0, 160)) said += (ch >= 0x20 && ch < 0x7f) ? ch : '?';
  return said;
}

// Runs `docker-credential-NAME get` (found in $PATH, as skopeo runs it: the
// docker-credential-helpers protocol) with `server` on its stdin, and reads
// its answer: {"ServerURL": ..., "Username": ..., "Secret": ...}. nullopt
// when the helper says it has none ("credentials not found"). Its stderr goes
// to /dev/null; it gets 30 s. SECURITY: the answer is wiped once parsed, and
// no error quotes it.
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
  LX_ASSIGN_OR_RETURN(sandbox::Pipe out, sandbox::MakePipe(0));
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, in.read.get(), 0);
  posix_spawn_file_actions_adddup2(&actions, out.write.get(), 1);
  posix_spawn_file_actions_addopen(&actions, 2, "/dev/null", O_WRONLY, 0);
  posix_spawnattr_t attr;
  posix_spawnattr_init(&attr);
  sigset_t none;
  sigemptyset(&none);
  posix_spawnattr_setsigmask(&attr, &none);
  posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK);
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
    std::string line = server + "\n";
    (void)sandbox::WriteAll(in.write.get(), std::as_bytes(std::span(line)));
    in.write.reset();
  }
  std::string answer;
  bool timed_out = false, too_long = false;
  const int64_t deadline = sandbox::MonotonicNs() + int64_t{kHelperTimeoutMs} * 1'000'000;
  for (;;) {
    int64_t left_ms = (deadline - sandbox::MonotonicNs()) / 1'000'000;
    if (left_ms <= 0) {
      timed_out = true;
      break;
    }
    struct pollfd pfd = {.fd = out.read.get(), .events = POLLIN, .revents = 0};
    int n = ::poll(&pfd, 1, static_cast<int>(std::min<int64_t>(left_ms, 1000)));
    if (n < 0 && errno != EINTR) break;
    if (n <= 0) continue;
    char buf[4096];
    ssize_t got = ::read(out.read.get(), buf, sizeof(buf));
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0) break;
    if (answer.size() + static_cast<size_t>(got) > kMaxHelperAnswer) {
      too_long = true;
      break;
    }
    answer.append(buf, static_cast<size_t>(got));
  }
  if (timed_out || too_long) ::kill(pid, SIGKILL);
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  auto wipe = [&] { OPENSSL_cleanse(answer.data(), answer.size()); };
  if (timed_out) {
    wipe();
    return fail(fmt::format("no answer within {} s", kHelperTimeoutMs / 1000));
  }
  if (too_long) {
    wipe();
    return fail(fmt::format("an answer over {} bytes", kMaxHelperAnswer));
  }
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    // docker-credential-helpers' "credentials not found in native keychain":
    // none here, as skopeo reads it.
    if (answer.find("credentials not found") != std::string::npos) {
      wipe();
      return std::optional<Credentials>();
    }
    std::string why = WIFEXITED(status) ? fmt::format("exit {}", WEXITSTATUS(status))
                                        : fmt::format("killed by signal {}", WTERMSIG(status));
    std::string said = HelperSays(answer);
    wipe();
    return fail(said.empty() ? why : fmt::format("{}: {:?}", why, said));
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
  if (!user || !secret) {
    if (doc.is_object()) {
      for (auto& [k, v] : doc.items()) {
        if (v.is_string())
          OPENSSL_cleanse(v.get_ptr<std::string*>()->data(), v.get_ptr<std::string*>()->size());
      }
    }
    return fail("its answer is not JSON with \"Username\" and \"Secret\"");
  }
  if (*user == "<token>") {  // an identity token (OAuth2 refresh token): not supported
    OPENSSL_cleanse(secret->data(), secret->size());
    return fail("it gave an identity token, which layerx does not support yet");
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
  if (!home.empty()) paths.push_back(home + "/.docker/config.json");
  return paths;
}

Result<std::optional<Credentials>> FindCredentials(const std::string& registry,
                                                   const std::optional<std::string>& creds,
                                                   const std::vector<std::string>& auth_files,
                                                   const std::string& repository) {
  if (creds) {
    LX_ASSIGN_OR_RETURN(Credentials c, ParseCreds(*creds));
    return std::optional<Credentials>(std::move(c));
  }
  const std::string wanted = NormalizeRegistry(registry);
  std::optional<Error> helper_error;  // the first credential helper that failed
  for (const std::string& path : auth_files) {
    LX_ASSIGN_OR_RETURN(std::optional<std::string> text, ReadAuthFile(path));
    if (!text) continue;
    // No exceptions, and the parser's message is not used: it quotes the bytes
    // it stopped at, which may be a secret.
    nlohmann::json doc = nlohmann::json::parse(*text, nullptr, /*allow_exceptions=*/false);
    OPENSSL_cleanse(text->data(), text->size());
    if (doc.is_discarded() || !doc.is_object()) {
      return std::unexpected(
          MakeError(ErrorKind::kPolicy, "auth file {:?}: not a JSON object", path));
    }
    // A credential helper for the registry comes first, as in skopeo.
    if (auto helpers = doc.find("credHelpers"); helpers != doc.end() && helpers->is_object()) {
      if (auto h = helpers->find(registry); h != helpers->end()) {
        const std::string where = fmt::format("auth file {:?}, credHelpers {:?}", path, registry);
        if (!h->is_string()) {
          return std::unexpected(MakeError(ErrorKind::kPolicy, "{}: not a string", where));
        }
        Result<std::optional<Credentials>> c = FromHelper(h->get<std::string>(), registry, where);
        if (c && *c) return c;
        // None, or the helper failed: the next file, as skopeo goes on; a
        // failure is said only if no file has credentials.
        if (!c && !helper_error) helper_error = std::move(c).error();
        continue;
      }
    }
    auto auths = doc.find("auths");
    if (auths == doc.end() || !auths->is_object()) continue;
    const bool docker_config = path.ends_with("/.docker/config.json");
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
        if (NormalizeKey(it.key(), docker_config) == wanted) {
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
    if (auto token = entry->find("identitytoken");
        token != entry->end() && token->is_string() && !token->get<std::string>().empty()) {
      return std::unexpected(MakeError(
          ErrorKind::kPolicy, "{}: an identity token, which layerx does not support yet", where));
    }
    auto auth = entry->find("auth");
    if (auth == entry->end() || !auth->is_string()) {
      // An entry without "auth" (an identity token, a helper's) gives us nothing to
      // send: keep looking, as skopeo does for an empty entry.
      continue;
    }
    LX_ASSIGN_OR_RETURN(Credentials c, DecodeAuth(auth->get<std::string>(), where));
    return std::optional<Credentials>(std::move(c));
  }
  if (helper_error) return std::unexpected(std::move(*helper_error));
  return std::optional<Credentials>();
}

}  // namespace layerx::broker
