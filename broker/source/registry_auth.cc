#include "broker/source/registry_auth.h"

#include <fcntl.h>
#include <openssl/evp.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <nlohmann/json.hpp>

#include "broker/source/registry_ref.h"
#include "sandbox/sys.h"

namespace layerx::broker {
namespace {

constexpr uint64_t kMaxAuthFileBytes = 4 * 1024 * 1024;

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
                                                   const std::vector<std::string>& auth_files) {
  if (creds) {
    LX_ASSIGN_OR_RETURN(Credentials c, ParseCreds(*creds));
    return std::optional<Credentials>(std::move(c));
  }
  const std::string wanted = NormalizeRegistry(registry);
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
    auto auths = doc.find("auths");
    if (auths == doc.end() || !auths->is_object()) continue;
    const bool docker_config = path.ends_with("/.docker/config.json");
    const nlohmann::json* entry = nullptr;
    std::string key;
    if (auto exact = auths->find(registry); exact != auths->end()) {
      entry = &*exact;
      key = registry;
    } else {
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
    auto auth = entry->find("auth");
    if (auth == entry->end() || !auth->is_string()) {
      // An entry without "auth" (an identity token, a helper's) gives us nothing to
      // send: keep looking, as skopeo does for an empty entry.
      continue;
    }
    LX_ASSIGN_OR_RETURN(Credentials c, DecodeAuth(auth->get<std::string>(), where));
    return std::optional<Credentials>(std::move(c));
  }
  return std::optional<Credentials>();
}

}  // namespace layerx::broker
