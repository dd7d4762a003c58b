#include "mixture_input.h"

#include <algorithm>
#include <chrono>

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
                                                 ProbeThreads threads, int * status, std::string * error) {
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
    input->verdict_       = probe_input(model, model_path, *input, threads);
    if (!input->verdict_.supported) {
        *status = PYMOI_ERR_UNSUPPORTED;
        *error  = "architecture '" + arch + "' cannot take a mixture of inputs: " + input->verdict_.reason;
        return nullptr;
    }
    return input;
}

int MixtureInput::prepare(float beta, int32_t top_k, int32_t chain_top_k, MixtureScratch & scratch,
                          std::string * error) const {
    if (!beta_is_valid(beta)) {
        *error = "beta must be >= 0, +inf, or <= -99 for the direct mixture; got " + std::to_string(beta);
        return PYMOI_ERR_INVALID_ARGUMENT;
    }
    if (top_k < 1 || top_k > n_vocab_) {
        *error = "moi_top_k must be between 1 and the vocabulary size " + std::to_string(n_vocab_) + "; got " +
                 std::to_string(top_k);
        return PYMOI_ERR_INVALID_ARGUMENT;
    }
    if (chain_top_k < 0) {
        *error = "chain_top_k must be >= 0 (0: the sampler chain sees the whole vocabulary); got " +
                 std::to_string(chain_top_k);
        return PYMOI_ERR_INVALID_ARGUMENT;
    }
    const size_t shared   = static_cast<size_t>(std::min(chain_top_k, n_vocab_));
    const size_t capacity = std::max(static_cast<size_t>(top_k) + 1, shared);
    if (scratch.ids.size() < capacity) {
        scratch.ids.resize(capacity);
        scratch.weights.resize(capacity);
    }
    scratch.row.resize(static_cast<size_t>(rows_->n_embd()));
    return PYMOI_OK;
}

int MixtureInput::prepare(float beta, int32_t top_k, MixtureScratch & scratch, std::string * error) const {
    return prepare(beta, top_k, 0, scratch, error);
}

void MixtureInput::select(const float * logits, int32_t top_k, MixtureScratch & scratch) const {
    select_top_k(logits, n_vocab_, top_k, scratch.ids.data());
}

llama_token MixtureInput::sample(const float * logits, llama_sampler * sampler, int32_t top_k, int32_t chain_top_k,
                                 MixtureScratch & scratch, llama_token_data * candidates) const {
    return sample_and_select(logits, n_vocab_, sampler, top_k, chain_top_k, scratch.ids.data(), candidates);
}

llama_token sample_and_select(const float * logits, int32_t n_vocab, llama_sampler * sampler, int32_t top_k,
                              int32_t chain_top_k, int32_t * ids, llama_token_data * candidates) {
    llama_token_data_array cur = { candidates, static_cast<size_t>(n_vocab), -1, false };
    chain_top_k                = std::min(chain_top_k, n_vocab);
    if (chain_top_k >= top_k) {
        // The prefix of a ranking is the ranking of the prefix: the mixture's top_k
        // are the first of the chain's chain_top_k.
        select_top_k(logits, n_vocab, chain_top_k, ids);
        for (int32_t i = 0; i < chain_top_k; ++i) {
            candidates[i] = llama_token_data{ ids[i], logits[ids[i]], 0.0f };
        }
        // What llama.cpp's top-k leaves: sorted, so the chain's own top-k keeps it as it is.
        cur.size   = static_cast<size_t>(chain_top_k);
        cur.sorted = true;
    } else {
        select_top_k(logits, n_vocab, top_k, ids);
        for (llama_token t = 0; t < n_vocab; ++t) {
            candidates[t] = llama_token_data{ t, logits[t], 0.0f };
        }
    }
    llama_sampler_apply(sampler, &cur);
    if (cur.selected < 0 || cur.selected >= static_cast<int64_t>(cur.size)) return -1;
    const llama_token sampled = cur.data[cur.selected].id;
    llama_sampler_accept(sampler, sampled);
    return sampled;
}

int MixtureInput::build(const float * logits, llama_token sampled, float beta, int32_t top_k, MixtureScratch & scratch,
                        float * out, std::string * error) const {
    const int32_t n = mixture_weights(logits, top_k, sampled, beta, scratch.ids.data(), scratch.weights.data(), error);
    if (n < 0) return PYMOI_ERR_INVALID_ARGUMENT;
    mix(scratch.ids.data(), scratch.weights.data(), n, verdict_.input_scale, scratch, out);
    return PYMOI_OK;
}

void MixtureInput::reserve(int32_t n, MixtureScratch & scratch) const {
    const size_t capacity = static_cast<size_t>(std::max(n, 1));
    if (scratch.ids.size() < capacity) {
        scratch.ids.resize(capacity);
        scratch.weights.resize(capacity);
    }
    if (scratch.noise.size() < capacity) scratch.noise.resize(capacity);
    scratch.row.resize(static_cast<size_t>(rows_->n_embd()));
}

void MixtureInput::weighted_rows(const int32_t * ids, const float * weights, int32_t n, MixtureScratch & scratch,
                                 float * out) const {
    mix(ids, weights, n, verdict_.input_scale, scratch, out);
}

void MixtureInput::token_row(llama_token token, float scale, MixtureScratch & scratch, float * out) const {
    const float one = 1.0f;
    scratch.row.resize(static_cast<size_t>(rows_->n_embd()));
    mix(&token, &one, 1, scale, scratch, out);
}

void MixtureInput::mix(const int32_t * ids, const float * weights, int32_t n, float scale, MixtureScratch & scratch,
                       float * out) const {
    mix_rows(*rows_, ids, weights, n, scale, scratch.row.data(), out, n_embd_);
}

