#include "batch_step.h"

#include <algorithm>
#include <new>

#include "pymoi.h"

namespace pymoi {

std::unique_ptr<BatchStep> BatchStep::open(MixtureInput & input, llama_context * ctx, int32_t n_seq,
                                           bool checkpoint_prompts, int * status, std::string * error) {
    const uint32_t n_seq_max = llama_n_seq_max(ctx);
    const uint32_t n_batch   = llama_n_batch(ctx);
    if (n_seq < 1 || static_cast<uint32_t>(n_seq) > n_seq_max || static_cast<uint32_t>(n_seq) > n_batch) {
        *status = PYMOI_ERR_INVALID_ARGUMENT;
        *error  = "a batch of " + std::to_string(n_seq) + " sequences needs a context made for at least that many (n_seq_max=" +
                 std::to_string(n_seq_max) + ", n_batch=" + std::to_string(n_batch) + ")";
        return nullptr;
    }
    const int n_workers = std::max(1, std::min<int>(llama_n_threads(ctx), n_seq));
    return std::unique_ptr<BatchStep>(new BatchStep(input, ctx, n_seq, checkpoint_prompts, n_workers));
}

BatchStep::BatchStep(MixtureInput & input, llama_context * ctx, int32_t n_seq, bool checkpoint_prompts, int n_workers) :
    input_(input),
    ctx_(ctx),
    n_seq_(n_seq),
    n_ctx_seq_(llama_n_ctx_seq(ctx)),
    state_(static_cast<size_t>(n_seq), State::free),
    samplers_(static_cast<size_t>(n_seq), nullptr),
    betas_(static_cast<size_t>(n_seq), 1.0f),
    top_k_(static_cast<size_t>(n_seq), 1),
    chain_top_k_(static_cast<size_t>(n_seq), 0),
    spans_(static_cast<size_t>(n_seq)),
    n_past_(static_cast<size_t>(n_seq), 0),
    prompts_(static_cast<size_t>(n_seq)),
    prompt_read_(static_cast<size_t>(n_seq), 0),
    logits_row_(static_cast<size_t>(n_seq), -1),
    checkpoint_prompts_(checkpoint_prompts),
    recurrent_state_(llama_model_is_recurrent(llama_get_model(ctx)) || llama_model_is_hybrid(llama_get_model(ctx))),
    checkpoints_(checkpoint_prompts ? static_cast<size_t>(n_seq) : 0),
    checkpoint_due_(checkpoint_prompts ? static_cast<size_t>(n_seq) : 0, 0),
    rows_(static_cast<int32_t>(llama_n_batch(ctx)), input.n_embd(), input.n_pos_per_row()),
    live_(static_cast<size_t>(n_seq), -1),
    live_logits_(static_cast<size_t>(n_seq), nullptr),
    live_rows_(static_cast<size_t>(n_seq), -1),
    live_tokens_(static_cast<size_t>(n_seq), -1),
    pool_(n_workers),
    scratch_(static_cast<size_t>(n_workers)),
    candidates_(static_cast<size_t>(n_workers), std::vector<llama_token_data>(static_cast<size_t>(input.n_vocab()))),
    status_(static_cast<size_t>(n_workers), 0),
    errors_(static_cast<size_t>(n_workers)) {
    reading_order_.reserve(static_cast<size_t>(n_seq));
}

int BatchStep::check_sequence(int32_t seq, std::string * error) const {
    if (seq < 0 || seq >= n_seq_) {
        *error = "sequence " + std::to_string(seq) + " is not in this batch of " + std::to_string(n_seq_);
        return PYMOI_ERR_INVALID_ARGUMENT;
    }
    return PYMOI_OK;
}

int BatchStep::add(int32_t seq, llama_sampler * sampler, float beta, int32_t top_k, const llama_token * tokens,
                   int32_t n_tokens, int32_t n_keep, int32_t * n_kept, std::string * error) {
    int status = check_sequence(seq, error);
    if (status != PYMOI_OK) return status;
    const size_t s = static_cast<size_t>(seq);
    if (state_[s] != State::free) {
        *error = "sequence " + std::to_string(seq) + " is in use: finish it before adding another prompt to it";
        return PYMOI_ERR_INVALID_ARGUMENT;
    }
    if (sampler == nullptr) {
        *error = "the sampler of sequence " + std::to_string(seq) + " must not be null";
        return PYMOI_ERR_INVALID_ARGUMENT;
    }
    if (n_tokens < 1 || static_cast<uint32_t>(n_tokens) >= n_ctx_seq_) {
        *error = "the prompt of sequence " + std::to_string(seq) + " has " + std::to_string(n_tokens) +
                 " tokens; a prompt needs at least 1 and fewer than the " + std::to_string(n_ctx_seq_) + " a sequence holds";
        return PYMOI_ERR_INVALID_ARGUMENT;
    }
    if (n_keep < 0 || n_keep >= n_tokens) {
        *error = "n_keep must be between 0 and the prompt's length minus 1 (" + std::to_string(n_tokens - 1) + "); got " +
                 std::to_string(n_keep);
        return PYMOI_ERR_INVALID_ARGUMENT;
    }
    for (int32_t i = 0; i < n_tokens; ++i) {
        if (tokens[i] < 0 || tokens[i] >= input_.n_vocab()) {
            *error = "the prompt of sequence " + std::to_string(seq) + " holds token " + std::to_string(tokens[i]) +
                     ", outside the vocabulary [0, " + std::to_string(input_.n_vocab()) + ")";
            return PYMOI_ERR_INVALID_ARGUMENT;
        }
    }
    for (MixtureScratch & scratch : scratch_) {
        status = input_.prepare(beta, top_k, 0, scratch, error);
        if (status != PYMOI_OK) return status;
    }
    llama_memory_t memory = llama_get_memory(ctx_);
    // A sliding window or a recurrent state may not hold the kept prefix as a whole.
    bool kept = n_keep > 0 && llama_memory_seq_rm(memory, seq, n_keep, -1) &&
                (recurrent_state_ || llama_memory_seq_pos_min(memory, seq) == 0) &&
                llama_memory_seq_pos_max(memory, seq) == n_keep - 1;
    if (!kept && checkpoint_prompts_ && checkpoints_[s].pos() >= 0 && checkpoints_[s].pos() < n_keep &&
        checkpoints_[s].restore(ctx_, seq)) {
        // The memory went on past the kept prefix (a settled reply the prompt does not repeat).
        n_keep = checkpoints_[s].pos() + 1;
        kept   = true;
    }
    if (!kept) {
        n_keep = 0;
        llama_memory_seq_rm(memory, seq, -1, -1);
    }
    *n_kept = n_keep;
    // A checkpoint inside the kept prefix still holds that prefix's state; a later one may not.
    if (checkpoint_prompts_) {
        if (checkpoints_[s].pos() >= n_keep) checkpoints_[s].clear();
        checkpoint_due_[s] = 0;
    }
    prompts_[s].assign(tokens, tokens + n_tokens);
    prompt_read_[s] = n_keep;
    n_past_[s]      = n_keep;
    logits_row_[s]  = -1;
    samplers_[s]    = sampler;
    betas_[s]       = beta;
    top_k_[s]       = top_k;
    chain_top_k_[s] = 0;
    spans_[s].off();
    state_[s]       = State::reading;
    reading_order_.push_back(seq);
    return PYMOI_OK;
}

void BatchStep::add_prompt_rows() {
    const float      scale   = input_.verdict().input_scale;
    MixtureScratch & scratch = scratch_[0];
    for (const int32_t seq : reading_order_) {
        const size_t  s      = static_cast<size_t>(seq);
        const auto &  prompt = prompts_[s];
        const int32_t n      = static_cast<int32_t>(prompt.size());
        const int32_t read   = prompt_read_[s];
        if (rows_.size() == rows_.capacity()) break;
        const int32_t count = std::min(n - read, rows_.capacity() - rows_.size());
        const int32_t first = rows_.insert_in_order(count, read, seq, read + count == n);
        for (int32_t i = 0; i < count; ++i) {
            input_.token_row(prompt[static_cast<size_t>(read + i)], scale, scratch, rows_.row(first + i));
        }
    }
}

int BatchStep::decode(std::string * error) {
    const int32_t ret = llama_decode(ctx_, rows_.view());
    if (ret != 0) {
        rows_.clear();
        *error = ret == 1 ? "the KV cache has no room for this step (" + std::to_string(n_ctx_seq_) +
                                " tokens per sequence): create the model with a larger n_ctx"
                          : "llama_decode failed with status " + std::to_string(ret);
        return ret == 1 ? PYMOI_ERR_CONTEXT_FULL : PYMOI_ERR_DECODE;
    }
    std::fill(logits_row_.begin(), logits_row_.end(), -1);
    for (int32_t r = 0; r < rows_.size(); ++r) {
        const size_t s = static_cast<size_t>(rows_.seq(r));
        n_past_[s] += 1;
        if (state_[s] == State::reading) prompt_read_[s] += 1;
        if (rows_.has_logits(r)) logits_row_[s] = r;
    }
    rows_.clear();
    return PYMOI_OK;
}

int BatchStep::step(llama_token * tokens, std::string * error) {
    for (int32_t seq = 0; checkpoint_prompts_ && seq < n_seq_; ++seq) {
        if (checkpoint_due_[static_cast<size_t>(seq)]) save_checkpoint(static_cast<size_t>(seq));
    }
    add_prompt_rows();
    std::fill(tokens, tokens + n_seq_, -1);
    n_live_ = 0;
    if (rows_.size() == 0) return PYMOI_OK;
    int status = decode(error);
    if (status != PYMOI_OK) return status;

    for (int32_t seq = 0; seq < n_seq_; ++seq) {
        const size_t  s   = static_cast<size_t>(seq);
        const int32_t row = logits_row_[s];
        if (row < 0) continue;
        if (state_[s] == State::reading) {
            state_[s] = State::generating;
            reading_order_.erase(std::find(reading_order_.begin(), reading_order_.end(), seq));
            // Saved before its first mixture is decoded, in the next step: a sequence finished
            // before then (a reply settled into it) keeps the checkpoint it had.
            if (checkpoint_prompts_) checkpoint_due_[s] = 1;
        }
        // Read here, on one thread: llama_get_logits_ith synchronises the context.
        live_logits_[static_cast<size_t>(n_live_)] = llama_get_logits_ith(ctx_, row);
        live_[static_cast<size_t>(n_live_)]        = seq;
        if (static_cast<uint32_t>(n_past_[s]) < n_ctx_seq_) {
            live_rows_[static_cast<size_t>(n_live_)] = rows_.insert_in_order(1, n_past_[s], seq, true);  // filled by sample()
        } else {
            live_rows_[static_cast<size_t>(n_live_)] = -1;
            state_[s]                                = State::full;
        }
        ++n_live_;
    }
    n_sharing_ = n_live_ > 1 ? pool_.size() : 1;
    std::fill(status_.begin(), status_.end(), static_cast<int>(PYMOI_OK));
    if (n_sharing_ > 1) {
        pool_.run(&BatchStep::sample_share, this);
    } else if (n_live_ > 0) {
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

void BatchStep::save_checkpoint(size_t s) {
    // A sequence that has no checkpoint (llama.cpp saved nothing, or memory ran out) is
    // cleared when it finishes, as without checkpoints.
    checkpoint_due_[s] = 0;
    try {
        checkpoints_[s].save(ctx_, static_cast<llama_seq_id>(s));
    } catch (const std::bad_alloc &) {
        checkpoints_[s].clear();
    }
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
    const size_t     w       = static_cast<size_t>(worker);
    const size_t     s       = static_cast<size_t>(live_[static_cast<size_t>(j)]);
    const float *    logits  = live_logits_[static_cast<size_t>(j)];
    MixtureScratch & scratch = scratch_[w];
    auto &           cand    = candidates_[w];
    const int32_t    row     = live_rows_[static_cast<size_t>(j)];

    float *     out   = row >= 0 ? rows_.row(row) : nullptr;
    llama_token shown = -1;
    if (spans_[s].step(input_, logits, scratch, out, &shown, &status_[w], &errors_[w])) {
        live_tokens_[static_cast<size_t>(j)] = shown;
        return;
    }
    // What llama_sampler_sample does with CPU logits, on this worker's candidate
    // array instead of the context: the sampler chain applies, then accepts.
    const llama_token sampled = input_.sample(logits, samplers_[s], top_k_[s], chain_top_k_[s], scratch, cand.data());
    if (sampled < 0) {
        status_[w] = PYMOI_ERR_INTERNAL;
        errors_[w] = "the sampler of sequence " + std::to_string(s) + " selected no token";
        return;
    }
    live_tokens_[static_cast<size_t>(j)] = sampled;
    if (out != nullptr) {
        status_[w] = input_.build(logits, sampled, betas_[s], top_k_[s], scratch, out, &errors_[w]);
    }
}

int BatchStep::share_top_k(int32_t seq, int32_t chain_top_k, std::string * error) {
    int status = check_sequence(seq, error);
    if (status != PYMOI_OK) return status;
    const size_t s = static_cast<size_t>(seq);
    if (state_[s] == State::free) {
        *error = "sequence " + std::to_string(seq) + " is free: add it before declaring its sampler chain";
        return PYMOI_ERR_INVALID_ARGUMENT;
    }
    for (MixtureScratch & scratch : scratch_) {
        status = input_.prepare(betas_[s], top_k_[s], chain_top_k, scratch, error);
        if (status != PYMOI_OK) return status;
    }
    chain_top_k_[s] = chain_top_k;
    return PYMOI_OK;
}

int BatchStep::soft_thinking(int32_t seq, const pymoi_soft_thinking * settings, std::string * error) {
    int status = check_sequence(seq, error);
    if (status != PYMOI_OK) return status;
    const size_t s = static_cast<size_t>(seq);
    if (state_[s] == State::free) {
        *error = "sequence " + std::to_string(seq) + " is free: add it before turning Soft Thinking on";
        return PYMOI_ERR_INVALID_ARGUMENT;
    }
    if (settings == nullptr) {
        spans_[s].off();
        return PYMOI_OK;
    }
    status = check_soft_thinking(*settings, input_.n_vocab(), error);
    if (status != PYMOI_OK) return status;
    for (MixtureScratch & scratch : scratch_) {
        input_.reserve(settings->top_k, scratch);
    }
    spans_[s].start(*settings);
    return PYMOI_OK;
}

int BatchStep::thinking_info(int32_t seq, pymoi_thinking_info * out, std::string * error) const {
    const int status = check_sequence(seq, error);
    if (status != PYMOI_OK) return status;
    *out = spans_[static_cast<size_t>(seq)].info();
    return PYMOI_OK;
}

int BatchStep::finish(int32_t seq, int32_t n_keep, int32_t * n_kept, std::string * error) {
    const int status = check_sequence(seq, error);
    if (status != PYMOI_OK) return status;
    const size_t s = static_cast<size_t>(seq);
    n_keep         = std::max(0, std::min(n_keep, prompt_read_[s]));
    if (state_[s] == State::reading) {
        reading_order_.erase(std::find(reading_order_.begin(), reading_order_.end(), seq));
    }
    state_[s]      = State::free;
    samplers_[s]   = nullptr;
    logits_row_[s] = -1;
    rows_.remove_sequence(seq);
    llama_memory_t memory = llama_get_memory(ctx_);
    if (n_keep > 0 && llama_memory_seq_rm(memory, seq, n_keep, -1)) {
        *n_kept = n_keep;
    } else if (checkpoint_prompts_ && checkpoints_[s].pos() >= 0 && checkpoints_[s].pos() < n_keep &&
               checkpoints_[s].restore(ctx_, seq)) {
        *n_kept = checkpoints_[s].pos() + 1;
    } else {
        *n_kept = 0;
        llama_memory_seq_rm(memory, seq, -1, -1);
    }
    if (checkpoint_prompts_) {
        checkpoint_due_[s] = 0;
        if (*n_kept == 0) checkpoints_[s].clear();
    }
    return PYMOI_OK;
}


int BatchStep::logits(int32_t seq, const float ** out, std::string * error) const {
    const int status = check_sequence(seq, error);
    if (status != PYMOI_OK) return status;
    for (int32_t j = 0; j < n_live_; ++j) {
        if (live_[static_cast<size_t>(j)] == seq) {
            *out = live_logits_[static_cast<size_t>(j)];
            return PYMOI_OK;
        }
    }
    *error = "sequence " + std::to_string(seq) + " sampled no token in the latest step";
    return PYMOI_ERR_INVALID_ARGUMENT;
}

}  // namespace pymoi
