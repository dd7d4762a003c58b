#include "mixer.h"

#include <algorithm>
#include <cmath>
#include <limits>

#if defined(__SSE__) || defined(_M_X64) || (defined(_M_IX86_FP) && _M_IX86_FP >= 1)
#    include <xmmintrin.h>
#elif defined(__ARM_NEON) && defined(__aarch64__)
#    include <arm_neon.h>
#endif

namespace pymoi {

bool beta_is_direct_mixture(float beta) {
    return beta <= -99.0f;
}

bool beta_is_valid(float beta) {
    if (std::isnan(beta)) {
        return false;
    }
    return beta >= 0.0f || beta_is_direct_mixture(beta);
}

namespace {

float rank_value(float logit) {
    return std::isnan(logit) ? -std::numeric_limits<float>::infinity() : logit;
}

// Whether any of the kBlock logits from `z` is greater than `threshold` (NaN is not).
// One vector pass rejects a whole block: once the heap is full, most blocks of a
// vocabulary hold nothing above its worst kept logit.
constexpr int32_t kBlock = 32;

#if defined(__SSE__) || defined(_M_X64) || (defined(_M_IX86_FP) && _M_IX86_FP >= 1)
bool any_greater(const float * z, float threshold) {
    const __m128 t   = _mm_set1_ps(threshold);
    __m128       acc = _mm_cmpgt_ps(_mm_loadu_ps(z), t);
    for (int32_t j = 4; j < kBlock; j += 4) {
        acc = _mm_or_ps(acc, _mm_cmpgt_ps(_mm_loadu_ps(z + j), t));
    }
    return _mm_movemask_ps(acc) != 0;
}
#elif defined(__ARM_NEON) && defined(__aarch64__)
bool any_greater(const float * z, float threshold) {
    const float32x4_t t   = vdupq_n_f32(threshold);
    uint32x4_t        acc = vcgtq_f32(vld1q_f32(z), t);
    for (int32_t j = 4; j < kBlock; j += 4) {
        acc = vorrq_u32(acc, vcgtq_f32(vld1q_f32(z + j), t));
    }
    return vmaxvq_u32(acc) != 0;
}
#else
bool any_greater(const float * z, float threshold) {
    bool any = false;
    for (int32_t j = 0; j < kBlock; ++j) {
        any |= z[j] > threshold;
    }
    return any;
}
#endif

}  // namespace

void select_top_k(const float * logits, int32_t n_vocab, int32_t k, int32_t * ids) {
    // `better(a, b)`: a ranks before b. The heap keeps the worst kept candidate
    // on top, so most of the vocabulary is rejected by one comparison.
    auto better = [logits](int32_t a, int32_t b) {
        const float va = rank_value(logits[a]);
        const float vb = rank_value(logits[b]);
        return va > vb || (va == vb && a < b);
    };
    for (int32_t i = 0; i < k; ++i) {
        ids[i] = i;
    }
    std::make_heap(ids, ids + k, better);
    float threshold = rank_value(logits[ids[0]]);
    // Later ids lose ties, so only a strictly larger logit gets in (NaN never does).
    auto consider = [&](int32_t i) {
        if (logits[i] > threshold) {
            std::pop_heap(ids, ids + k, better);
            ids[k - 1] = i;
            std::push_heap(ids, ids + k, better);
            threshold = rank_value(logits[ids[0]]);
        }
    };
    // Blocks that any_greater() rejects hold no logit that would enter the heap:
    // skipping them gives the same heap as considering every logit in turn.
    int32_t i = k;
    for (; i + kBlock <= n_vocab; i += kBlock) {
        if (!any_greater(logits + i, threshold)) continue;
        for (int32_t j = i; j < i + kBlock; ++j) {
            consider(j);
        }
    }
    for (; i < n_vocab; ++i) {
        consider(i);
    }
    std::sort_heap(ids, ids + k, better);
}

int32_t mixture_weights(const float * logits, int32_t k, int32_t token, float beta,
                        int32_t * ids, float * weights, std::string * error) {
    if (std::isinf(beta) && beta > 0.0f) {
        ids[0]     = token;
        weights[0] = 1.0f;
        return 1;
    }
    const double max_logit = rank_value(logits[ids[0]]);
    if (!std::isfinite(max_logit)) {
        *error = max_logit > 0.0 ? "the top logit is +inf: no distribution to mix (the model produced an infinite logit)"
                                 : "the top-K logits are all -inf or NaN: no distribution to mix";
        return -1;
    }
    double sum = 0.0;
    for (int32_t i = 0; i < k; ++i) {
        sum += std::exp(rank_value(logits[ids[i]]) - max_logit);
    }
    double entropy = 0.0;
    for (int32_t i = 0; i < k; ++i) {
        const double p = std::exp(rank_value(logits[ids[i]]) - max_logit) / sum;
        weights[i]     = static_cast<float>(p);
        if (p > 0.0) {
            entropy -= p * std::log(p);
        }
    }
    if (beta_is_direct_mixture(beta)) {
        return k;
    }
    // Rounding can put the entropy of a near-uniform prior a hair above log K: clamped, or the
    // sampled token's weight (b1 - h) / b1 comes out slightly negative at beta = 0.
    const double h        = k > 1 ? std::min(1.0, entropy / std::log(static_cast<double>(k))) : 0.0;
    const double b1       = static_cast<double>(beta) + 1.0;
    const double sample_w = (b1 - h) / b1;
    int32_t      n        = k;
    bool         found    = false;
    for (int32_t i = 0; i < k; ++i) {
        double w = h * static_cast<double>(weights[i]) / b1;
        if (ids[i] == token) {
            w += sample_w;
            found = true;
        }
        weights[i] = static_cast<float>(w);
    }
    if (!found) {
        ids[n]     = token;
        weights[n] = static_cast<float>(sample_w);
        ++n;
    }
    return n;
}

}  // namespace pymoi
