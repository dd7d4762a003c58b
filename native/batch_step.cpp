#include "batch_step.h"

#include <algorithm>

#include "pymoi.h"

namespace pymoi {

std::unique_ptr<BatchStep> BatchStep::open(MixtureInput & input, llama_context * ctx, int32_t n_seq, int * status,
                                           std::string * error) {
    const uint32_t n_seq_max = llama_n_seq_max(ctx);
    const uint32_t n_batch   = llama_n_batch(ctx);
    if (n_seq < 1 || static_cast<uint32_t>(n_seq) > n_seq_max || static_cast<uint32_t>(n_seq) > n_batch) {
        *status = PYMOI_ERR_INVALID_ARGUMENT;
        *error  = "a batch of " + std::to_string(n_seq) + " sequences needs a context made for at least that many (n_seq_max=" +
                 std::to_string(n_seq_max) + ", n_batch=" + std::to_string(n_batch) + ")";
        return nullptr;
    }
    const int n_workers = std::max(1, std::min<int>(llama_n_threads(ctx), n_seq));
    return std::unique_ptr<BatchStep>(new BatchStep(input, ctx, n_seq, n_workers));
}

BatchStep::BatchStep(MixtureInput & input, llama_context * ctx, int32_t n_seq, int n_workers) :
    input_(input),
    ctx_(ctx),
    n_seq_(n_seq),
    samplers_(static_cast<size_t>(n_seq), nullptr),
    betas_(static_cast<size_t>(n_seq), 1.0f),
    n_past_(static_cast<size_t>(n_seq), 0),
    logits_row_(static_cast<size_t>(n_seq), -1),
    rows_(n_seq, input.n_embd(), input.n_pos_per_row()),
    live_(static_cast<size_t>(n_seq), -1),
    live_logits_(static_cast<size_t>(n_seq), nullptr),
    live_tokens_(static_cast<size_t>(n_seq), -1),
    pool_(n_workers),
    scratch_(static_cast<size_t>(n_workers)),
    candidates_(static_cast<size_t>(n_workers), std::vector<llama_token_data>(static_cast<size_t>(input.n_vocab()))),
    status_(static_cast<size_t>(n_workers), 0),
    errors_(static_cast<size_t>(n_workers)) {}

int BatchStep::begin(llama_sampler * const * samplers, const float * betas, int32_t top_k, std::string * error) {
    for (int32_t i = 0; i < n_seq_; ++i) {
        if (samplers[i] == nullptr) {
            *error = "sampler " + std::to_string(i) + " must not be null";
            return PYMOI_ERR_INVALID_ARGUMENT;
        }
        for (MixtureScratch & scratch : scratch_) {
            const int status = input_.prepare(betas[i], top_k, scratch, error);
            if (status != PYMOI_OK) return status;
        }
    }
    std::copy(samplers, samplers + n_seq_, samplers_.begin());
    std::copy(betas, betas + n_seq_, betas_.begin());
    top_k_ = top_k;
    rows_.clear();
    std::fill(logits_row_.begin(), logits_row_.end(), -1);
    return PYMOI_OK;
}

int BatchStep::prefill(const llama_token * tokens, const int32_t * lengths, std::string * error) {
    const uint32_t n_ctx   = llama_n_ctx_seq(ctx_);
    const int32_t  n_batch = static_cast<int32_t>(llama_n_batch(ctx_));
    for (int32_t i = 0; i < n_seq_; ++i) {
        if (lengths[i] < 1 || static_cast<uint32_t>(lengths[i]) >= n_ctx) {
            *error = "prompt " + std::to_string(i) + " has " + std::to_string(lengths[i]) +
                     " tokens; each prompt needs at least 1 and fewer than the " + std::to_string(n_ctx) + " a sequence holds";
            return PYMOI_ERR_INVALID_ARGUMENT;
        }
    }
    llama_memory_t memory = llama_get_memory(ctx_);
    for (int32_t i = 0; i < n_seq_; ++i) {
        llama_memory_seq_rm(memory, i, -1, -1);
    }
    rows_.clear();

    // Every token but the last of each prompt, without logits, in n_batch chunks;
    // then the last tokens together, so that all n_seq logits rows are live at once.
    llama_batch chunk = llama_batch_init(n_batch, 0, 1);
    auto        add   = [&](llama_token token, int32_t pos, int32_t seq, bool logits) {
        const int32_t r   = chunk.n_tokens++;
        chunk.token[r]    = token;
        chunk.pos[r]      = pos;
        chunk.n_seq_id[r] = 1;
        chunk.seq_id[r][0] = seq;
        chunk.logits[r]   = logits ? 1 : 0;
    };
    auto decode = [&]() {
        const int32_t ret = chunk.n_tokens > 0 ? llama_decode(ctx_, chunk) : 0;
        chunk.n_tokens    = 0;
        if (ret != 0) {
            *error = ret == 1 ? "the KV cache has no room for the prompts (" + std::to_string(n_ctx) +
                                    " tokens per sequence): create the model with a larger n_ctx"
                              : "llama_decode failed with status " + std::to_string(ret) + " while evaluating the prompts";
            return ret == 1 ? PYMOI_ERR_CONTEXT_FULL : PYMOI_ERR_DECODE;
        }
        return PYMOI_OK;
    };
    int               status = PYMOI_OK;
    const llama_token * prompt = tokens;
    for (int32_t i = 0; i < n_seq_ && status == PYMOI_OK; ++i) {
        for (int32_t p = 0; p + 1 < lengths[i]; ++p) {
            add(prompt[p], p, i, false);
            if (chunk.n_tokens == n_batch) status = decode();
            if (status != PYMOI_OK) break;
        }
        prompt += lengths[i];
    }
    if (status == PYMOI_OK) status = decode();
    prompt = tokens;
    for (int32_t i = 0; i < n_seq_ && status == PYMOI_OK; ++i) {
        prompt += lengths[i];
        add(prompt[-1], lengths[i] - 1, i, true);
        logits_row_[static_cast<size_t>(i)] = i;
        n_past_[static_cast<size_t>(i)]     = lengths[i];
    }
    if (status == PYMOI_OK) status = decode();
    llama_batch_free(chunk);
    if (status != PYMOI_OK) std::fill(logits_row_.begin(), logits_row_.end(), -1);
    return status;
}

int BatchStep::decode_pending(std::string * error) {
    if (rows_.size() == 0) return PYMOI_OK;
    const int32_t ret = llama_decode(ctx_, rows_.view());
    if (ret != 0) {
        *error = ret == 1 ? "the KV cache is full (" + std::to_string(llama_n_ctx_seq(ctx_)) +
                                " tokens per sequence): create the model with a larger n_ctx or generate fewer tokens"
                          : "llama_decode failed with status " + std::to_string(ret);
        return ret == 1 ? PYMOI_ERR_CONTEXT_FULL : PYMOI_ERR_DECODE;
    }
    for (int32_t r = 0; r < rows_.size(); ++r) {
        const int32_t seq                      = rows_.seq(r);
        logits_row_[static_cast<size_t>(seq)]  = r;
        n_past_[static_cast<size_t>(seq)]     += 1;
    }
    rows_.clear();
    return PYMOI_OK;
}

int BatchStep::step(llama_token * tokens, std::string * error) {
    int status = decode_pending(error);
    if (status != PYMOI_OK) return status;
    const uint32_t n_ctx = llama_n_ctx_seq(ctx_);
    n_live_              = 0;
    for (int32_t seq = 0; seq < n_seq_; ++seq) {
        const int32_t row = logits_row_[static_cast<size_t>(seq)];
        tokens[seq]       = -1;
        if (row < 0) continue;
        if (static_cast<uint32_t>(n_past_[static_cast<size_t>(seq)]) >= n_ctx) {
            *error = "sequence " + std::to_string(seq) + " filled its context window (" + std::to_string(n_ctx) +
                     " tokens): create the model with a larger n_ctx or generate fewer tokens";
            rows_.clear();
            return PYMOI_ERR_CONTEXT_FULL;
        }
        // Read here, on one thread: llama_get_logits_ith synchronises the context.
        live_logits_[static_cast<size_t>(n_live_)] = llama_get_logits_ith(ctx_, row);
        live_[static_cast<size_t>(n_live_)]        = seq;
        rows_.add(n_past_[static_cast<size_t>(seq)], seq);  // row n_live_, filled by sample()
        ++n_live_;
    }
    n_sharing_ = n_live_ > 1 ? pool_.size() : 1;
    std::fill(status_.begin(), status_.end(), static_cast<int>(PYMOI_OK));
    if (n_sharing_ > 1) {
        pool_.run(&BatchStep::sample_share, this);
    } else {
        sample_share(this, 0);
    }
    for (size_t w = 0; w < status_.size(); ++w) {
        if (status_[w] != PYMOI_OK) {
            rows_.clear();
            *error = errors_[w];
            return status_[w];
        }
    }
    for (int32_t j = 0; j < n_live_; ++j) {
        tokens[live_[static_cast<size_t>(j)]] = live_tokens_[static_cast<size_t>(j)];
    }
    return PYMOI_OK;
}

void BatchStep::sample_share(void * self, int worker) {
    auto * step = static_cast<BatchStep *>(self);
    try {
        for (int32_t j = worker; j < step->n_live_; j += step->n_sharing_) {
            step->sample(j, worker);
            if (step->status_[static_cast<size_t>(worker)] != PYMOI_OK) return;
        }
    } catch (const std::exception & e) {
        step->status_[static_cast<size_t>(worker)] = PYMOI_ERR_INTERNAL;
        step->errors_[static_cast<size_t>(worker)] = e.what();
    } catch (...) {
        step->status_[static_cast<size_t>(worker)] = PYMOI_ERR_INTERNAL;
        step->errors_[static_cast<size_t>(worker)] = "unknown C++ exception while sampling";
    }
}

void BatchStep::sample(int32_t j, int worker) {
    const size_t     w        = static_cast<size_t>(worker);
    const int32_t    seq      = live_[static_cast<size_t>(j)];
    const float *    logits   = live_logits_[static_cast<size_t>(j)];
    llama_sampler *  sampler  = samplers_[static_cast<size_t>(seq)];
    MixtureScratch & scratch  = scratch_[w];
    auto &           cand     = candidates_[w];
    const int32_t    n_vocab  = input_.n_vocab();
    input_.select(logits, top_k_, scratch);

    // What llama_sampler_sample does with CPU logits, on this worker's candidate
    // array instead of the context: the sampler chain applies, then accepts.
    for (llama_token t = 0; t < n_vocab; ++t) {
        cand[static_cast<size_t>(t)] = llama_token_data { t, logits[t], 0.0f };
    }
    llama_token_data_array candidates = { cand.data(), static_cast<size_t>(n_vocab), -1, false };
    llama_sampler_apply(sampler, &candidates);
    if (candidates.selected < 0 || candidates.selected >= static_cast<int64_t>(candidates.size)) {
        status_[w] = PYMOI_ERR_INTERNAL;
        errors_[w] = "the sampler of sequence " + std::to_string(seq) + " selected no token";
        return;
    }
    const llama_token sampled = candidates.data[candidates.selected].id;
    llama_sampler_accept(sampler, sampled);
    live_tokens_[static_cast<size_t>(j)] = sampled;
    status_[w] = input_.build(logits, sampled, betas_[static_cast<size_t>(seq)], top_k_, scratch, rows_.row(j), &errors_[w]);
}

int BatchStep::finish(int32_t seq, std::string * error) {
    if (seq < 0 || seq >= n_seq_) {
        *error = "sequence " + std::to_string(seq) + " is not in this batch of " + std::to_string(n_seq_);
        return PYMOI_ERR_INVALID_ARGUMENT;
    }
    logits_row_[static_cast<size_t>(seq)] = -1;
    rows_.remove_sequence(seq);
    llama_memory_seq_rm(llama_get_memory(ctx_), seq, -1, -1);
    return PYMOI_OK;
}

}  // namespace pymoi
