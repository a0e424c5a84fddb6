#include "broker/engine/manifest.h"

#include <openssl/evp.h>

#include <nlohmann/json.hpp>
#include <unordered_map>

#include "sandbox/sys.h"

namespace layerx::broker {

using extractor::Kind;

bool IsValidUtf8(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    auto c = static_cast<unsigned char>(s[i]);
    size_t len;
    uint32_t cp;
    if (c < 0x80) {
      ++i;
      continue;
    }
    if ((c & 0xe0) == 0xc0) {
      len = 2;
      cp = c & 0x1f;
    } else if ((c & 0xf0) == 0xe0) {
      len = 3;
      cp = c & 0x0f;
    } else if ((c & 0xf8) == 0xf0) {
      len = 4;
      cp = c & 0x07;
    } else
      return false;
    if (i + len > s.size()) return false;
    for (size_t k = 1; k < len; ++k) {
      auto cc = static_cast<unsigned char>(s[i + k]);
      if ((cc & 0xc0) != 0x80) return false;
      cp = (cp << 6) | (cc & 0x3f);
    }
    // Overlong forms, surrogates and values past U+10FFFF are not UTF-8.
    static constexpr uint32_t kMin[] = {0, 0, 0x80, 0x800, 0x10000};
    if (cp < kMin[len] || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return false;
    i += len;
  }
  return true;
}

std::string Base64(std::string_view bytes) {
  std::string out(4 * ((bytes.size() + 2) / 3) + 1, '\0');
  int n = EVP_EncodeBlock(reinterpret_cast<unsigned char*>(out.data()),
                          reinterpret_cast<const unsigned char*>(bytes.data()),
                          static_cast<int>(bytes.size()));
  out.resize(static_cast<size_t>(n));
  return out;
}

namespace {

void PutBytes(nlohmann::ordered_json& obj, const std::string& key, const std::string& value) {
  if (IsValidUtf8(value)) {
    obj[key] = value;
  } else {
    obj[key + "_b64"] = Base64(value);
  }
}

}  // namespace

Status WriteManifest(const ImageTree& tree, int fd) {
  std::unordered_map<const Inode*, uint64_t> ids;
  std::unordered_map<const Inode*, uint64_t> links;
  for (const auto& [path, inode] : tree.entries()) ++links[inode.get()];
  std::string out;
  for (const auto& [path, inode] : tree.entries()) {
    const extractor::EntryRecord& m = inode->meta;
    auto [it, fresh] = ids.emplace(inode.get(), ids.size() + 1);
    nlohmann::ordered_json line;
    PutBytes(line, "path", path.empty() ? std::string(".") : path);
    line["kind"] = extractor::KindName(m.kind);
    line["uid"] = m.uid;
    line["gid"] = m.gid;
    line["mode"] = m.mode;
    if (m.kind == Kind::kFile) line["size"] = m.size;
    line["mtime_ns"] = m.mtime_ns;
    if (m.kind == Kind::kSymlink) PutBytes(line, "target", m.symlink_target);
    if (m.kind == Kind::kChar || m.kind == Kind::kBlock) {
      line["rdev_major"] = m.rdev_major;
      line["rdev_minor"] = m.rdev_minor;
    }
    line["inode"] = it->second;
    line["nlink"] = links[inode.get()];
    if (!m.xattrs.empty()) {
      nlohmann::ordered_json xattrs = nlohmann::ordered_json::object();
      for (const auto& [name, value] : m.xattrs) {
        // xattr names are bytes too; a non-UTF-8 one is keyed "b64:<base64>".
        xattrs[IsValidUtf8(name) ? name : "b64:" + Base64(name)] = Base64(value);
      }
      line["xattrs"] = std::move(xattrs);
    }
    out += line.dump();
    out += '\n';
    if (out.size() > (1 << 20)) {
      LX_TRY(sandbox::WriteAll(fd, std::as_bytes(std::span(out))));
      out.clear();
    }
  }
  return sandbox::WriteAll(fd, std::as_bytes(std::span(out)));
}

}  // namespace layerx::broker
