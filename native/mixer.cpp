#include "mixer.h"

#include <algorithm>
#include <cmath>
#include <limits>

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
    for (int32_t i = k; i < n_vocab; ++i) {
        // Later ids lose ties, so only a strictly larger logit gets in.
        if (logits[i] > threshold) {
            std::pop_heap(ids, ids + k, better);
            ids[k - 1] = i;
            std::push_heap(ids, ids + k, better);
            threshold = rank_value(logits[ids[0]]);
        }
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
        *error = "the top-K logits are all -inf or NaN: no distribution to mix";
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
    const double h        = k > 1 ? entropy / std::log(static_cast<double>(k)) : 0.0;
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
