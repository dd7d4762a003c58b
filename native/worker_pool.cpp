#include "worker_pool.h"

namespace pymoi {

WorkerPool::WorkerPool(int n_workers) {
    for (int w = 1; w < n_workers; ++w) {
        threads_.emplace_back([this, w] { loop(w); });
    }
}

WorkerPool::~WorkerPool() {
    {
        std::lock_guard<std::mutex> lock(mutex_);
        stop_ = true;
    }
    wake_.notify_all();
    for (std::thread & thread : threads_) {
        thread.join();
    }
}

void WorkerPool::run(Job job, void * context) {
    {
        std::lock_guard<std::mutex> lock(mutex_);
        job_     = job;
        context_ = context;
        busy_    = static_cast<int>(threads_.size());
        ++generation_;
    }
    wake_.notify_all();
    job(context, 0);
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [this] { return busy_ == 0; });
}

void WorkerPool::loop(int worker) {
    uint64_t seen = 0;
    for (;;) {
        Job    job     = nullptr;
        void * context = nullptr;
        {
            std::unique_lock<std::mutex> lock(mutex_);
            wake_.wait(lock, [&] { return stop_ || generation_ != seen; });
            if (stop_) return;
            seen    = generation_;
            job     = job_;
            context = context_;
        }
        job(context, worker);
        {
            std::lock_guard<std::mutex> lock(mutex_);
            --busy_;
        }
        done_.notify_one();
    }
}

}  // namespace pymoi
