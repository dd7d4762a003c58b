#include "decode_step.h"

#include <algorithm>

#include "architecture.h"
#include "mixer.h"
#include "pymoi.h"

namespace pymoi {

namespace {

std::string model_architecture(const llama_model * model) {
    char buf[128] = {};
    if (llama_model_meta_val_str(model, "general.architecture", buf, sizeof(buf)) < 0) return "";
    return buf;
}

}  // namespace

std::unique_ptr<DecodeStep> DecodeStep::open(llama_model * model, llama_context * ctx, const std::string & model_path,
                                             int * status, std::string * error) {
    if (model == nullptr || ctx == nullptr) {
        *status = PYMOI_ERR_INVALID_ARGUMENT;
        *error  = "model and context must not be null";
        return nullptr;
    }
    const std::string      arch   = model_architecture(model);
    const int32_t          n_embd = llama_model_n_embd_inp(model);
    const TokenInputPolicy policy = token_input_policy(arch, n_embd);
    if (!policy.supported) {
        *status = PYMOI_ERR_UNSUPPORTED;
        *error  = policy.reason;
        return nullptr;
    }
    std::unique_ptr<EmbeddingRows> rows = EmbeddingRows::open(model_path, status, error);
    if (!rows) return nullptr;

    const int32_t n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    if (rows->n_embd() != n_embd || rows->n_vocab() < n_vocab) {
        *status = PYMOI_ERR_UNSUPPORTED;
        *error  = "architecture '" + arch + "' takes " + std::to_string(n_embd) +
                 "-wide input rows but its token embeddings are " + std::to_string(rows->n_vocab()) + " x " +
                 std::to_string(rows->n_embd()) + " for a vocabulary of " + std::to_string(n_vocab);
        return nullptr;
    }

    std::unique_ptr<DecodeStep> step(new DecodeStep());
    step->model_            = model;
    step->ctx_              = ctx;
    step->rows_             = std::move(rows);
    step->token_only_scale_ = policy.token_only_scale;
    step->n_vocab_          = n_vocab;
    step->n_embd_           = n_embd;
    step->batch_            = llama_batch_init(1, n_embd, 1);
    step->row_.resize(static_cast<size_t>(n_embd));
    return step;
}

DecodeStep::~DecodeStep() {
    if (batch_.embd != nullptr) llama_batch_free(batch_);
}

int DecodeStep::begin(float beta, int32_t top_k, std::string * error) {
    if (!beta_is_valid(beta)) {
        *error = "beta must be >= 0, +inf, or <= -99 for the direct mixture; got " + std::to_string(beta);
        return PYMOI_ERR_INVALID_ARGUMENT;
    }
    if (top_k < 1 || top_k > n_vocab_) {
        *error = "moi_top_k must be between 1 and the vocabulary size " + std::to_string(n_vocab_) + "; got " +
                 std::to_string(top_k);
        return PYMOI_ERR_INVALID_ARGUMENT;
    }
    beta_  = beta;
    top_k_ = top_k;
    ids_.resize(static_cast<size_t>(top_k) + 1);
    weights_.resize(static_cast<size_t>(top_k) + 1);
    pending_ = false;
    return PYMOI_OK;
}

int DecodeStep::flush(int32_t n_past, std::string * error) {
    if (!pending_) return PYMOI_OK;
    const uint32_t n_ctx = llama_n_ctx(ctx_);
    if (n_past < 0 || static_cast<uint32_t>(n_past) >= n_ctx) {
        *error = "the context window is full (n_ctx=" + std::to_string(n_ctx) +
                 "): create the model with a larger n_ctx or generate fewer tokens";
        return PYMOI_ERR_CONTEXT_FULL;
    }
    batch_.n_tokens     = 1;
    batch_.pos[0]       = n_past;
    batch_.n_seq_id[0]  = 1;
    batch_.seq_id[0][0] = 0;
    batch_.logits[0]    = 1;
    const int32_t ret   = llama_decode(ctx_, batch_);
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
    const int status = flush(n_past, error);
    if (status != PYMOI_OK) return status;

    const float * logits = llama_get_logits_ith(ctx_, -1);
    if (logits == nullptr) {
        *error = "the context holds no logits to sample from: decode the prompt first";
        return PYMOI_ERR_INVALID_ARGUMENT;
    }
    // The candidates come from the raw logits, before the sampler sees them.
    select_top_k(logits, n_vocab_, top_k_, ids_.data());
    const llama_token sampled = llama_sampler_sample(sampler, ctx_, -1);
    if (sampled < 0 || sampled >= n_vocab_) {
        *error = "the sampler returned no valid token (" + std::to_string(sampled) + ")";
        return PYMOI_ERR_INTERNAL;
    }
    const int32_t n = mixture_weights(logits, top_k_, sampled, beta_, ids_.data(), weights_.data(), error);
    if (n < 0) return PYMOI_ERR_INVALID_ARGUMENT;
    mix(n);
    pending_ = true;
    *token   = sampled;
    return PYMOI_OK;
}

void DecodeStep::mix(int32_t n) {
    float * h = batch_.embd;
    std::fill(h, h + n_embd_, 0.0f);
    for (int32_t i = 0; i < n; ++i) {
        const float w = weights_[static_cast<size_t>(i)];
        if (w == 0.0f) continue;
        rows_->dequantise(ids_[static_cast<size_t>(i)], row_.data());
        for (int32_t j = 0; j < n_embd_; ++j) {
            h[j] += w * row_[static_cast<size_t>(j)];
        }
    }
    rows_->release_pages();
    if (token_only_scale_ != 1.0f) {
        for (int32_t j = 0; j < n_embd_; ++j) {
            h[j] *= token_only_scale_;
        }
    }
}

}  // namespace pymoi
