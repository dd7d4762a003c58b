// The per-token MoI step of one sequence: sample, mix, and feed the mixture
// back through llama_decode.
#pragma once

#include <cstdint>
#include <string>

#include "embedding_batch.h"
#include "llama.h"
#include "mixture_input.h"
#include "soft_thinking.h"

namespace pymoi {

class DecodeStep {
  public:
    // `input` and `ctx` are borrowed and must outlive the step.
    DecodeStep(MixtureInput & input, llama_context * ctx);
    DecodeStep(const DecodeStep &)             = delete;
    DecodeStep & operator=(const DecodeStep &) = delete;

    // All return a pymoi_status; `error` is set on failure.
    int begin(float beta, int32_t top_k, std::string * error);
    // See MixtureInput::sample(); 0 after begin().
    int share_top_k(int32_t chain_top_k, std::string * error);
    // Soft Thinking for this generation (see ThinkingSpan); null: off, as after begin().
    int soft_thinking(const pymoi_soft_thinking * settings, std::string * error);
    int step(llama_sampler * sampler, int32_t n_past, llama_token * token, std::string * error);
    int flush(int32_t n_past, std::string * error);

    bool                has_pending() const { return pending_; }
    pymoi_thinking_info thinking_info() const { return span_.info(); }

  private:
    MixtureInput &  input_;
    llama_context * ctx_;
    MixtureScratch  scratch_;

    float   beta_        = 1.0f;
    int32_t top_k_       = 1;
    int32_t chain_top_k_ = 0;
    bool    pending_     = false;
    ThinkingSpan span_;

    // The vocabulary's candidates for the sampler chain, sized once.
    std::vector<llama_token_data> candidates_;

    // One embedding row, reused by every step: the hot path does not allocate.
    EmbeddingBatch rows_;
};

}  // namespace pymoi
