// The ext4 build's entry points (ext4.h): the options, the plan (where the
// data stands, how big the image and its inode tables are), the filesystem
// made around the data with its identity, and the retry with room to spare.
// The layout is in ext4_layout.cc, the inodes in ext4_builder.cc.
#include "broker/ext4/ext4.h"

#include <errno.h>
#include <ext2fs/ext2_fs.h>
#include <ext2fs/ext2fs.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <mutex>
#include <span>
#include <vector>

#include "broker/ext4/ext4_builder.h"
#include "broker/ext4/ext4_io.h"
#include "broker/ext4/ext4_layout.h"
#include "broker/log/logging.h"
#include "sandbox/sys.h"

namespace layerx::broker {

using namespace ext4_detail;

namespace {

constexpr uint32_t kInodeSize = 256;
constexpr uint32_t kDescSize = EXT2_MIN_DESC_SIZE_64BIT;

// The UUID of a reproducible image: from the seed (the layers' digests), so the
// same input names the same filesystem.
void DerivedUuid(const std::string& seed, uint8_t out[16]) {
  // FNV-1a over the seed, twice with different offsets: 128 stable bits. Not a
  // security property, only stability.
  uint64_t a = 1469598103934665603ull, b = 1099511628211ull ^ 0x9e3779b97f4a7c15ull;
  for (unsigned char c : seed) {
    a = (a ^ c) * 1099511628211ull;
    b = (b ^ c) * 0x100000001b3ull + 0x7f4a7c15;
  }
  for (int i = 0; i < 8; ++i) {
    out[i] = static_cast<uint8_t>(a >> (56 - 8 * i));
    out[8 + i] = static_cast<uint8_t>(b >> (56 - 8 * i));
  }
  out[6] = static_cast<uint8_t>((out[6] & 0x0f) | 0x40);  // version 4
  out[8] = static_cast<uint8_t>((out[8] & 0x3f) | 0x80);  // RFC 4122 variant
}

// "0123abcd-..." (36 characters, dashes at 8, 13, 18 and 23) to 16 bytes.
bool ParseUuid(const std::string& text, uint8_t out[16]) {
  if (text.size() != 36) return false;
  size_t o = 0;
  for (size_t i = 0; i < 36;) {
    if (i == 8 || i == 13 || i == 18 || i == 23) {
      if (text[i++] != '-') return false;
      continue;
    }
    auto nibble = [](char c) -> int {
      if (c >= '0' && c <= '9') return c - '0';
      if (c >= 'a' && c <= 'f') return c - 'a' + 10;
      if (c >= 'A' && c <= 'F') return c - 'A' + 10;
      return -1;
    };
    int hi = nibble(text[i]), lo = nibble(text[i + 1]);
    if (hi < 0 || lo < 0) return false;
    out[o++] = static_cast<uint8_t>(hi << 4 | lo);
    i += 2;
  }
  return o == 16;
}

// The front of the image: the superblock and a group descriptor table for a
// filesystem of `max_bytes`.
uint64_t FrontBlocks(uint32_t bs, uint64_t max_bytes) {
  uint64_t first_data_block = bs == 1024 ? 1 : 0;
  uint64_t blocks_per_group = 8ull * bs;
  uint64_t groups = DivUp(DivUp(max_bytes, bs), blocks_per_group);
  return first_data_block + 1 + DivUp(groups * kDescSize, bs);
}

uint64_t MaxImageBytes(const Ext4Options& options, uint64_t max_data_bytes) {
  // The data, and generously what metadata and a journal add to it.
  uint64_t max = max_data_bytes + max_data_bytes / 4 + (1ull << 30);
  if (options.size_bytes) max = std::max(max, *options.size_bytes);
  return max;
}

// One build of the filesystem around the data, `blocks` big.
Status BuildOnce(int image_fd, const ImageTree& tree, Layout& layout,
                 const std::vector<Placed>& placed, const Ext4Options& options,
                 const BuildControl& control, uint64_t blocks, uint64_t inode_count,
                 uint64_t journal_blocks, uint64_t data_start, uint64_t data_end_block,
                 Ext4Plan& plan) {
  const uint64_t bs = options.block_size;
  const uint64_t front = data_start / bs;
  const uint64_t wanted = blocks;
  struct ext2_super_block param;
  std::memset(&param, 0, sizeof(param));
  param.s_log_block_size = static_cast<uint32_t>(__builtin_ctz(options.block_size) - 10);
  param.s_rev_level = EXT2_DYNAMIC_REV;
  param.s_inode_size = kInodeSize;
  param.s_desc_size = kDescSize;
  param.s_log_groups_per_flex = 4;
  param.s_min_extra_isize = param.s_want_extra_isize =
      sizeof(struct ext2_inode_large) - EXT2_GOOD_OLD_INODE_SIZE;
  param.s_default_mount_opts = EXT2_DEFM_XATTR_USER | EXT2_DEFM_ACL;
  param.s_feature_compat = EXT2_FEATURE_COMPAT_EXT_ATTR | EXT2_FEATURE_COMPAT_DIR_INDEX |
                           EXT4_FEATURE_COMPAT_SPARSE_SUPER2;
  param.s_feature_incompat = EXT2_FEATURE_INCOMPAT_FILETYPE | EXT3_FEATURE_INCOMPAT_EXTENTS |
                             EXT4_FEATURE_INCOMPAT_64BIT | EXT4_FEATURE_INCOMPAT_FLEX_BG;
  param.s_feature_ro_compat = EXT2_FEATURE_RO_COMPAT_LARGE_FILE | EXT4_FEATURE_RO_COMPAT_HUGE_FILE |
                              EXT4_FEATURE_RO_COMPAT_DIR_NLINK |
                              EXT4_FEATURE_RO_COMPAT_EXTRA_ISIZE |
                              EXT4_FEATURE_RO_COMPAT_METADATA_CSUM;
  param.s_inodes_count = static_cast<uint32_t>(inode_count);
  ext2_filsys fs = nullptr;
  for (int attempt = 0;; ++attempt) {
    ext2fs_blocks_count_set(&param, blocks);
    // libext2fs closes the fd it is given: it gets its own.
    LX_ASSIGN_OR_RETURN(sandbox::UniqueFd io_fd, sandbox::Dup(image_fd));
    std::string name = std::to_string(io_fd.get());
    errcode_t rc =
        ext2fs_initialize(name.c_str(), EXT2_FLAG_64BITS, &param, MemoryCachedFdIoManager(), &fs);
    if (rc) return Fail(Ext2Error(rc, "ext4: initialize"));
    (void)io_fd.release();
    if (ext2fs_blocks_count(fs->super) >= blocks || attempt == 1) break;
    // A last group too small for its own tables (and 50 blocks) was dropped:
    // give it that much.
    uint64_t kept = ext2fs_blocks_count(fs->super);
    uint64_t overhead = 2 + fs->inode_blocks_per_group + 50;
    ext2fs_free(fs);
    fs = nullptr;
    blocks = std::max(blocks, kept + overhead + 1);
  }
  struct FsCloser {
    ext2_filsys* fs;
    ~FsCloser() {
      if (*fs != nullptr) ext2fs_free(*fs);
    }
  } closer{&fs};
  blocks = ext2fs_blocks_count(fs->super);
  if (fs->desc_blocks + 1 + fs->super->s_first_data_block > front) {
    return Fail(MakeError(ErrorKind::kLimitExceeded,
                          "ext4: an image of {} bytes needs more group descriptors than its "
                          "front has room for",
                          blocks * bs));
  }
  if (blocks < wanted) {
    return Fail(MakeError(ErrorKind::kInternal, "ext4: {} blocks made, {} needed", blocks, wanted));
  }
  plan.size_bytes = blocks * bs;
  plan.inode_count = fs->super->s_inodes_count;
  // The file is the filesystem, nothing before or after it; what no one
  // writes reads as zeros (a hole), which libext2fs may read back.
  if (::ftruncate(image_fd, static_cast<off_t>(plan.size_bytes)) != 0) {
    return Fail(OsError(errno, "ext4: size the image"));
  }

  // Identity: UUID, hash seed, label, checksum seed; the times.
  std::optional<int64_t> epoch;
  if (options.reproducible) {
    epoch = options.source_date_epoch;
    if (!epoch) {
      int64_t newest = 0;
      for (const auto& [path, inode] : tree.entries()) {
        newest = std::max<int64_t>(newest, inode->meta.mtime_ns / 1'000'000'000);
      }
      epoch = newest;
    }
  }
  uint8_t uuid[16];
  if (options.uuid) {
    (void)ParseUuid(*options.uuid, uuid);
  } else if (options.reproducible) {
    DerivedUuid(options.seed, uuid);
  } else {
    LX_TRY(sandbox::GetRandom(std::as_writable_bytes(std::span(uuid))));
    uuid[6] = static_cast<uint8_t>((uuid[6] & 0x0f) | 0x40);
    uuid[8] = static_cast<uint8_t>((uuid[8] & 0x3f) | 0x80);
  }
  std::memcpy(fs->super->s_uuid, uuid, sizeof(uuid));
  if (options.reproducible) {
    std::memcpy(fs->super->s_hash_seed, uuid, sizeof(uuid));
  } else {
    LX_TRY(sandbox::GetRandom(std::as_writable_bytes(std::span(fs->super->s_hash_seed))));
  }
  fs->super->s_def_hash_version = EXT2_HASH_HALF_MD4;
  fs->super->s_checksum_type = EXT2_CRC32C_CHKSUM;
  fs->super->s_max_mnt_count = static_cast<int16_t>(-1);
  std::memset(fs->super->s_volume_name, 0, sizeof(fs->super->s_volume_name));
  std::memcpy(fs->super->s_volume_name, options.label.data(), options.label.size());
  ext2fs_init_csum_seed(fs);
  const int64_t now = epoch ? *epoch : static_cast<int64_t>(::time(nullptr));
  fs->now = static_cast<time_t>(std::max<int64_t>(now, 1));
  fs->super->s_mkfs_time = fs->super->s_lastcheck = fs->super->s_wtime = static_cast<uint32_t>(now);
  fs->super->s_mkfs_time_hi = fs->super->s_lastcheck_hi = fs->super->s_wtime_hi = 0;

  // The live data first, so the tables and everything else go around it.
  for (size_t i = 0; i < placed.size();) {
    uint64_t run_start = placed[i].physical, run_end = run_start + placed[i].length;
    for (++i; i < placed.size() && placed[i].physical == run_end; ++i) run_end += placed[i].length;
    if (run_end > blocks) {
      return Fail(MakeError(ErrorKind::kInternal, "ext4: data past the end of the image"));
    }
    ext2fs_block_alloc_stats_range(fs, run_start, static_cast<unsigned>(run_end - run_start), +1);
  }
  errcode_t rc = ext2fs_allocate_tables(fs);
  if (rc) return Fail(Ext2Error(rc, "ext4: allocate group tables"));
  // Every block no one wrote reads as zeros (a fresh file, or punched): the
  // inode tables need no zeroing.
  for (dgrp_t g = 0; g < fs->group_desc_count; ++g) {
    ext2fs_bg_flags_set(fs, g, EXT2_BG_INODE_ZEROED);
  }

  Builder builder(fs, layout, control, now);
  LX_TRY(builder.ReserveInodes());
  // The journal first, right after the data, so that it is one run: the
  // journal planned for (libext2fs would size it from the final block count,
  // which may cross one of its steps). Lazily: its blocks read as zeros.
  struct ext2fs_journal_params journal_params = {};
  journal_params.num_journal_blocks = static_cast<blk_t>(journal_blocks);
  if (journal_blocks > 0) {
    rc = ext2fs_add_journal_inode3(fs, &journal_params, data_end_block,
                                   EXT2_MKJOURNAL_LAZYINIT | EXT2_MKJOURNAL_NO_MNT_CHECK);
    if (rc) return Fail(Ext2Error(rc, "ext4: journal"));
  }
  LX_TRY(builder.WriteAll(data_end_block));
  if (epoch) {
    fs->super->s_mkfs_time = fs->super->s_lastcheck = fs->super->s_wtime =
        static_cast<uint32_t>(*epoch);
  }
  rc = ext2fs_set_gdt_csum(fs);
  if (rc) return Fail(Ext2Error(rc, "ext4: group descriptors"));
  ext2fs_mark_super_dirty(fs);
  ext2fs_mark_bb_dirty(fs);
  ext2fs_mark_ib_dirty(fs);
  rc = ext2fs_close_free(&fs);
  if (rc) return Fail(Ext2Error(rc, "ext4: write image"));
  return {};
}

}  // namespace

Status CheckExt4Options(const Ext4Options& options) {
  const uint32_t bs = options.block_size;
  if (bs != 1024 && bs != 2048 && bs != 4096) {
    return Fail(MakeError(ErrorKind::kPolicy, "ext4 block size {} (1024, 2048 or 4096)", bs));
  }
  if (options.label.size() > 16) {
    return Fail(MakeError(ErrorKind::kPolicy, "ext4 label {:?}: over 16 bytes", options.label));
  }
  uint8_t uuid[16];
  if (options.uuid && !ParseUuid(*options.uuid, uuid)) {
    return Fail(MakeError(ErrorKind::kPolicy, "ext4 uuid {:?}: not a UUID", *options.uuid));
  }
  if (options.inode_ratio && (*options.inode_ratio < 1024 || *options.inode_ratio > 67108864)) {
    return Fail(MakeError(ErrorKind::kPolicy, "ext4 inode ratio {} (1024 to 67108864)",
                          *options.inode_ratio));
  }
  return {};
}

uint64_t Ext4DataStart(const Ext4Options& options, uint64_t max_data_bytes) {
  const uint32_t bs = options.block_size;
  return FrontBlocks(bs, MaxImageBytes(options, max_data_bytes)) * bs;
}

Result<Ext4Report> BuildExt4(int image_fd, const ImageTree& tree, uint64_t data_start,
                             const Ext4Options& options, const BuildControl& control) {
  static std::once_flag messages;  // error_message() names libext2fs's codes once this ran
  std::call_once(messages, [] { initialize_ext2_error_table(); });
  auto log = Logger("ext4");
  int64_t start = sandbox::MonotonicNs();
  LX_TRY(CheckExt4Options(options));
  const uint64_t bs = options.block_size;
  Ext4Report report;
  Ext4Plan& plan = report.plan;

  Layout layout;
  LX_TRY(layout.Collect(tree, options.block_size));
  plan.inodes = layout.nodes().size();
  for (const Node& n : layout.nodes()) {
    if (n.kind() == Kind::kFile) plan.content_bytes += n.meta->data_bytes;
  }

  // Every live run of data, by where it stands: two files on one block is a
  // lie of the records (the extractor wrote each block once).
  std::vector<Placed> placed;
  for (uint32_t i = 0; i < layout.nodes().size(); ++i) {
    const Node& n = layout.nodes()[i];
    if (n.kind() != Kind::kFile) continue;
    for (uint32_t r = 0; r < n.runs.size(); ++r) {
      placed.push_back({n.runs[r].physical, n.runs[r].length, i, r});
    }
  }
  std::sort(placed.begin(), placed.end(),
            [](const Placed& a, const Placed& b) { return a.physical < b.physical; });
  for (size_t i = 1; i < placed.size(); ++i) {
    if (placed[i].physical < placed[i - 1].physical + placed[i - 1].length) {
      return Fail(MakeError(ErrorKind::kPeer, "bad record: data of {:?} overlaps {:?}",
                            layout.nodes()[placed[i].node].path,
                            layout.nodes()[placed[i - 1].node].path));
    }
  }

  uint64_t moved = 0;
  LX_TRY(Compact(image_fd, layout, placed, data_start / bs, bs, &moved));
  if (moved > 0) log->debug("compacted: {} blocks moved into dead data's room", moved);
  Sizing sizing = Measure(layout, bs, data_start);

  // The size: the data where it stands, the metadata, the inode tables, the
  // bitmaps and a journal, and no more: like tar2ext4's, the image is as small
  // as its content allows (a container's root is mounted read-only or under
  // an overlay); --size makes room. Inodes: the tree's and 16 spare.
  const uint64_t needed_inodes = sizing.inodes + EXT2_GOOD_OLD_FIRST_INO;
  const uint64_t front = data_start / bs;
  const uint64_t blocks_per_group = 8 * bs;
  auto journal_for = [](uint64_t fs_blocks) -> uint64_t {
    int j = ext2fs_default_journal_size(fs_blocks);
    return j > 0 ? static_cast<uint64_t>(j) : 0;
  };
  // Blocks for `inodes` and everything else, as ext2fs_initialize lays them
  // out (inode tables rounded up per group); the group count follows the
  // total, so go round until it settles.
  auto size_for = [&](uint64_t inodes, uint64_t* journal) {
    uint64_t total =
        std::max(sizing.data_end_block, front + sizing.data_blocks) + sizing.meta_blocks;
    uint64_t groups = 1, blocks = total;
    for (int i = 0; i < 4; ++i) {
      groups = std::max<uint64_t>(1, DivUp(blocks, blocks_per_group));
      uint64_t per_group = RoundUp(DivUp(inodes, groups), 8);
      uint64_t itable = groups * DivUp(per_group * kInodeSize, bs);
      blocks = total + itable + 2 * groups;
      // What the group descriptors leave of their reserve in front of the
      // data (counted in the data's end) takes the bitmaps, then single
      // blocks (Builder::Allocate).
      uint64_t front_used = (bs == 1024 ? 1 : 0) + 1 + DivUp(groups * kDescSize, bs);
      uint64_t room = front > front_used ? front - front_used : 0;
      uint64_t bitmaps_in_front = std::min(room, 2 * groups);
      blocks -= bitmaps_in_front + std::min(room - bitmaps_in_front, sizing.single_blocks);
      *journal = journal_for(blocks);
      blocks += *journal;
    }
    return blocks;
  };
  uint64_t inode_count = needed_inodes + 16;
  uint64_t journal_blocks = 0;
  // At least 1 MiB: below that libext2fs finds no room for a group's tables.
  uint64_t need = std::max<uint64_t>(size_for(inode_count, &journal_blocks), (1u << 20) / bs);
  if (options.inode_ratio) {
    // The ratio decides the inode count from the size, and the inode tables
    // grow the size: solve for both.
    for (int i = 0; i < 8; ++i) {
      inode_count = std::max(needed_inodes, need * bs / *options.inode_ratio);
      need = std::max<uint64_t>(size_for(inode_count, &journal_blocks), (1u << 20) / bs);
    }
  }
  log->debug("plan: data_end={} data={} meta={} singles={} inodes={} journal={} blocks={}",
             sizing.data_end_block, sizing.data_blocks, sizing.meta_blocks, sizing.single_blocks,
             inode_count, journal_blocks, need);
  uint64_t blocks = need;
  if (options.size_bytes) {
    uint64_t given = *options.size_bytes / bs;
    if (given < need) {
      return Fail(MakeError(ErrorKind::kPolicy,
                            "ext4 size {} bytes is too small: the content needs at least {} bytes",
                            *options.size_bytes, need * bs));
    }
    // The journal mke2fs would give this size, where it fits.
    if (given - need + journal_blocks >= journal_for(given)) journal_blocks = journal_for(given);
    blocks = given;
    if (options.inode_ratio)
      inode_count = std::max(inode_count, blocks * bs / *options.inode_ratio);
  }
  if (inode_count > UINT32_MAX - 1024) {
    return Fail(
        MakeError(ErrorKind::kPolicy, "ext4: {} inodes, more than ext4 holds", inode_count));
  }

  // The blocks no live file holds get punched out: data of removed and
  // replaced files, whatever an extractor wrote beyond what its records name,
  // and (on a second attempt) the first one's metadata.
  LX_ASSIGN_OR_RETURN(struct stat st, sandbox::Fstat(image_fd));
  uint64_t file_end = RoundUp(static_cast<uint64_t>(st.st_size), bs);
  auto punch_all_but_data = [&](uint64_t from, bool count) -> Status {
    uint64_t cursor = from;
    auto punch_to = [&](uint64_t end) -> Status {
      if (end <= cursor) return {};
      if (count) plan.dead_bytes += end - cursor;
      return sandbox::PunchHole(image_fd, cursor, end - cursor);
    };
    for (const Placed& p : placed) {
      LX_TRY(punch_to(p.physical * bs));
      cursor = std::max(cursor, (p.physical + p.length) * bs);
    }
    return punch_to(file_end);
  };
  LX_TRY(punch_all_but_data(data_start, true));
  // The front too: only the broker writes there (below, last), but a first
  // layer could reach it (JailData::copy_input). Every block no one wrote
  // reads as zeros: the inode tables are taken as zeroed.
  if (data_start > 0) LX_TRY(sandbox::PunchHole(image_fd, 0, data_start));

  // Sizing counts every block; should libext2fs still want one more (its
  // extent or xattr blocks are estimated from above), one more attempt with
  // room to spare, after its metadata is punched out again.
  for (int attempt = 0;; ++attempt) {
    Status built = BuildOnce(image_fd, tree, layout, placed, options, control, blocks, inode_count,
                             journal_blocks, data_start, sizing.data_end_block, plan);
    if (built) break;
    if (attempt > 0 || options.size_bytes || built.error().kind() != ErrorKind::kOs ||
        built.error().err() != ENOSPC) {
      return Fail(std::move(built).error());
    }
    log->debug("ext4: {} blocks were too few; again with more", blocks);
    blocks += blocks / 64 + 64;
    file_end = std::max(file_end, plan.size_bytes);
    LX_TRY(punch_all_but_data(0, false));
  }
  report.build_ns = sandbox::MonotonicNs() - start;
  log->info("built: size={} inodes={} content={} dead={} ms={:.1f}", plan.size_bytes, plan.inodes,
            plan.content_bytes, plan.dead_bytes, report.build_ns / 1e6);
  return report;
}

}  // namespace layerx::broker
