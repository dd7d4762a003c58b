// Soft Thinking (Zhang et al., arXiv 2505.15778): inside a reasoning model's
// thinking span every input is a concept token, the probability-weighted sum of
// the likely next tokens' embedding rows, and no token is sampled; the span ends
// on the model's close tag, by Cold Stop or by a budget, and the answer after it
// is decoded as usual.
#pragma once

#include <cstdint>
#include <random>
#include <string>

#include "llama.h"
#include "mixture_input.h"
#include "pymoi.h"

namespace pymoi {

// Checks a pymoi_soft_thinking against a vocabulary of n_vocab tokens. Returns a
// pymoi_status; `error` is set on failure.
int check_soft_thinking(const pymoi_soft_thinking & settings, int32_t n_vocab, std::string * error);

// Concept weights of the candidates ids[0..top_k) (select_top_k's, best first):
// p = softmax(logits / temperature) over the whole vocabulary; a candidate is
// kept while the mass of the candidates before it is below top_p and while
// p >= min_p * p_max; the kept are renormalised. With `gumbel` (top_k values,
// or null) and gumbel_temperature > 0, the weights become
// softmax((log w + gumbel) / gumbel_temperature) over the kept. Dropped
// candidates weigh 0. *entropy is that of the renormalised kept probabilities,
// before noise, in nats. Returns the number kept (>= 1), or -1 with `error` set
// when the logits hold no distribution (the top one +inf, -inf or NaN).
int32_t concept_weights(const float * logits, int32_t n_vocab, const int32_t * ids, const pymoi_soft_thinking & settings,
                        const float * gumbel, float * weights, float * entropy, std::string * error);

// The thinking span of one sequence, stepped by the code that samples it.
class ThinkingSpan {
  public:
    // Off: every step samples as usual.
    void off() { on_ = false; }
    // On, with settings checked by check_soft_thinking(); the noise generator
    // seeded with settings.seed.
    void start(const pymoi_soft_thinking & settings);

    // This step of a sequence with logits `logits`: with the span open, a concept
    // token (its most probable token shown), or the close tag as a token when the
    // model's argmax is the close tag, Cold Stop holds or the budget is spent;
    // before the span, the open tag as a token when it is the argmax. Writes
    // the input row to `row` (n_embd floats; null when the context is full) and
    // the token to show to *shown, and returns true; returns false when the step
    // samples as usual (no span, or after it). *status is set on failure
    // (true is returned then).
    bool step(const MixtureInput & input, const float * logits, MixtureScratch & scratch, float * row,
              llama_token * shown, int * status, std::string * error);

    pymoi_thinking_info info() const;

  private:
    void close(const MixtureInput & input, int32_t reason, MixtureScratch & scratch, float * row, llama_token * shown);

    bool                on_          = false;
    pymoi_soft_thinking settings_{};
    bool                thinking_  = false;
    int32_t             steps_     = 0;  // concept tokens fed
    int32_t             cold_      = 0;  // of them, the latest in a row whose entropy was below the threshold
    int32_t             ended_by_  = PYMOI_THINKING_NOT_ENDED;
    std::mt19937        noise_;
};

}  // namespace pymoi
