// A byte buffer that is read into: unlike std::vector's, its bytes are not
// zeroed when it is made. Zeroing touches every page of it, and on a fresh
// process (each jail is one) every page touched is a page fault, paid again
// for each layer; a read touches only the pages it fills.
#pragma once

#include <cstddef>
#include <memory>

namespace layerx::sandbox {

class ReadBuffer {
 public:
  ReadBuffer() = default;
  explicit ReadBuffer(size_t size)
      : data_(std::make_unique_for_overwrite<std::byte[]>(size)), size_(size) {}

  std::byte* data() { return data_.get(); }
  const std::byte* data() const { return data_.get(); }
  size_t size() const { return size_; }
  std::byte* begin() { return data(); }
  std::byte* end() { return data() + size_; }
  std::byte& operator[](size_t i) { return data_[i]; }

 private:
  std::unique_ptr<std::byte[]> data_;
  size_t size_ = 0;
};

}  // namespace layerx::sandbox
