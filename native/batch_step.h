// Batched MoI generation: n_seq sequences (KV sequence ids 0..n_seq-1) decoded
// together, one llama_decode of one mixed row per live sequence each step.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "embedding_batch.h"
#include "llama.h"
#include "mixture_input.h"
#include "worker_pool.h"

namespace pymoi {

class BatchStep {
  public:
    // `input` and `ctx` are borrowed and must outlive the batch. Returns nullptr
    // with `status` / `error` set when the context cannot hold n_seq sequences.
    static std::unique_ptr<BatchStep> open(MixtureInput & input, llama_context * ctx, int32_t n_seq, int * status,
                                           std::string * error);
    BatchStep(const BatchStep &)             = delete;
    BatchStep & operator=(const BatchStep &) = delete;

    // All return a pymoi_status; `error` is set on failure.

    // Per-sequence samplers (borrowed) and betas, one moi_top_k for all.
    int begin(llama_sampler * const * samplers, const float * betas, int32_t top_k, std::string * error);
    // Clears the sequences' KV cells and decodes the prompts (tokens of all
    // prompts one after another, `lengths[i]` >= 1 tokens each) as tokens.
    int prefill(const llama_token * tokens, const int32_t * lengths, std::string * error);
    // Decodes the pending mixtures of the live sequences, then samples each live
    // sequence's next token into tokens[seq] and mixes its next input; finished
    // sequences get -1.
    int step(llama_token * tokens, std::string * error);
    // Ends sequence `seq`: its pending mixture is dropped and its KV cells freed.
    int finish(int32_t seq, std::string * error);

  private:
    BatchStep(MixtureInput & input, llama_context * ctx, int32_t n_seq, int n_workers);
    int decode_pending(std::string * error);
    // Samples and mixes the live sequences live_[j] with j = worker, worker + n_workers, ...
    static void sample_share(void * self, int worker);
    void        sample(int32_t j, int worker);

    MixtureInput &  input_;
    llama_context * ctx_;
    int32_t         n_seq_;
    int32_t         top_k_ = 1;

    // Per sequence, sized once by open(): the hot path does not allocate.
    std::vector<llama_sampler *> samplers_;
    std::vector<float>           betas_;
    std::vector<int32_t>         n_past_;
    std::vector<int32_t>         logits_row_;  // row of its logits in the last decode, or -1 when finished
    // Mixed rows waiting for the next decode, one per live sequence.
    EmbeddingBatch rows_;

    // One step's live sequences (row j of the next decode is live_[j]), their logits
    // and sampled tokens. Sampling runs on the pool: llama.cpp's sampler chains are
    // independent, and the decode threads are idle between decodes.
    std::vector<int32_t>       live_;
    std::vector<const float *> live_logits_;
    std::vector<llama_token>   live_tokens_;
    int32_t                    n_live_    = 0;
    int32_t                    n_sharing_ = 1;  // workers the live sequences are dealt to

    // Per worker: mixture scratch, a vocabulary-sized candidate array for the
    // sampler chain, and the outcome of its share of the last step.
    WorkerPool                                 pool_;
    std::vector<MixtureScratch>                scratch_;
    std::vector<std::vector<llama_token_data>> candidates_;
    std::vector<int>                           status_;
    std::vector<std::string>                   errors_;
};

}  // namespace pymoi
