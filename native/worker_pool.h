// A fixed set of threads that run one job together, reused from step to step
// so that the hot path neither creates threads nor allocates.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

namespace pymoi {

class WorkerPool {
  public:
    using Job = void (*)(void * context, int worker);

    // n_workers >= 1 counts the calling thread: n_workers - 1 threads are started.
    explicit WorkerPool(int n_workers);
    ~WorkerPool();
    WorkerPool(const WorkerPool &)             = delete;
    WorkerPool & operator=(const WorkerPool &) = delete;

    int size() const { return static_cast<int>(threads_.size()) + 1; }

    // Calls job(context, w) for every worker w in [0, size()), w = 0 on the
    // calling thread, and returns when all calls have returned. `job` must not throw.
    void run(Job job, void * context);

  private:
    void loop(int worker);

    std::vector<std::thread> threads_;
    std::mutex               mutex_;
    std::condition_variable  wake_;
    std::condition_variable  done_;
    uint64_t                 generation_ = 0;
    int                      busy_       = 0;
    bool                     stop_       = false;
    Job                      job_        = nullptr;
    void *                   context_    = nullptr;
};

}  // namespace pymoi
