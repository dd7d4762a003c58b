// libFuzzer target: pymoi_sample (one step's sampling, the chain's top-k shared with MoI's
// top-K pass or not) on any logits, with llama-cpp-python's default sampler chain.
//
// Input layout (little-endian), the same as tests/fuzz_inputs.py reads:
//   int32 top_k, int32 chain_top_k, int32 k (the chain's top_k sampler), uint32 seed,
//   uint8 flags, then the logits (n_vocab = the remaining bytes / 4, float32; any bit
//   pattern: NaN, +-inf, denormals).
//   flags bit 0: fold top_k into [1, n_vocab]; bit 1: fold chain_top_k into
//   [top_k, n_vocab + 1] (the shared path); bit 2: chain_top_k = 0 (overrides bit 1);
//   bit 3: k = chain_top_k (as pymoi_session_share_top_k declares it). Unfolded values
//   reach the argument checks as they are.
// The chain: penalties(n_vocab, 64, 1.0, 0, 0), top_k(k), typical(1.0, 1), top_p(0.95, 1),
// min_p(0.05, 1), temp(0.8), dist(seed).
// Checked against an independent expectation: which calls must fail (and that null
// pointers are refused); out_ids are the top_k of a full sort (NaN ranked as -inf, lower
// id first on ties); the token is in [0, n_vocab) and, when a logit is finite, never one
// whose logit is NaN or -inf; and on the shared path (chain_top_k >= top_k, 1 <= k <=
// chain_top_k or chain_top_k >= n_vocab) whose top chain_top_k + 1 logits are distinct and
// finite, the token is the one a fresh chain of the same seed samples from the whole
// vocabulary (chain_top_k = 0).
#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "fuzz_common.h"
#include "ggml.h"
#include "llama.h"

namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

float rank(float z) {
    return std::isnan(z) ? -kInf : z;
}

void quiet(ggml_log_level, const char *, void *) {}

