// The real kernel sources, compiled as host C++ under the emulation of emulation.h.
//
// Execution: one OS thread. A launch runs its blocks one after another; the threads of a block
// are ucontext fibers scheduled round-robin. A fiber runs until it reaches a barrier
// (__syncthreads: all threads of the block; __shfl_xor_sync: the 32 lanes of its warp) and
// yields; when every participant has arrived, all of them become runnable again. If no fiber
// can run while some have not finished, the block is stuck on a barrier that not all threads
// reach (divergent __syncthreads), which the emulation reports as an error instead of hanging.
#include "emulation.h"

#include <ucontext.h>

#include <cstdio>
#include <cstdlib>
#include <memory>
#include <vector>

#include "cuda/kernels/multi_matrix_apply.cuh"

namespace muon_emu {

thread_local Index3 tls_thread_idx{0, 0, 0};
thread_local Index3 tls_block_idx{0, 0, 0};

namespace {

constexpr int kWarp = 32;
constexpr size_t kFiberStack = 256 * 1024;

enum class State { kRunnable, kWaiting, kDone };

struct Fiber {
  ucontext_t context;
  std::unique_ptr<char[]> stack;
  State state = State::kRunnable;
  int barrier = -1;  // which barrier it waits on: 0 = block, 1 + w = warp w
};

struct Scheduler {
  ucontext_t main;
  std::vector<Fiber> fibers;
  std::vector<int> arrived;  // per barrier
  std::vector<int> expected;
  int current = -1;
  const std::function<void()>* body = nullptr;
  std::vector<float> lanes;
};

Scheduler* g_sched = nullptr;

void fiber_entry() {
  (*g_sched->body)();
  g_sched->fibers[static_cast<size_t>(g_sched->current)].state = State::kDone;
  // returning resumes uc_link (the scheduler)
}

void wait_on(int barrier) {
  Scheduler& s = *g_sched;
  Fiber& me = s.fibers[static_cast<size_t>(s.current)];
  const size_t b = static_cast<size_t>(barrier);
  if (++s.arrived[b] == s.expected[b]) {
    // Last to arrive: release everybody waiting on this barrier and keep running.
    s.arrived[b] = 0;
    for (Fiber& f : s.fibers) {
      if (f.state == State::kWaiting && f.barrier == barrier) {
        f.state = State::kRunnable;
        f.barrier = -1;
      }
    }
    return;
  }
  me.state = State::kWaiting;
  me.barrier = barrier;
  swapcontext(&me.context, &s.main);
}

void run_block(Scheduler& s, int threads) {
  for (int t = 0; t < threads; ++t) {
    Fiber& f = s.fibers[static_cast<size_t>(t)];
    f.state = State::kRunnable;
    f.barrier = -1;
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack.get();
    f.context.uc_stack.ss_size = kFiberStack;
    f.context.uc_link = &s.main;
    makecontext(&f.context, fiber_entry, 0);
  }
  std::fill(s.arrived.begin(), s.arrived.end(), 0);
  int done = 0;
  while (done < threads) {
    bool progressed = false;
    for (int t = 0; t < threads; ++t) {
      Fiber& f = s.fibers[static_cast<size_t>(t)];
      if (f.state != State::kRunnable) continue;
      s.current = t;
      tls_thread_idx = Index3{static_cast<unsigned int>(t), 0, 0};
      swapcontext(&s.main, &f.context);
      progressed = true;
      if (f.state == State::kDone) ++done;
    }
    if (!progressed) {
      std::fprintf(stderr,
                   "host emulation: block %u deadlocked: a barrier (__syncthreads or a warp "
                   "shuffle) is not reached by all threads\n",
                   tls_block_idx.x);
      std::abort();
    }
  }
}

}  // namespace

void sync_block() { wait_on(0); }

float shfl_xor(float v, int lane_mask) {
  Scheduler& s = *g_sched;
  const unsigned int t = tls_thread_idx.x;
  const unsigned int warp = t / kWarp;
  const unsigned int lane = t % kWarp;
  s.lanes[t] = v;
  wait_on(1 + static_cast<int>(warp));  // all lanes have published
  const float other = s.lanes[warp * kWarp + (lane ^ static_cast<unsigned int>(lane_mask))];
  wait_on(1 + static_cast<int>(warp));  // all lanes have read before the next publish
  return other;
}

void run_grid(int64_t blocks, int threads, const std::function<void()>& body) {
  Scheduler s;
  s.body = &body;
  s.fibers.resize(static_cast<size_t>(threads));
  for (Fiber& f : s.fibers) f.stack.reset(new char[kFiberStack]);
  const int warps = (threads + kWarp - 1) / kWarp;
  s.expected.assign(static_cast<size_t>(1 + warps), kWarp);
  s.expected[0] = threads;
  s.arrived.assign(s.expected.size(), 0);
  s.lanes.assign(static_cast<size_t>(threads), 0.f);
  Scheduler* previous = g_sched;
  g_sched = &s;
  for (int64_t b = 0; b < blocks; ++b) {
    tls_block_idx = Index3{static_cast<unsigned int>(b), 0, 0};
    run_block(s, threads);
  }
  g_sched = previous;
}

}  // namespace muon_emu

namespace muon_ext {
namespace cuda {
namespace detail {

template <typename... Params, typename... Args>
inline void launch_kernel(void (*kernel)(Params...), int64_t blocks, cudaStream_t /*stream*/,
                          const Args&... args) {
  ::muon_emu::run_grid(blocks, kBlockSize, [&] { kernel(args...); });
}

}  // namespace detail
}  // namespace cuda
}  // namespace muon_ext

#include "cuda/kernels/elementwise.cu"
#include "cuda/kernels/newton_schulz.cu"
#include "cuda/kernels/step_plan.cu"
