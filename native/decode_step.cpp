#include "decode_step.h"

#include "pymoi.h"

namespace pymoi {

DecodeStep::DecodeStep(MixtureInput & input, llama_context * ctx) :
    input_(input),
    ctx_(ctx),
    candidates_(static_cast<size_t>(input.n_vocab())),
    rows_(1, input.n_embd(), input.n_pos_per_row()) {}

int DecodeStep::begin(float beta, int32_t top_k, std::string * error) {
    const int status = input_.prepare(beta, top_k, 0, scratch_, error);
    if (status != PYMOI_OK) return status;
    beta_        = beta;
    top_k_       = top_k;
    chain_top_k_ = 0;
    pending_     = false;
    span_.off();
    return PYMOI_OK;
}

int DecodeStep::soft_thinking(const pymoi_soft_thinking * settings, std::string * error) {
    if (settings == nullptr) {
        span_.off();
        return PYMOI_OK;
    }
    const int status = check_soft_thinking(*settings, input_.n_vocab(), error);
    if (status != PYMOI_OK) return status;
    input_.reserve(settings->top_k, scratch_);
    span_.start(*settings);
    return PYMOI_OK;
}

int DecodeStep::share_top_k(int32_t chain_top_k, std::string * error) {
    const int status = input_.prepare(beta_, top_k_, chain_top_k, scratch_, error);
    if (status != PYMOI_OK) return status;
    chain_top_k_ = chain_top_k;
    return PYMOI_OK;
}

int DecodeStep::flush(int32_t n_past, std::string * error) {
    if (!pending_) return PYMOI_OK;
    const uint32_t n_ctx = llama_n_ctx_seq(ctx_);
    if (n_past < 0 || static_cast<uint32_t>(n_past) >= n_ctx) {
        *error = "the context window is full (n_ctx=" + std::to_string(n_ctx) +
                 "): create the model with a larger n_ctx or generate fewer tokens";
        return PYMOI_ERR_CONTEXT_FULL;
    }
    rows_.set_position(0, n_past);
    const int32_t ret = llama_decode(ctx_, rows_.view());
    if (ret != 0) {
        *error = "llama_decode failed with status " + std::to_string(ret) + " at position " + std::to_string(n_past);
        return PYMOI_ERR_DECODE;
    }
    pending_ = false;
    return PYMOI_OK;
}

int DecodeStep::step(llama_sampler * sampler, int32_t n_past, llama_token * token, std::string * error) {
    if (sampler == nullptr) {
        *error = "sampler must not be null";
        return PYMOI_ERR_INVALID_ARGUMENT;
    }
    int status = flush(n_past, error);
    if (status != PYMOI_OK) return status;

    const float * logits = llama_get_logits_ith(ctx_, -1);
    if (logits == nullptr) {
        *error = "the context holds no logits to sample from: decode the prompt first";
        return PYMOI_ERR_INVALID_ARGUMENT;
    }
    rows_.clear();
    float *     row   = rows_.add(n_past, 0);
    llama_token shown = -1;
    if (span_.step(input_, logits, scratch_, row, &shown, &status, error)) {
        if (status != PYMOI_OK) return status;
        pending_ = true;
        *token   = shown;
        return PYMOI_OK;
    }
    const llama_token sampled = input_.sample(logits, sampler, top_k_, chain_top_k_, scratch_, candidates_.data());
    if (sampled < 0 || sampled >= input_.n_vocab()) {
        *error = "the sampler returned no valid token (" + std::to_string(sampled) + ")";
        return PYMOI_ERR_INTERNAL;
    }
    status = input_.build(logits, sampled, beta_, top_k_, scratch_, row, error);
    if (status != PYMOI_OK) return status;
    pending_ = true;
    *token   = sampled;
    return PYMOI_OK;
}

}  // namespace pymoi
