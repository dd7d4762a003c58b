// libFuzzer target: the batched step's and the session's argument checks
// (pymoi_batch_open / _add / _step / _finish / _logits, pymoi_session_begin /
// _step / _flush) on a tiny model, $PYMOI_FUZZ_MODEL (fuzz/run.py writes it
// with tests/tiny_models.py: llama, 300 tokens, n_embd 64).
//
// Each input opens a batch of n_seq sequences on one context (n_ctx 128,
// n_seq_max 4, n_batch 32) and runs up to 64 operations read from the bytes
// (layout in run_op below; tests/test_fuzz_regressions.py reads the same).
// Every call must either succeed or fail with a known status and a message;
// pymoi_batch_add / _open / _finish / _logits must refuse exactly the
// arguments pymoi.h documents as invalid, and a step's tokens must be -1 or in
// the vocabulary.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "fuzz_common.h"
#include "ggml.h"
#include "llama.h"

namespace {

constexpr int32_t kSeqMax = 4;
constexpr float   kInf    = std::numeric_limits<float>::infinity();
const float       kBetas[8] = { 0.0f, 1.0f, kInf, -100.0f, -1.0f, std::nanf(""), 1e30f, -kInf };

llama_model *   g_model   = nullptr;
llama_context * g_ctx     = nullptr;
pymoi_session * g_session = nullptr;
llama_sampler * g_sampler = nullptr;
int32_t         g_n_vocab = 0;
uint32_t        g_n_ctx_seq = 0;

void quiet(ggml_log_level, const char *, void *) {}

bool beta_valid(float beta) {
    return !std::isnan(beta) && (beta >= 0.0f || beta <= -99.0f);
}

float take_beta(fuzz::Reader & in) {
    const uint8_t pick = in.take<uint8_t>();
    return pick < 8 ? kBetas[pick] : pick < 200 ? 0.01f * static_cast<float>(pick) : in.take<float>();
}

struct Run {
    pymoi_batch * batch = nullptr;
    int32_t       n_seq = 0;
    bool          in_use[kSeqMax] = {};
    bool          session_begun   = false;
};

void run_op(Run & run, fuzz::Reader & in) {
    const uint8_t op  = in.take<uint8_t>() % 7;
    const int8_t  seq = in.take<int8_t>();
    std::string   err;
    switch (op) {
        case 0: {  // add: seq, flags, beta, top_k, n_tokens, n_keep, tokens
            const uint8_t flags    = in.take<uint8_t>();
            const float   beta     = take_beta(in);
            const int16_t top_k    = in.take<int16_t>();
            const uint8_t n_tokens = in.take<uint8_t>();
            const int8_t  n_keep   = in.take<int8_t>();
            std::vector<llama_token> tokens(n_tokens + 1u);
            bool tokens_ok = true;
            for (uint32_t i = 0; i < n_tokens; ++i) {
                const int16_t raw = in.take<int16_t>();
                tokens[i]         = (flags & 2) ? raw : static_cast<llama_token>(static_cast<uint16_t>(raw) % g_n_vocab);
                tokens_ok         = tokens_ok && tokens[i] >= 0 && tokens[i] < g_n_vocab;
            }
            llama_sampler * sampler = (flags & 1) ? nullptr : g_sampler;
            int32_t         kept    = -1;
            const pymoi_status status = pymoi_batch_add(run.batch, seq, sampler, beta, top_k,
                                                        (flags & 4) ? nullptr : tokens.data(), n_tokens, n_keep, &kept);
            const bool valid = seq >= 0 && seq < run.n_seq && !run.in_use[seq] && sampler != nullptr && !(flags & 4) &&
                               n_tokens >= 1 && static_cast<uint32_t>(n_tokens) < g_n_ctx_seq && n_keep >= 0 &&
                               n_keep < n_tokens && tokens_ok && beta_valid(beta) && top_k >= 1 && top_k <= g_n_vocab;
            if (!valid) {
                fuzz::require(status == PYMOI_ERR_INVALID_ARGUMENT, "pymoi_batch_add accepted invalid arguments");
                fuzz::require_clean_failure(status, "pymoi_batch_add");
            } else {
                fuzz::require(status == PYMOI_OK, "pymoi_batch_add refused valid arguments", pymoi_last_error());
                fuzz::require(kept >= 0 && kept <= n_keep, "n_kept outside [0, n_keep]");
                run.in_use[seq] = true;
            }
            break;
        }
        case 1: {  // step (seq bit 0: null output)
            std::vector<llama_token> out(static_cast<size_t>(run.n_seq), -7);
            const pymoi_status status = pymoi_batch_step(run.batch, (seq & 1) ? nullptr : out.data());
            if (seq & 1) {
                fuzz::require(status == PYMOI_ERR_INVALID_ARGUMENT, "pymoi_batch_step accepted a null output");
            } else if (status != PYMOI_OK) {
                fuzz::require_clean_failure(status, "pymoi_batch_step");
            } else {
                for (int32_t s = 0; s < run.n_seq; ++s) {
                    fuzz::require(out[s] == -1 || (out[s] >= 0 && out[s] < g_n_vocab), "a step wrote a bad token");
                    fuzz::require(out[s] == -1 || run.in_use[s], "a free sequence sampled a token");
                }
            }
            break;
        }
        case 2: {  // finish: seq, n_keep
            const int8_t       n_keep = in.take<int8_t>();
            int32_t            kept   = -1;
            const pymoi_status status = pymoi_batch_finish(run.batch, seq, n_keep, &kept);
            if (seq >= 0 && seq < run.n_seq) {
                fuzz::require(status == PYMOI_OK, "pymoi_batch_finish refused a sequence of the batch");
                fuzz::require(kept >= 0 && kept <= std::max<int32_t>(0, n_keep), "finish kept outside [0, n_keep]");
                run.in_use[seq] = false;
            } else {
                fuzz::require(status == PYMOI_ERR_INVALID_ARGUMENT, "pymoi_batch_finish accepted a foreign sequence");
            }
            break;
        }
        case 3: {  // logits of seq
            const float *      logits = nullptr;
            const pymoi_status status = pymoi_batch_logits(run.batch, seq, &logits);
            if (status == PYMOI_OK) {
                fuzz::require(seq >= 0 && seq < run.n_seq && logits != nullptr, "logits for a foreign sequence");
                volatile float sum = 0.0f;
                for (int32_t t = 0; t < g_n_vocab; ++t) sum = sum + logits[t];
            } else {
                fuzz::require(status == PYMOI_ERR_INVALID_ARGUMENT, "pymoi_batch_logits failed oddly");
                fuzz::require_clean_failure(status, "pymoi_batch_logits");
            }
            break;
        }
        case 4: {  // session begin: beta, top_k
            const float        beta   = take_beta(in);
            const int16_t      top_k  = in.take<int16_t>();
            const pymoi_status status = pymoi_session_begin(g_session, beta, top_k);
            const bool         valid  = beta_valid(beta) && top_k >= 1 && top_k <= g_n_vocab;
            fuzz::require((status == PYMOI_OK) == valid, "pymoi_session_begin: wrong verdict on its arguments");
            if (status != PYMOI_OK) fuzz::require_clean_failure(status, "pymoi_session_begin");
            run.session_begun = run.session_begun || valid;
            break;
        }
        case 5: {  // session step: n_past (seq bit 0: null sampler)
            const int16_t n_past = in.take<int16_t>();
            if (!run.session_begun) break;  // stepping before begin is documented as the caller's error
            llama_token        token  = -7;
            const pymoi_status status = pymoi_session_step(g_session, (seq & 1) ? nullptr : g_sampler, n_past, &token);
            if (status == PYMOI_OK) {
                fuzz::require(token >= 0 && token < g_n_vocab, "pymoi_session_step wrote a bad token");
            } else {
                fuzz::require_clean_failure(status, "pymoi_session_step");
            }
            break;
        }
        default: {  // session flush: n_past
            const int16_t      n_past = in.take<int16_t>();
            const pymoi_status status = pymoi_session_flush(g_session, n_past);
            if (status != PYMOI_OK) fuzz::require_clean_failure(status, "pymoi_session_flush");
            break;
        }
    }
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int *, char ***) {
    ggml_log_set(quiet, nullptr);
    llama_log_set(quiet, nullptr);
    llama_backend_init();
    const char * path = std::getenv("PYMOI_FUZZ_MODEL");
    fuzz::require(path != nullptr, "set PYMOI_FUZZ_MODEL to a tiny model (fuzz/run.py does)");
    llama_model_params mparams = llama_model_default_params();
    g_model                    = llama_model_load_from_file(path, mparams);
    fuzz::require(g_model != nullptr, "cannot load", path);
    llama_context_params cparams = llama_context_default_params();
    cparams.n_ctx                = 128;
    cparams.n_batch              = 32;
    cparams.n_ubatch             = 32;
    cparams.n_seq_max            = kSeqMax;
    cparams.n_threads            = 2;
    cparams.n_threads_batch      = 2;
    g_ctx                        = llama_init_from_model(g_model, cparams);
    fuzz::require(g_ctx != nullptr, "cannot create a context");
    fuzz::require(pymoi_session_open(g_model, g_ctx, path, &g_session) == PYMOI_OK, "session", pymoi_last_error());
    g_sampler   = llama_sampler_init_greedy();
    g_n_vocab   = llama_vocab_n_tokens(llama_model_get_vocab(g_model));
    g_n_ctx_seq = llama_n_ctx_seq(g_ctx);
    return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t * data, size_t size) {
    fuzz::Reader in(data, size);
    llama_memory_clear(llama_get_memory(g_ctx), true);
    pymoi_session_begin(g_session, 1.0f, 1);  // drops a mixture left by the previous input
    Run          run;
    run.n_seq = in.take<int8_t>();
    const pymoi_status status = pymoi_batch_open(g_session, g_ctx, run.n_seq, /*checkpoint_prompts=*/true, &run.batch);
    if (run.n_seq < 1 || run.n_seq > kSeqMax) {
        fuzz::require(status == PYMOI_ERR_INVALID_ARGUMENT, "pymoi_batch_open accepted a bad n_seq");
        fuzz::require_clean_failure(status, "pymoi_batch_open");
        return 0;
    }
    fuzz::require(status == PYMOI_OK, "pymoi_batch_open refused a valid n_seq", pymoi_last_error());
    for (int i = 0; i < 64 && !in.empty(); ++i) run_op(run, in);
    pymoi_batch_free(run.batch);
    return 0;
}
