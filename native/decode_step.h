// The per-token MoI step: sample, mix, and feed the mixture back through llama_decode.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "embedding_rows.h"
#include "llama.h"

namespace pymoi {

class DecodeStep {
  public:
    // Returns nullptr with `status` / `error` set when the model cannot be mixed.
    static std::unique_ptr<DecodeStep> open(llama_model * model, llama_context * ctx, const std::string & model_path,
                                            int * status, std::string * error);
    ~DecodeStep();
    DecodeStep(const DecodeStep &)             = delete;
    DecodeStep & operator=(const DecodeStep &) = delete;

    int32_t n_vocab() const { return n_vocab_; }

    // Both return a pymoi_status; `error` is set on failure.
    int begin(float beta, int32_t top_k, std::string * error);
    int step(llama_sampler * sampler, int32_t n_past, llama_token * token, std::string * error);
    int flush(int32_t n_past, std::string * error);

    bool has_pending() const { return pending_; }

  private:
    DecodeStep() = default;
    void mix(int32_t n);

    llama_model *                  model_ = nullptr;
    llama_context *                ctx_   = nullptr;
    std::unique_ptr<EmbeddingRows> rows_;
    float                          token_only_scale_ = 1.0f;
    int32_t                        n_vocab_          = 0;
    int32_t                        n_embd_           = 0;

    float   beta_    = 1.0f;
    int32_t top_k_   = 1;
    bool    pending_ = false;

    // Sized by begin(), reused by every step: the hot path does not allocate.
    llama_batch          batch_ {};
    std::vector<int32_t> ids_;
    std::vector<float>   weights_;
    std::vector<float>   row_;
};

}  // namespace pymoi
