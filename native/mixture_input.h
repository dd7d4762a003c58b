// One mixed input row: the top-K candidates of a step's raw logits, their
// weights, and the weighted sum of their token-embedding rows.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "embedding_rows.h"
#include "llama.h"

namespace pymoi {

class MixtureInput {
  public:
    // Returns nullptr with `status` / `error` set when the model cannot take a mixture.
    static std::unique_ptr<MixtureInput> open(const llama_model * model, const std::string & model_path, int * status,
                                              std::string * error);

    int32_t n_vocab() const { return n_vocab_; }
    int32_t n_embd() const { return n_embd_; }

    // Checks beta and top_k and sizes the scratch space for top_k (so build() does
    // not allocate). Returns a pymoi_status; `error` is set on failure.
    int prepare(float beta, int32_t top_k, std::string * error);

    // Writes to `out` (n_embd floats) the input that stands for `sampled` after
    // a step with these raw logits: the mixture for `beta`, with the scaling
    // the model applies to token inputs. top_k must have been prepared.
    int build(const float * logits, llama_token sampled, float beta, int32_t top_k, float * out, std::string * error);

    // Top-K candidates of the raw logits; call before the sampler modifies them.
    void select(const float * logits, int32_t top_k);

  private:
    MixtureInput() = default;

    std::unique_ptr<EmbeddingRows> rows_;
    float                          token_only_scale_ = 1.0f;
    int32_t                        n_vocab_          = 0;
    int32_t                        n_embd_           = 0;

    std::vector<int32_t> ids_;
    std::vector<float>   weights_;
    std::vector<float>   row_;
};

}  // namespace pymoi
