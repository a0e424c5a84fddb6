// ext4_dump IMAGE: every entry of an ext4 image, read back with libext2fs (not
// with anything layerx wrote), one JSON object per line sorted by path: path,
// kind, uid, gid, mode, size, target, rdev_major/minor, ino, nlink, sha256 of
// file content, xattrs (name -> base64). Non-UTF-8 strings as KEY_b64, like the
// manifest. lost+found is skipped.
#include <ext2fs/ext2_fs.h>
#include <ext2fs/ext2fs.h>
#include <openssl/evp.h>
#include <sys/stat.h>

#include <cstdio>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "broker/engine/manifest.h"

namespace {

using layerx::broker::Base64;
using layerx::broker::IsValidUtf8;

ext2_filsys fs;
std::map<std::string, ext2_ino_t> entries;

void Put(nlohmann::ordered_json& j, const std::string& key, const std::string& v) {
  if (IsValidUtf8(v)) {
    j[key] = v;
  } else {
    j[key + "_b64"] = Base64(v);
  }
}

struct Walk {
  std::string dir;
  std::vector<std::pair<std::string, ext2_ino_t>>* subdirs;
};

int Visit(ext2_ino_t, int, struct ext2_dir_entry* d, int, int, char*, void* priv) {
  auto* w = static_cast<Walk*>(priv);
  std::string name(d->name, static_cast<size_t>(ext2fs_dirent_name_len(d)));
  if (name == "." || name == "..") return 0;
  std::string path = w->dir.empty() ? name : w->dir + "/" + name;
  if (path == "lost+found") return 0;
  entries[path] = d->inode;
  if (ext2fs_dirent_file_type(d) == EXT2_FT_DIR) w->subdirs->emplace_back(path, d->inode);
  return 0;
}

std::string ReadAll(ext2_ino_t ino) {
  ext2_file_t file;
  if (ext2fs_file_open(fs, ino, 0, &file)) return {};
  std::string out;
  char buf[65536];
  unsigned int got;
  while (ext2fs_file_read(file, buf, sizeof(buf), &got) == 0 && got > 0) out.append(buf, got);
  ext2fs_file_close(file);
  return out;
}

std::string Sha256(ext2_ino_t ino) {
  ext2_file_t file;
  if (ext2fs_file_open(fs, ino, 0, &file)) return "error";
  EVP_MD_CTX* ctx = EVP_MD_CTX_new();
  EVP_DigestInit_ex(ctx, EVP_sha256(), nullptr);
  std::vector<char> buf(1 << 20);
  unsigned int got;
  while (ext2fs_file_read(file, buf.data(), static_cast<unsigned>(buf.size()), &got) == 0 &&
         got > 0) {
    EVP_DigestUpdate(ctx, buf.data(), got);
  }
  ext2fs_file_close(file);
  unsigned char md[32];
  unsigned int len;
  EVP_DigestFinal_ex(ctx, md, &len);
  EVP_MD_CTX_free(ctx);
  std::string hex;
  for (unsigned i = 0; i < len; ++i) hex += fmt::format("{:02x}", md[i]);
  return hex;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: ext4_dump IMAGE\n");
    return 2;
  }
  if (errcode_t rc = ext2fs_open(argv[1], EXT2_FLAG_64BITS, 0, 0, unix_io_manager, &fs)) {
    std::fprintf(stderr, "ext4_dump: %s\n", error_message(rc));
    return 1;
  }
  entries[""] = EXT2_ROOT_INO;
  std::vector<std::pair<std::string, ext2_ino_t>> pending = {{"", EXT2_ROOT_INO}};
  while (!pending.empty()) {
    auto [dir, ino] = pending.back();
    pending.pop_back();
    std::vector<std::pair<std::string, ext2_ino_t>> subdirs;
    Walk w{dir, &subdirs};
    ext2fs_dir_iterate2(fs, ino, 0, nullptr, Visit, &w);
    for (auto& s : subdirs) pending.push_back(s);
  }
  for (const auto& [path, ino] : entries) {
    struct ext2_inode_large inode;
    ext2fs_read_inode_full(fs, ino, reinterpret_cast<ext2_inode*>(&inode), sizeof(inode));
    nlohmann::ordered_json j;
    Put(j, "path", path.empty() ? "." : path);
    unsigned mode = inode.i_mode;
    const char* kind = LINUX_S_ISDIR(mode)    ? "dir"
                       : LINUX_S_ISREG(mode)  ? "file"
                       : LINUX_S_ISLNK(mode)  ? "symlink"
                       : LINUX_S_ISCHR(mode)  ? "char"
                       : LINUX_S_ISBLK(mode)  ? "block"
                       : LINUX_S_ISFIFO(mode) ? "fifo"
                                              : "other";
    j["kind"] = kind;
    j["uid"] = inode_uid(inode);
    j["gid"] = inode_gid(inode);
    j["mode"] = mode & 07777;
    j["ino"] = ino;
    j["nlink"] = inode.i_links_count;
    j["mtime"] = inode.i_mtime;
    j["mtime_nsec"] = inode.i_extra_isize >= 8 ? inode.i_mtime_extra >> 2 : 0;
    if (LINUX_S_ISREG(mode)) {
      j["size"] = EXT2_I_SIZE(&inode);
      j["sha256"] = Sha256(ino);
    }
    if (LINUX_S_ISLNK(mode)) {
      std::string target;
      if (ext2fs_is_fast_symlink(reinterpret_cast<ext2_inode*>(&inode))) {
        target.assign(reinterpret_cast<const char*>(inode.i_block), EXT2_I_SIZE(&inode));
      } else {
        target = ReadAll(ino);
      }
      Put(j, "target", target);
    }
    if (LINUX_S_ISCHR(mode) || LINUX_S_ISBLK(mode)) {
      unsigned major, minor;
      if (inode.i_block[0]) {
        major = (inode.i_block[0] >> 8) & 0xff;
        minor = inode.i_block[0] & 0xff;
      } else {
        unsigned dev = inode.i_block[1];
        major = (dev & 0xfff00) >> 8;
        minor = (dev & 0xff) | ((dev >> 12) & 0xfff00);
      }
      j["rdev_major"] = major;
      j["rdev_minor"] = minor;
    }
    struct ext2_xattr_handle* h;
    nlohmann::ordered_json xattrs = nlohmann::ordered_json::object();
    if (ext2fs_xattrs_open(fs, ino, &h) == 0) {
      if (ext2fs_xattrs_read(h) == 0) {
        ext2fs_xattrs_iterate(
            h,
            [](char* name, char* value, size_t len, void* data) -> int {
              (*static_cast<nlohmann::ordered_json*>(data))[name] = Base64(std::string(value, len));
              return 0;
            },
            &xattrs);
      }
      ext2fs_xattrs_close(&h);
    }
    if (!xattrs.empty()) j["xattrs"] = xattrs;
    std::printf("%s\n", j.dump().c_str());
  }
  ext2fs_close_free(&fs);
  return 0;
}
