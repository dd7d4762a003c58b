#include "mixture_input.h"

#include <algorithm>

#include "architecture.h"
#include "embedding_batch.h"
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

std::unique_ptr<MixtureInput> MixtureInput::open(const llama_model * model, const std::string & model_path,
                                                 int * status, std::string * error) {
    const std::string arch = model_architecture(model);
    if (const char * reason = denial_reason(arch)) {
        *status = PYMOI_ERR_UNSUPPORTED;
        *error  = "architecture '" + arch + "' cannot take a mixture of inputs: " + reason;
        return nullptr;
    }
    if (llama_model_has_encoder(model)) {
        *status = PYMOI_ERR_UNSUPPORTED;
        *error  = "architecture '" + arch + "' cannot take a mixture of inputs: it has an encoder, and MoI mixes decoder inputs only";
        return nullptr;
    }
    std::unique_ptr<EmbeddingRows> rows = EmbeddingRows::open(model_path, status, error);
    if (!rows) return nullptr;

    const int32_t n_vocab    = llama_vocab_n_tokens(llama_model_get_vocab(model));
    const int32_t n_embd_tok = llama_model_n_embd(model);
    const int32_t n_embd_inp = llama_model_n_embd_inp(model);
    if (rows->n_embd() != n_embd_tok || rows->n_vocab() < n_vocab || n_embd_inp < n_embd_tok) {
        *status = PYMOI_ERR_UNSUPPORTED;
        *error  = "architecture '" + arch + "' has " + std::to_string(n_embd_tok) + "-wide token rows (" +
                 std::to_string(n_embd_inp) + "-wide input) but its token embeddings are " +
                 std::to_string(rows->n_vocab()) + " x " + std::to_string(rows->n_embd()) + " for a vocabulary of " +
                 std::to_string(n_vocab);
        return nullptr;
    }
    std::unique_ptr<MixtureInput> input(new MixtureInput());
    input->rows_          = std::move(rows);
    input->n_vocab_       = n_vocab;
    input->n_embd_        = n_embd_inp;
    input->n_pos_per_row_ = positions_per_row(model);
    input->verdict_       = probe_input(model, model_path, *input);
    if (!input->verdict_.supported) {
        *status = PYMOI_ERR_UNSUPPORTED;
        *error  = "architecture '" + arch + "' cannot take a mixture of inputs: " + input->verdict_.reason;
        return nullptr;
    }
    return input;
}

int MixtureInput::prepare(float beta, int32_t top_k, MixtureScratch & scratch, std::string * error) const {
    if (!beta_is_valid(beta)) {
        *error = "beta must be >= 0, +inf, or <= -99 for the direct mixture; got " + std::to_string(beta);
        return PYMOI_ERR_INVALID_ARGUMENT;
    }
    if (top_k < 1 || top_k > n_vocab_) {
        *error = "moi_top_k must be between 1 and the vocabulary size " + std::to_string(n_vocab_) + "; got " +
                 std::to_string(top_k);
        return PYMOI_ERR_INVALID_ARGUMENT;
    }
    const size_t capacity = static_cast<size_t>(top_k) + 1;
    if (scratch.ids.size() < capacity) {
        scratch.ids.resize(capacity);
        scratch.weights.resize(capacity);
    }
    scratch.row.resize(static_cast<size_t>(rows_->n_embd()));
    return PYMOI_OK;
}

void MixtureInput::select(const float * logits, int32_t top_k, MixtureScratch & scratch) const {
    select_top_k(logits, n_vocab_, top_k, scratch.ids.data());
}

int MixtureInput::build(const float * logits, llama_token sampled, float beta, int32_t top_k, MixtureScratch & scratch,
                        float * out, std::string * error) const {
    const int32_t n = mixture_weights(logits, top_k, sampled, beta, scratch.ids.data(), scratch.weights.data(), error);
    if (n < 0) return PYMOI_ERR_INVALID_ARGUMENT;
    mix(scratch.ids.data(), scratch.weights.data(), n, verdict_.input_scale, scratch, out);
    return PYMOI_OK;
}

void MixtureInput::token_row(llama_token token, float scale, MixtureScratch & scratch, float * out) const {
    const float one = 1.0f;
    scratch.row.resize(static_cast<size_t>(rows_->n_embd()));
    mix(&token, &one, 1, scale, scratch, out);
}

void MixtureInput::mix(const int32_t * ids, const float * weights, int32_t n, float scale, MixtureScratch & scratch,
                       float * out) const {
    const int32_t n_row = static_cast<int32_t>(rows_->n_embd());
    std::fill(out, out + n_embd_, 0.0f);
    for (int32_t i = 0; i < n; ++i) {
        const float w = weights[i];
        if (w == 0.0f) continue;
        rows_->dequantise(ids[i], scratch.row.data());
        for (int32_t j = 0; j < n_row; ++j) {
            out[j] += w * scratch.row[static_cast<size_t>(j)];
        }
    }
    rows_->release_pages();
    if (scale != 1.0f) {
        for (int32_t j = 0; j < n_row; ++j) {
            out[j] *= scale;
        }
    }
}

}  // namespace pymoi