// llama-cpp-python's default chain (Llama._init_sampler with its defaults), top_k(k).
llama_sampler * default_chain(int32_t n_vocab, int32_t k, uint32_t seed) {
    llama_sampler * chain = llama_sampler_chain_init(llama_sampler_chain_default_params());
    llama_sampler_chain_add(chain, llama_sampler_init_penalties(n_vocab, 64, 1.0f, 0.0f, 0.0f));
    llama_sampler_chain_add(chain, llama_sampler_init_top_k(k));
    llama_sampler_chain_add(chain, llama_sampler_init_typical(1.0f, 1));
    llama_sampler_chain_add(chain, llama_sampler_init_top_p(0.95f, 1));
    llama_sampler_chain_add(chain, llama_sampler_init_min_p(0.05f, 1));
    llama_sampler_chain_add(chain, llama_sampler_init_temp(0.8f));
    llama_sampler_chain_add(chain, llama_sampler_init_dist(seed));
    return chain;
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int *, char ***) {
    ggml_log_set(quiet, nullptr);
    llama_log_set(quiet, nullptr);
    return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t * data, size_t size) {
    fuzz::Reader   in(data, size);
    int32_t        top_k       = in.take<int32_t>();
    int32_t        chain_top_k = in.take<int32_t>();
    int32_t        k           = in.take<int32_t>();
    const uint32_t seed        = in.take<uint32_t>();
    const uint8_t  flags       = in.take<uint8_t>();
    const int32_t  n_vocab     = static_cast<int32_t>(in.remaining() / sizeof(float));
    std::vector<float> logits(static_cast<size_t>(std::max(n_vocab, 1)));
    std::memcpy(logits.data(), in.rest(), static_cast<size_t>(n_vocab) * sizeof(float));
    if ((flags & 1) && n_vocab > 0) top_k = 1 + static_cast<int32_t>(static_cast<uint32_t>(top_k) % static_cast<uint32_t>(n_vocab));
    if ((flags & 2) && top_k >= 1 && top_k <= n_vocab) {
        chain_top_k = top_k + static_cast<int32_t>(static_cast<uint32_t>(chain_top_k) % static_cast<uint32_t>(n_vocab - top_k + 2));
    }
    if (flags & 4) chain_top_k = 0;
    if (flags & 8) k = chain_top_k;

    const bool args_ok = n_vocab >= 1 && top_k >= 1 && top_k <= n_vocab && chain_top_k >= 0;
    std::vector<int32_t> order(static_cast<size_t>(std::max(n_vocab, 0)));
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return rank(logits[a]) > rank(logits[b]); });

    // Sized for valid arguments only: a call that wrongly accepts others writes past them (ASan).
    std::vector<llama_token_data> candidates(logits.size());
    std::vector<int32_t>          ids(args_ok ? static_cast<size_t>(top_k) : 1, -7);
    llama_token                   token = -7;
    llama_sampler *               chain = default_chain(std::max(n_vocab, 1), k, seed);

    // Null pointers are refused before anything else is looked at.
    const struct {
        bool logits, sampler, candidates, ids, token;
    } nulls[5] = { { true, false, false, false, false }, { false, true, false, false, false },
                   { false, false, true, false, false }, { false, false, false, true, false },
                   { false, false, false, false, true } };
    for (const auto & n : nulls) {
        const pymoi_status status = pymoi_sample(n.logits ? nullptr : logits.data(), n_vocab, n.sampler ? nullptr : chain,
                                                 top_k, chain_top_k, n.candidates ? nullptr : candidates.data(),
                                                 n.ids ? nullptr : ids.data(), n.token ? nullptr : &token);
        fuzz::require(status == PYMOI_ERR_INVALID_ARGUMENT, "pymoi_sample accepted a null pointer");
        fuzz::require_clean_failure(status, "pymoi_sample");
    }

    pymoi_status status = pymoi_sample(logits.data(), n_vocab, chain, top_k, chain_top_k, candidates.data(), ids.data(), &token);
    if (!args_ok) {
        fuzz::require(status == PYMOI_ERR_INVALID_ARGUMENT, "pymoi_sample accepted bad arguments");
        fuzz::require_clean_failure(status, "pymoi_sample");
        llama_sampler_free(chain);
        return 0;
    }
    fuzz::require(status == PYMOI_OK, "pymoi_sample refused valid arguments", pymoi_last_error());
    fuzz::require(std::equal(ids.begin(), ids.end(), order.begin()), "pymoi_sample's candidates disagree with a full sort");
    fuzz::require(token >= 0 && token < n_vocab, "pymoi_sample's token is outside the vocabulary", std::to_string(token));
    const bool any_finite = std::any_of(logits.begin(), logits.begin() + n_vocab, [](float z) { return std::isfinite(z); });
    fuzz::require(!any_finite || rank(logits[token]) > -kInf, "pymoi_sample drew a NaN or -inf token beside a finite one",
                  std::to_string(token) + ": " + std::to_string(logits[token]));
    llama_sampler_free(chain);

    // The shared path gives the token the whole vocabulary gives, wherever no tie or
    // non-finite logit near the chain's boundary leaves llama.cpp's order open.
    const int32_t shared = std::min(chain_top_k, n_vocab);
    if (chain_top_k < top_k || k < 1 || (k > chain_top_k && chain_top_k < n_vocab)) return 0;
    const int32_t m = std::min(shared + 1, n_vocab);
    for (int32_t i = 0; i < m; ++i) {
        const float z = logits[order[i]];
        if (!std::isfinite(z) || (i > 0 && !(z < logits[order[i - 1]]))) return 0;
    }
    llama_sampler * whole       = default_chain(n_vocab, k, seed);
    llama_token     whole_token = -7;
    std::vector<int32_t> whole_ids(static_cast<size_t>(top_k), -7);
    status = pymoi_sample(logits.data(), n_vocab, whole, top_k, 0, candidates.data(), whole_ids.data(), &whole_token);
    llama_sampler_free(whole);
    fuzz::require(status == PYMOI_OK, "pymoi_sample refused chain_top_k = 0", pymoi_last_error());
    fuzz::require(whole_ids == ids, "the whole vocabulary's candidates differ from the shared path's");
    fuzz::require(whole_token == token, "the shared path sampled another token than the whole vocabulary",
                  std::to_string(token) + " vs " + std::to_string(whole_token));
    return 0;
}
