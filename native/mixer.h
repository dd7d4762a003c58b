// The MoI mixing rule: top-K candidates of the raw logits and their weights.
#pragma once

#include <cstdint>
#include <string>

namespace pymoi {

bool beta_is_valid(float beta);
bool beta_is_direct_mixture(float beta);

// Indices of the k largest logits, best first (lower id first on ties), in one
// pass over the vocabulary. NaN logits rank below every other value.
// `ids` has room for k entries; 1 <= k <= n_vocab.
void select_top_k(const float * logits, int32_t n_vocab, int32_t k, int32_t * ids);

// Weights of the candidates `ids[0..k)` (as returned by select_top_k) and of
// the sampled token, written to `weights`; appends the token to `ids` when it is
// not a candidate. Returns the number of entries, or -1 with `error` set when
// the candidates have no finite logit.
int32_t mixture_weights(const float * logits, int32_t k, int32_t token, float beta,
                        int32_t * ids, float * weights, std::string * error);

}  // namespace pymoi
