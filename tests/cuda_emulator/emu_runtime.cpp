// Fiber scheduler of the CUDA emulator (see emu_runtime.h).
#include "emu_runtime.h"

#include <ucontext.h>

#include <cstdio>
#include <cstdlib>
#include <algorithm>
#include <cstring>
#include <deque>
#include <memory>
#include <random>
#include <vector>

namespace emu {

namespace {

enum class State { kRunnable, kWaitBlock, kWaitWarp, kWaitCluster, kDone };

constexpr size_t kStackBytes = 128 * 1024;

struct BlockState {
  std::vector<unsigned char> smem;
  int alive = 0;
  int arrived = 0;
};

struct WarpState {
  int alive = 0;
  int arrived[2] = {0, 0};
  uint64_t slots[2][32] = {};
};

}  // namespace

struct Fiber {
  ucontext_t ctx;
  std::unique_ptr<char[]> stack;
  dim3 thread;
  dim3 block;
  int block_slot = 0;  // block within the running cluster
  int warp_slot = 0;   // warp within the running cluster
  uint64_t warp_ops = 0;
  State state = State::kRunnable;
};

namespace {

struct Launch {
  dim3 grid, block;
  size_t smem = 0;
  unsigned cluster = 1;
  const std::function<void()>* body = nullptr;
  std::vector<std::unique_ptr<Fiber>> fibers;
  std::vector<BlockState> blocks;
  std::vector<WarpState> warps;
  int cluster_alive = 0;
  int cluster_arrived = 0;
  std::deque<size_t> runnable;  // fibers ready to resume
  Fiber* cur = nullptr;
  ucontext_t scheduler;
};

enum class Schedule { kForward, kLifo, kRandom };

Schedule schedule_from_env() {
  const char* s = std::getenv("EMU_SCHEDULE");
  if (s == nullptr) return Schedule::kForward;
  if (std::strcmp(s, "lifo") == 0) return Schedule::kLifo;
  if (std::strcmp(s, "random") == 0) return Schedule::kRandom;
  return Schedule::kForward;
}

Launch* g_launch = nullptr;
Schedule g_schedule = schedule_from_env();
std::mt19937 g_rng(12345);
cudaError_t g_last_error = cudaSuccess;
DeviceProps g_props;

void yield_to_scheduler() {
  Fiber* f = g_launch->cur;
  swapcontext(&f->ctx, &g_launch->scheduler);
}

void make_runnable(size_t i) {
  g_launch->fibers[i]->state = State::kRunnable;
  g_launch->runnable.push_back(i);
}

void release_block(int slot) {
  for (size_t i = 0; i < g_launch->fibers.size(); ++i) {
    const Fiber& f = *g_launch->fibers[i];
    if (f.block_slot == slot && f.state == State::kWaitBlock) make_runnable(i);
  }
  g_launch->blocks[slot].arrived = 0;
}

void release_warp(int slot, int gen) {
  for (size_t i = 0; i < g_launch->fibers.size(); ++i) {
    const Fiber& f = *g_launch->fibers[i];
    if (f.warp_slot == slot && f.state == State::kWaitWarp && int(f.warp_ops & 1) == gen) {
      make_runnable(i);
    }
  }
  g_launch->warps[slot].arrived[gen] = 0;
}

void release_cluster() {
  for (size_t i = 0; i < g_launch->fibers.size(); ++i) {
    if (g_launch->fibers[i]->state == State::kWaitCluster) make_runnable(i);
  }
  g_launch->cluster_arrived = 0;
}

void fiber_main() {
  (*g_launch->body)();
  Fiber* f = g_launch->cur;
  f->state = State::kDone;
  // Exited threads no longer hold up the barriers they would have joined.
  BlockState& b = g_launch->blocks[f->block_slot];
  --b.alive;
  if (b.arrived > 0 && b.arrived == b.alive) release_block(f->block_slot);
  WarpState& w = g_launch->warps[f->warp_slot];
  --w.alive;
  for (int gen = 0; gen < 2; ++gen) {
    if (w.arrived[gen] > 0 && w.arrived[gen] == w.alive) release_warp(f->warp_slot, gen);
  }
  --g_launch->cluster_alive;
  if (g_launch->cluster_arrived > 0 && g_launch->cluster_arrived == g_launch->cluster_alive) {
    release_cluster();
  }
  // Returning resumes uc_link (the scheduler).
}

// A fiber that starts in fiber_main and returns to `scheduler` (kept out of run(): the
// context calls must not share a frame with run()'s loop variables).
__attribute__((noinline)) std::unique_ptr<Fiber> make_fiber(dim3 thread, dim3 block, int block_slot,
                                                            int warp_slot, ucontext_t* scheduler) {
  auto f = std::make_unique<Fiber>();
  f->thread = thread;
  f->block = block;
  f->block_slot = block_slot;
  f->warp_slot = warp_slot;
  f->stack.reset(new char[kStackBytes]);
  getcontext(&f->ctx);
  f->ctx.uc_stack.ss_sp = f->stack.get();
  f->ctx.uc_stack.ss_size = kStackBytes;
  f->ctx.uc_link = scheduler;
  makecontext(&f->ctx, fiber_main, 0);
  return f;
}

}  // namespace

DeviceProps& device_props() { return g_props; }

unsigned char* dynamic_smem() { return g_launch->blocks[g_launch->cur->block_slot].smem.data(); }

unsigned cluster_rank() { return unsigned(g_launch->cur->block_slot); }
unsigned cluster_size() { return g_launch->cluster; }
unsigned char* cluster_smem(unsigned rank) { return g_launch->blocks.at(rank).smem.data(); }

void syncthreads() {
  Fiber* f = g_launch->cur;
  BlockState& b = g_launch->blocks[f->block_slot];
  ++b.arrived;
  if (b.arrived == b.alive) {
    release_block(f->block_slot);
    return;
  }
  f->state = State::kWaitBlock;
  yield_to_scheduler();
}

void cluster_sync() {
  Fiber* f = g_launch->cur;
  ++g_launch->cluster_arrived;
  if (g_launch->cluster_arrived == g_launch->cluster_alive) {
    release_cluster();
    return;
  }
  f->state = State::kWaitCluster;
  yield_to_scheduler();
}

const uint64_t* warp_exchange(uint64_t value) {
  Fiber* f = g_launch->cur;
  WarpState& w = g_launch->warps[f->warp_slot];
  const int gen = int(f->warp_ops & 1);
  const unsigned lane = f->thread.x & 31u;
  w.slots[gen][lane] = value;
  ++w.arrived[gen];
  if (w.arrived[gen] == w.alive) {
    release_warp(f->warp_slot, gen);
  } else {
    f->state = State::kWaitWarp;
    yield_to_scheduler();
  }
  ++f->warp_ops;
  return w.slots[gen];
}

cudaError_t run(dim3 grid, dim3 block, size_t smem, unsigned cluster_x,
                const std::function<void()>& body) {
  if (block.y != 1 || block.z != 1 || block.x == 0 || block.x % 32 != 0 || block.x > 1024) {
    std::fprintf(stderr, "emu: unsupported block shape %u x %u x %u\n", block.x, block.y, block.z);
    return cudaErrorInvalidConfiguration;
  }
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || cluster_x == 0 || grid.x % cluster_x != 0) {
    std::fprintf(stderr, "emu: bad grid %u x %u x %u (cluster %u)\n", grid.x, grid.y, grid.z,
                 cluster_x);
    return cudaErrorInvalidConfiguration;
  }
  if (smem > size_t(g_props.max_smem_optin)) return cudaErrorInvalidValue;
  if (g_props.major < 9 && cluster_x > 1) return cudaErrorInvalidConfiguration;
  const int threads = int(block.x);
  const int warps_per_block = threads / 32;
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x0 = 0; x0 < grid.x; x0 += cluster_x) {
        Launch launch;
        launch.grid = grid;
        launch.block = block;
        launch.smem = smem;
        launch.cluster = cluster_x;
        launch.body = &body;
        launch.blocks.resize(cluster_x);
        launch.warps.resize(size_t(cluster_x) * warps_per_block);
        for (unsigned c = 0; c < cluster_x; ++c) {
          // Poison shared memory: kernels must not rely on it being zero.
          launch.blocks[c].smem.assign(smem, 0xA5);
          launch.blocks[c].alive = threads;
        }
        for (auto& w : launch.warps) w.alive = 32;
        launch.cluster_alive = threads * int(cluster_x);
        for (unsigned c = 0; c < cluster_x; ++c) {
          for (int t = 0; t < threads; ++t) {
            launch.fibers.push_back(make_fiber(dim3(unsigned(t), 0, 0), dim3(x0 + c, y, z),
                                               int(c), int(c) * warps_per_block + t / 32,
                                               &launch.scheduler));
          }
        }
        Launch* saved = g_launch;
        g_launch = &launch;
        for (size_t i = 0; i < launch.fibers.size(); ++i) launch.runnable.push_back(i);
        size_t done = 0;
        while (!launch.runnable.empty()) {
          // Which ready thread resumes next (EMU_SCHEDULE): forward = first
          // ready first, lifo = the most recently released first (a thread may
          // run far ahead of the others), random = any. A missing barrier shows
          // up as a wrong result under some order.
          size_t i;
          if (g_schedule == Schedule::kForward) {
            i = launch.runnable.front();
            launch.runnable.pop_front();
          } else {
            size_t pick = launch.runnable.size() - 1;
            if (g_schedule == Schedule::kRandom) {
              pick = std::uniform_int_distribution<size_t>(0, launch.runnable.size() - 1)(g_rng);
            }
            i = launch.runnable[pick];
            launch.runnable[pick] = launch.runnable.back();
            launch.runnable.pop_back();
          }
          Fiber* f = launch.fibers[i].get();
          if (f->state != State::kRunnable) continue;
          launch.cur = f;
          threadIdx = f->thread;
          blockIdx = f->block;
          blockDim = launch.block;
          gridDim = launch.grid;
          swapcontext(&launch.scheduler, &f->ctx);
          if (f->state == State::kDone) ++done;
          else if (f->state == State::kRunnable) launch.runnable.push_back(i);
        }
        if (done < launch.fibers.size()) {
          std::fprintf(stderr,
                       "emu: deadlock in blocks (%u..%u, %u, %u): threads wait at barriers that "
                       "cannot complete\n",
                       x0, x0 + cluster_x - 1, y, z);
          for (auto& f : launch.fibers) {
            if (f->state != State::kDone) {
              std::fprintf(stderr, "  e.g. block %u thread %u state %d warp_ops %llu\n",
                           f->block.x, f->thread.x, int(f->state),
                           (unsigned long long)f->warp_ops);
              break;
            }
          }
          g_launch = saved;
          std::abort();
        }
        g_launch = saved;
      }
    }
  }
  return cudaSuccess;
}

}  // namespace emu

dim3 threadIdx;
dim3 blockIdx;
dim3 blockDim;
dim3 gridDim;

cudaError_t cudaGetLastError() {
  const cudaError_t e = emu::g_last_error;
  emu::g_last_error = cudaSuccess;
  return e;
}

void emu_set_last_error(cudaError_t e) {
  if (e != cudaSuccess) emu::g_last_error = e;
}