void mix_rows(const EmbeddingRows & rows, const int32_t * ids, const float * weights, int32_t n, float scale,
              float * row, float * out, int32_t n_out) {
    const int32_t n_row = static_cast<int32_t>(rows.n_embd());
    std::fill(out, out + n_out, 0.0f);
    for (int32_t i = 0; i < n; ++i) {
        const float w = weights[i];
        if (w == 0.0f) continue;
        rows.dequantise(ids[i], row);
        for (int32_t j = 0; j < n_row; ++j) {
            out[j] += w * row[j];
        }
    }
    if (scale != 1.0f) {
        for (int32_t j = 0; j < n_row; ++j) {
            out[j] *= scale;
        }
    }
}

namespace {

using SamplerHandle = std::unique_ptr<llama_sampler, decltype(&llama_sampler_free)>;

// llama-cpp-python's default chain (Llama._init_sampler with its defaults).
SamplerHandle default_chain(int32_t n_vocab) {
    llama_sampler * chain = llama_sampler_chain_init(llama_sampler_chain_default_params());
    llama_sampler_chain_add(chain, llama_sampler_init_penalties(n_vocab, 64, 1.0f, 0.0f, 0.0f));
    llama_sampler_chain_add(chain, llama_sampler_init_top_k(kDefaultChainTopK));
    llama_sampler_chain_add(chain, llama_sampler_init_typical(1.0f, 1));
    llama_sampler_chain_add(chain, llama_sampler_init_top_p(0.95f, 1));
    llama_sampler_chain_add(chain, llama_sampler_init_min_p(0.05f, 1));
    llama_sampler_chain_add(chain, llama_sampler_init_temp(0.8f));
    llama_sampler_chain_add(chain, llama_sampler_init_dist(1234));
    return SamplerHandle(chain, llama_sampler_free);
}

}  // namespace

int measure_host_time(const EmbeddingRows & rows, const float * logits, int32_t n_sets, int32_t n_vocab,
                      const int32_t * tokens, float beta, int32_t top_k, int32_t n_tokens, HostTime * out,
                      std::string * error) {
    if (n_sets < 1 || n_tokens < 1 || n_vocab < kDefaultChainTopK || n_vocab > rows.n_vocab()) {
        *error = "host-time measurement needs n_sets >= 1, n_tokens >= 1 and " + std::to_string(kDefaultChainTopK) +
                 " <= n_vocab <= " + std::to_string(rows.n_vocab());
        return PYMOI_ERR_INVALID_ARGUMENT;
    }
    if (!beta_is_valid(beta) || top_k < 1 || top_k > kDefaultChainTopK) {
        *error = "host-time measurement needs a valid beta and 1 <= top_k <= " + std::to_string(kDefaultChainTopK);
        return PYMOI_ERR_INVALID_ARGUMENT;
    }
    for (int32_t s = 0; s < n_sets; ++s) {
        if (tokens[s] < 0 || tokens[s] >= n_vocab) {
            *error = "sampled token " + std::to_string(tokens[s]) + " is outside the vocabulary";
            return PYMOI_ERR_INVALID_ARGUMENT;
        }
    }
    using clock = std::chrono::steady_clock;
    std::vector<int32_t>          ids(static_cast<size_t>(kDefaultChainTopK) + 1);
    std::vector<float>            weights(static_cast<size_t>(kDefaultChainTopK) + 1);
    std::vector<float>            row(static_cast<size_t>(rows.n_embd()));
    std::vector<float>            mixed(static_cast<size_t>(rows.n_embd()));
    std::vector<llama_token_data> candidates(static_cast<size_t>(n_vocab));
    const SamplerHandle           stock  = default_chain(n_vocab);
    const SamplerHandle           shared = default_chain(n_vocab);
    clock::duration               select{}, weigh{}, mix{}, stock_sample{}, shared_sample{};
    for (int32_t t = 0; t < n_tokens; ++t) {
        const int32_t s  = t % n_sets;
        const float * z  = logits + static_cast<size_t>(s) * static_cast<size_t>(n_vocab);
        const auto    t0 = clock::now();
        sample_and_select(z, n_vocab, stock.get(), top_k, 0, ids.data(), candidates.data());
        const auto t1 = clock::now();
        sample_and_select(z, n_vocab, shared.get(), top_k, kDefaultChainTopK, ids.data(), candidates.data());
        const auto t2 = clock::now();
        select_top_k(z, n_vocab, top_k, ids.data());
        const auto    t3 = clock::now();
        const int32_t n  = mixture_weights(z, top_k, tokens[s], beta, ids.data(), weights.data(), error);
        const auto    t4 = clock::now();
        if (n < 0) return PYMOI_ERR_INVALID_ARGUMENT;
        mix_rows(rows, ids.data(), weights.data(), n, 1.0f, row.data(), mixed.data(), static_cast<int32_t>(mixed.size()));
        const auto t5 = clock::now();
        stock_sample += t1 - t0;
        shared_sample += t2 - t1;
        select += t3 - t2;
        weigh += t4 - t3;
        mix += t5 - t4;
    }
    const auto per_token = [n_tokens](clock::duration d) {
        return std::chrono::duration<double, std::micro>(d).count() / n_tokens;
    };
    out->select_us        = per_token(select);
    out->weights_us       = per_token(weigh);
    out->mix_us           = per_token(mix);
    out->stock_sample_us  = per_token(stock_sample);
    out->shared_sample_us = per_token(shared_sample);
    return PYMOI_OK;
}

}  // namespace pymoi
