// libFuzzer target: pymoi_mixture_weights and pymoi_select_top_k on any logits.
//
// Input layout (little-endian), the same as tests/test_fuzz_regressions.py reads:
//   int32 token, float32 beta, int32 top_k, uint8 flags, then the logits
//   (n_vocab = the remaining bytes / 4, float32; any bit pattern: NaN, +-inf,
//   denormals). flags bit 0: fold top_k into [1, n_vocab]; bit 1: fold token
//   into [0, n_vocab); bits 4-7: 0-8 replace beta by kBetas[i], others keep the
//   raw float. Unfolded values reach the argument checks as they are.
// Checked against an independent expectation: which calls must fail, the
// top-K order of a full sort (NaN ranked as -inf, lower id first on ties), and
// weights that are finite, non-negative and sum to 1.
#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "fuzz_common.h"

namespace {

constexpr float kInf      = std::numeric_limits<float>::infinity();
const float     kBetas[9] = { 0.0f, 0.5f, 1.0f, 2.0f, kInf, -100.0f, -99.0f, std::nanf(""), -1.0f };

float rank(float z) {
    return std::isnan(z) ? -kInf : z;
}

bool beta_valid(float beta) {
    return !std::isnan(beta) && (beta >= 0.0f || beta <= -99.0f);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t * data, size_t size) {
    fuzz::Reader  in(data, size);
    int32_t       token = in.take<int32_t>();
    float         beta  = in.take<float>();
    int32_t       top_k = in.take<int32_t>();
    const uint8_t flags = in.take<uint8_t>();
    const int32_t n_vocab = static_cast<int32_t>(in.remaining() / sizeof(float));
    std::vector<float> logits(static_cast<size_t>(std::max(n_vocab, 1)));
    std::memcpy(logits.data(), in.rest(), static_cast<size_t>(n_vocab) * sizeof(float));
    if ((flags & 1) && n_vocab > 0) top_k = 1 + static_cast<int32_t>(static_cast<uint32_t>(top_k) % static_cast<uint32_t>(n_vocab));
    if ((flags & 2) && n_vocab > 0) token = static_cast<int32_t>(static_cast<uint32_t>(token) % static_cast<uint32_t>(n_vocab));
    if ((flags >> 4) < 9) beta = kBetas[flags >> 4];

    const bool args_ok = n_vocab >= 1 && top_k >= 1 && top_k <= n_vocab;
    std::vector<int32_t> order(static_cast<size_t>(std::max(n_vocab, 0)));
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return rank(logits[a]) > rank(logits[b]); });

    // pymoi_select_top_k
    // Sized for valid arguments only: a call that wrongly accepts others writes past it (ASan).
    std::vector<int32_t> ids(args_ok ? static_cast<size_t>(top_k) + 1 : 1, -7);
    pymoi_status status = pymoi_select_top_k(logits.data(), n_vocab, top_k, ids.data());
    if (!args_ok) {
        fuzz::require(status == PYMOI_ERR_INVALID_ARGUMENT, "select_top_k accepted bad arguments");
        fuzz::require_clean_failure(status, "pymoi_select_top_k");
    } else {
        fuzz::require(status == PYMOI_OK, "select_top_k refused valid arguments", pymoi_last_error());
        fuzz::require(std::equal(ids.begin(), ids.begin() + top_k, order.begin()), "select_top_k disagrees with a full sort");
    }
    fuzz::require(pymoi_select_top_k(nullptr, n_vocab, top_k, ids.data()) == PYMOI_ERR_INVALID_ARGUMENT, "null logits");

    // pymoi_mixture_weights
    std::vector<float> weights(ids.size(), -7.0f);
    int32_t            n = -7;
    status = pymoi_mixture_weights(logits.data(), n_vocab, token, beta, top_k, ids.data(), weights.data(), &n);
    const bool weights_args_ok = args_ok && token >= 0 && token < n_vocab && beta_valid(beta);
    const bool plain           = std::isinf(beta) && beta > 0.0f;
    const bool distribution    = weights_args_ok && (plain || std::isfinite(rank(logits[order[0]])));
    if (!distribution) {
        fuzz::require(status == PYMOI_ERR_INVALID_ARGUMENT, "mixture_weights accepted what it cannot weigh");
        fuzz::require_clean_failure(status, "pymoi_mixture_weights");
        return 0;
    }
    fuzz::require(status == PYMOI_OK, "mixture_weights refused valid arguments", pymoi_last_error());
    const bool direct = beta <= -99.0f;
    const bool in_top = std::find(order.begin(), order.begin() + top_k, token) != order.begin() + top_k;
    const int32_t expected_n = plain ? 1 : (direct || in_top) ? top_k : top_k + 1;
    fuzz::require(n == expected_n, "mixture_weights returned the wrong count", std::to_string(n));
    if (plain) {
        fuzz::require(ids[0] == token && weights[0] == 1.0f, "beta=+inf is not the sampled token alone");
        return 0;
    }
    fuzz::require(std::equal(ids.begin(), ids.begin() + top_k, order.begin()), "mixture ids disagree with a full sort");
    if (n == top_k + 1) fuzz::require(ids[top_k] == token, "the sampled token is not last");
    double sum = 0.0;
    for (int32_t i = 0; i < n; ++i) {
        fuzz::require(std::isfinite(weights[i]) && weights[i] >= 0.0f, "a weight is negative or not finite",
                      std::to_string(weights[i]));
        sum += weights[i];
    }
    fuzz::require(std::fabs(sum - 1.0) < 1e-4, "the weights do not sum to 1", std::to_string(sum));
    return 0;
}
