#include "soft_thinking.h"

#include <algorithm>
#include <cmath>

#include "mixer.h"

namespace pymoi {

namespace {

bool finite_at_least(float value, float low) {
    return std::isfinite(value) && value >= low;
}

}  // namespace

int check_soft_thinking(const pymoi_soft_thinking & s, int32_t n_vocab, std::string * error) {
    const auto fail = [error](const std::string & message) {
        *error = "soft thinking: " + message;
        return PYMOI_ERR_INVALID_ARGUMENT;
    };
    if (s.top_k < 1 || s.top_k > n_vocab) {
        return fail("top_k must be between 1 and the vocabulary size " + std::to_string(n_vocab) + "; got " +
                    std::to_string(s.top_k));
    }
    if (!(std::isfinite(s.temperature) && s.temperature > 0.0f)) {
        return fail("temperature must be > 0; got " + std::to_string(s.temperature));
    }
    if (!(s.top_p > 0.0f && s.top_p <= 1.0f)) return fail("top_p must be in (0, 1]; got " + std::to_string(s.top_p));
    if (!(s.min_p >= 0.0f && s.min_p < 1.0f)) return fail("min_p must be in [0, 1); got " + std::to_string(s.min_p));
    if (!finite_at_least(s.gumbel_temperature, 0.0f)) {
        return fail("gumbel_temperature must be >= 0 (0: no noise); got " + std::to_string(s.gumbel_temperature));
    }
    if (!finite_at_least(s.cold_stop_entropy, 0.0f)) {
        return fail("cold_stop_entropy must be >= 0; got " + std::to_string(s.cold_stop_entropy));
    }
    if (s.cold_stop_steps < 0) {
        return fail("cold_stop_steps must be >= 0 (0: no Cold Stop); got " + std::to_string(s.cold_stop_steps));
    }
    for (const llama_token tag : { s.open_tag, s.close_tag }) {
        if (tag < 0 || tag >= n_vocab) {
            return fail("tag token " + std::to_string(tag) + " is outside the vocabulary [0, " + std::to_string(n_vocab) + ")");
        }
    }
    if (s.open_tag == s.close_tag) return fail("the open and close tags must be different tokens");
    return PYMOI_OK;
}

int32_t concept_weights(const float * logits, int32_t n_vocab, const int32_t * ids, const pymoi_soft_thinking & s,
                        const float * gumbel, float * weights, float * entropy, std::string * error) {
    const float top = logits[ids[0]];  // the largest logit: select_top_k ranks NaN last
    if (!std::isfinite(top)) {
        *error = top > 0.0f ? "the top logit is +inf: no distribution to think in (the model produced an infinite logit)"
                            : "the logits are all -inf or NaN: no distribution to think in";
        return -1;
    }
    const float inv_t = 1.0f / s.temperature;
    // exp below -88 is under float's smallest normal: nothing a sum of <= 2^31 terms near 1 can see.
    double sum = 0.0;
    for (int32_t v = 0; v < n_vocab; ++v) {
        const float d = (logits[v] - top) * inv_t;
        if (d > -88.0f) sum += std::exp(d);
    }
    const double p_max       = 1.0 / sum;
    const auto   probability = [&](int32_t i) {
        const float d = (logits[ids[i]] - top) * inv_t;
        return d > -88.0f ? std::exp(static_cast<double>(d)) / sum : 0.0;
    };
    // Candidates come best first, so what top-p and min-p keep is a prefix.
    double  mass = 0.0;  // of the candidates before this one
    int32_t n    = 0;
    for (; n < s.top_k; ++n) {
        const double p = probability(n);
        if (!(p > 0.0 && mass < s.top_p && p >= s.min_p * p_max)) break;
        mass += p;
    }
    // Normalised in double, so that one kept candidate weighs exactly 1 (its row, bit for bit).
    double h = 0.0;
    for (int32_t i = 0; i < s.top_k; ++i) {
        const double w = i < n ? probability(i) / mass : 0.0;
        weights[i]     = static_cast<float>(w);
        if (w > 0.0) h -= w * std::log(w);
    }
    *entropy = static_cast<float>(h);
    if (gumbel != nullptr && s.gumbel_temperature > 0.0f && n > 1) {
        const double inv_tau = 1.0 / s.gumbel_temperature;
        double       best    = -INFINITY;
        for (int32_t i = 0; i < n; ++i) {
            best = std::max(best, (std::log(static_cast<double>(weights[i])) + gumbel[i]) * inv_tau);
        }
        double total = 0.0;
        for (int32_t i = 0; i < n; ++i) {
            const double e = std::exp((std::log(static_cast<double>(weights[i])) + gumbel[i]) * inv_tau - best);
            weights[i]     = static_cast<float>(e);
            total += e;
        }
        for (int32_t i = 0; i < n; ++i) {
            weights[i] = static_cast<float>(weights[i] / total);
        }
    }
    return n;
}

void ThinkingSpan::start(const pymoi_soft_thinking & settings) {
    on_       = true;
    settings_ = settings;
    thinking_ = settings.thinking;
    steps_    = 0;
    cold_     = 0;
    ended_by_ = PYMOI_THINKING_NOT_ENDED;
    noise_.seed(settings.seed);
}

bool ThinkingSpan::step(const MixtureInput & input, const float * logits, MixtureScratch & scratch, float * row,
                        llama_token * shown, int * status, std::string * error) {
    *status = PYMOI_OK;
    if (!on_ || ended_by_ != PYMOI_THINKING_NOT_ENDED) return false;
    int32_t * ids = scratch.ids.data();
    if (!thinking_) {
        select_top_k(logits, input.n_vocab(), 1, ids);
        if (ids[0] != settings_.open_tag) return false;
        thinking_ = true;
        *shown    = settings_.open_tag;
        if (row != nullptr) input.token_row(settings_.open_tag, input.verdict().input_scale, scratch, row);
        return true;
    }
    select_top_k(logits, input.n_vocab(), settings_.top_k, ids);
    if (ids[0] == settings_.close_tag) {
        close(input, PYMOI_THINKING_CLOSE_TAG, scratch, row, shown);
        return true;
    }
    if (settings_.cold_stop_steps > 0 && cold_ >= settings_.cold_stop_steps) {
        close(input, PYMOI_THINKING_COLD_STOP, scratch, row, shown);
        return true;
    }
    if (settings_.max_thinking_steps >= 0 && steps_ >= settings_.max_thinking_steps) {
        close(input, PYMOI_THINKING_BUDGET, scratch, row, shown);
        return true;
    }
    const float * gumbel = nullptr;
    if (settings_.gumbel_temperature > 0.0f) {
        for (int32_t i = 0; i < settings_.top_k; ++i) {
            // A uniform in (0, 1), never 0 or 1, from 32 bits of the generator.
            const double u                   = (static_cast<double>(noise_()) + 0.5) / 4294967296.0;
            scratch.noise[static_cast<size_t>(i)] = static_cast<float>(-std::log(-std::log(u)));
        }
        gumbel = scratch.noise.data();
    }
    float entropy = 0.0f;
    if (concept_weights(logits, input.n_vocab(), ids, settings_, gumbel, scratch.weights.data(), &entropy, error) < 0) {
        *status = PYMOI_ERR_INVALID_ARGUMENT;
        return true;
    }
    if (row != nullptr) input.weighted_rows(ids, scratch.weights.data(), settings_.top_k, scratch, row);
    *shown = ids[0];
    ++steps_;
    cold_ = entropy < settings_.cold_stop_entropy ? cold_ + 1 : 0;
    return true;
}

void ThinkingSpan::close(const MixtureInput & input, int32_t reason, MixtureScratch & scratch, float * row,
                         llama_token * shown) {
    thinking_ = false;
    ended_by_ = reason;
    *shown    = settings_.close_tag;
    if (row != nullptr) input.token_row(settings_.close_tag, input.verdict().input_scale, scratch, row);
}

pymoi_thinking_info ThinkingSpan::info() const {
    pymoi_thinking_info info{};
    info.thinking = on_ && thinking_;
    info.steps    = steps_;
    info.ended_by = ended_by_;
    return info;
}

}  // namespace pymoi
