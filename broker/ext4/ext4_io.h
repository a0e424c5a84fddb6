// The I/O under the ext4 build: a libext2fs io_manager on an open fd whose
// metadata writes collect in memory and go out sorted and coalesced at flush,
// with no fsync. libext2fs's own unix_io fsyncs the whole file when it opens
// it and at close; here the file already holds every byte of the layers'
// data, dirty in the page cache, so that fsync alone cost more than the build
// (100-190 ms for the Debian corpus image). Like tar, umoci and tar2ext4,
// layerx leaves writeback to the kernel; callers who need the image on disk
// before their next step sync it themselves.
#pragma once

#include <ext2fs/ext2fs.h>

namespace layerx::broker {

// The "name" given to ext2fs_initialize/ext2fs_open2 with this manager is the
// decimal number of an fd the channel takes over (and closes).
io_manager MemoryCachedFdIoManager();

}  // namespace layerx::broker
