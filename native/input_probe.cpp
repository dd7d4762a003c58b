#include "input_probe.h"

#include <sys/stat.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>
#include <map>
#include <mutex>
#include <vector>

#include "embedding_batch.h"
#include "mixture_input.h"

namespace pymoi {

namespace {

// Every input row reaches the logits of the last position (through attention or
// the recurrent state), so those alone are compared: the probe then costs about
// two or three single-token decodes.
constexpr int32_t kProbeTokens = 4;

// Off the CPU the two paths may round differently (other kernels for the first
// op, reduced precision); a wrong input (a missing sqrt(n_embd), wrong positions)
// moves the logits by far more than this fraction of their range.
constexpr float kBackendTolerance = 1e-3f;

std::string file_key(const std::string & path) {
    struct stat st = {};
    if (stat(path.c_str(), &st) != 0) return path;
    return path + '\n' + std::to_string(static_cast<long long>(st.st_size)) + '\n' +
           std::to_string(static_cast<long long>(st.st_mtime));
}

std::mutex                          g_cache_mutex;
std::map<std::string, ProbeVerdict> g_cache;

struct ContextGuard {
    llama_context * ctx;
    ~ContextGuard() {
        if (ctx) llama_free(ctx);
    }
};

struct TokenBatchGuard {
    llama_batch batch;
    ~TokenBatchGuard() { llama_batch_free(batch); }
};

// The logits of the last position after decoding `batch` (logits on its last
// row only) from an empty memory, or an empty vector when llama_decode fails (its
// status in `*ret`).
std::vector<float> decode_last(llama_context * ctx, const llama_batch & batch, int32_t n_vocab, int32_t * ret) {
    llama_memory_clear(llama_get_memory(ctx), true);
    *ret = llama_decode(ctx, batch);
    if (*ret != 0) return {};
    const float * row = llama_get_logits_ith(ctx, -1);
    if (row == nullptr) return {};
    return std::vector<float>(row, row + n_vocab);
}

// Largest |a - b| (infinity where exactly one is NaN or they differ in infinity).
float max_difference(const std::vector<float> & a, const std::vector<float> & b, float * max_abs) {
    float diff = 0.0f;
    *max_abs   = 0.0f;
    for (size_t i = 0; i < a.size(); ++i) {
        if (std::isfinite(a[i])) *max_abs = std::max(*max_abs, std::fabs(a[i]));
        if (std::memcmp(&a[i], &b[i], sizeof(float)) == 0) continue;
        const float d = std::fabs(a[i] - b[i]);
        diff          = std::max(diff, std::isnan(d) ? INFINITY : d);
        if (diff == 0.0f) diff = std::numeric_limits<float>::min();  // +0 vs -0: not bitwise equal
    }
    return diff;
}

ProbeVerdict run_probe(const llama_model * model, const MixtureInput & input, ProbeThreads threads) {
    ProbeVerdict verdict;
    verdict.exact = !llama_supports_gpu_offload();

    llama_context_params params = llama_context_default_params();
    params.n_ctx                = 256;
    params.n_batch              = kProbeTokens;
    params.n_ubatch             = kProbeTokens;
    params.n_seq_max            = 1;
    params.n_threads            = std::max(1, threads.n_threads);
    params.n_threads_batch      = std::max(1, threads.n_threads_batch);
    params.no_perf              = true;
    ContextGuard guard { llama_init_from_model(const_cast<llama_model *>(model), params) };
    if (guard.ctx == nullptr) {
        verdict.reason = "the input probe could not create a context on the model";
        return verdict;
    }
    const int32_t n_vocab = input.n_vocab();
    const int32_t n       = std::min(kProbeTokens, n_vocab);

    TokenBatchGuard token_batch { llama_batch_init(n, 0, 1) };
    llama_batch &   tokens = token_batch.batch;
    for (int32_t i = 0; i < n; ++i) {
        // Spread over the vocabulary, away from the control tokens at its start.
        tokens.token[i]     = static_cast<llama_token>((static_cast<int64_t>(i) * n_vocab) / n + n_vocab / (2 * n));
        tokens.pos[i]       = i;
        tokens.n_seq_id[i]  = 1;
        tokens.seq_id[i][0] = 0;
        tokens.logits[i]    = i == n - 1;
    }
    tokens.n_tokens = n;
    int32_t                  ret      = 0;
    const std::vector<float> expected = decode_last(guard.ctx, tokens, n_vocab, &ret);
    if (expected.empty()) {
        verdict.reason = "the input probe could not decode token ids (llama_decode returned " + std::to_string(ret) + ")";
        return verdict;
    }

    const float    sqrt_n_embd = std::sqrt(static_cast<float>(llama_model_n_embd(model)));
    const float    scales[]    = { 1.0f, sqrt_n_embd };
    EmbeddingBatch rows(n, input.n_embd(), input.n_pos_per_row());
    MixtureScratch scratch;
    std::string    differences;
    for (const float scale : scales) {
        rows.clear();
        for (int32_t i = 0; i < n; ++i) {
            input.token_row(tokens.token[i], scale, scratch, rows.add(i, 0, i == n - 1));
        }
        const std::vector<float> actual = decode_last(guard.ctx, rows.view(), n_vocab, &ret);
        if (actual.empty()) {
            verdict.reason = "llama_decode of embedding rows failed (status " + std::to_string(ret) + ")";
            return verdict;
        }
        float       max_abs = 0.0f;
        const float diff    = max_difference(expected, actual, &max_abs);
        const bool  equal   = verdict.exact ? diff == 0.0f : diff <= kBackendTolerance * std::max(1.0f, max_abs);
        if (equal) {
            verdict.supported   = true;
            verdict.input_scale = scale;
            return verdict;
        }
        differences += std::string(differences.empty() ? "" : ", ") + "by up to " + std::to_string(diff) +
                       " with rows scaled by " + std::to_string(scale);
        if (sqrt_n_embd == 1.0f) break;
    }
    verdict.reason = "decoding its token rows as embedding input gives other logits than decoding the token ids (" +
                     differences + "), so its graph reads more of the input than the token-embedding row";
    return verdict;
}

}  // namespace

ProbeVerdict probe_input(const llama_model * model, const std::string & model_path, const MixtureInput & input,
                         ProbeThreads threads) {
    const std::string key = file_key(model_path);
    {
        std::lock_guard<std::mutex> lock(g_cache_mutex);
        const auto                  found = g_cache.find(key);
        if (found != g_cache.end()) {
            ProbeVerdict verdict = found->second;
            verdict.cached       = true;
            return verdict;
        }
    }
    const auto   start   = std::chrono::steady_clock::now();
    ProbeVerdict verdict = run_probe(model, input, threads);
    verdict.seconds      = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    std::lock_guard<std::mutex> lock(g_cache_mutex);
    g_cache[key] = verdict;
    return verdict;
}

}  // namespace pymoi
