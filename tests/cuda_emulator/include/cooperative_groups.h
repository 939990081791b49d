// Emulator stand-in for cooperative_groups.h: thread-block clusters only.
#pragma once
#include <cstddef>

#include "../emu_runtime.h"

namespace cooperative_groups {

class cluster_group {
 public:
  void sync() const { ::emu::cluster_sync(); }
  unsigned block_rank() const { return ::emu::cluster_rank(); }
  unsigned num_blocks() const { return ::emu::cluster_size(); }
  // The same offset in another block's dynamic shared memory.
  template <typename T>
  T* map_shared_rank(T* addr, unsigned rank) const {
    unsigned char* mine = ::emu::dynamic_smem();
    const std::ptrdiff_t offset = reinterpret_cast<unsigned char*>(addr) - mine;
    return reinterpret_cast<T*>(::emu::cluster_smem(rank) + offset);
  }
};

inline cluster_group this_cluster() { return cluster_group(); }

}  // namespace cooperative_groups
