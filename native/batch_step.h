// Batched MoI generation with continuous batching: up to n_seq sequences (KV
// sequence ids 0..n_seq-1) join and leave between steps; each step is one
// llama_decode holding one mixed row per generating sequence and the next
// chunk of the prompts still being read.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "embedding_batch.h"
#include "llama.h"
#include "mixture_input.h"
#include "seq_checkpoint.h"
#include "soft_thinking.h"
#include "worker_pool.h"

namespace pymoi {

class BatchStep {
  public:
    // `input` and `ctx` are borrowed and must outlive the batch. With
    // checkpoint_prompts each sequence saves a checkpoint once its prompt is read
    // (see memory_needs_checkpoint). Returns nullptr with `status` / `error` set
    // when the context cannot hold n_seq sequences.
    static std::unique_ptr<BatchStep> open(MixtureInput & input, llama_context * ctx, int32_t n_seq,
                                           bool checkpoint_prompts, int * status, std::string * error);
    BatchStep(const BatchStep &)             = delete;
    BatchStep & operator=(const BatchStep &) = delete;

    // All return a pymoi_status; `error` is set on failure.

    // Starts sequence `seq` (which must be free) on a prompt of n_tokens >= 1
    // tokens, of which the first n_keep (< n_tokens) are those its KV cells hold
    // from before: they are kept if the memory holds exactly positions 0..n_keep-1
    // after the rest is dropped; otherwise the sequence's checkpoint within them is
    // restored, or the cells are cleared. The following steps read the rest of the
    // prompt; *n_kept says how many were kept.
    // `sampler` is borrowed until finish(seq); beta and top_k are the sequence's.
    int add(int32_t seq, llama_sampler * sampler, float beta, int32_t top_k, const llama_token * tokens,
            int32_t n_tokens, int32_t n_keep, int32_t * n_kept, std::string * error);
    // One decode: the pending mixtures of the generating sequences and up to
    // n_batch rows of prompts (in the order the sequences were added), fed as the
    // prompt tokens' own embedding rows (the input probe proved them equal to token
    // input). Then every sequence that has logits samples its next token into
    // tokens[seq] and mixes its next input; other sequences get -1. A sequence whose
    // context is full gets its last token and no further input.
    int step(llama_token * tokens, std::string * error);
    // Ends sequence `seq`: its pending input is dropped, its KV cells past the
    // first n_keep prompt positions freed, and its sampler released. Where the
    // memory cannot drop that tail, its latest checkpoint within those n_keep
    // positions is restored; without one every cell is freed. *n_kept says how
    // many prompt positions the sequence still holds.
    int finish(int32_t seq, int32_t n_keep, int32_t * n_kept, std::string * error);
    // See MixtureInput::sample(); 0 after add().
    int share_top_k(int32_t seq, int32_t chain_top_k, std::string * error);
    // Soft Thinking for sequence `seq` (see ThinkingSpan); null: off, as after add().
    int soft_thinking(int32_t seq, const pymoi_soft_thinking * settings, std::string * error);
    int thinking_info(int32_t seq, pymoi_thinking_info * out, std::string * error) const;
    // The raw logits (n_vocab floats) that the latest step sampled sequence `seq`
    // from; valid until the next step.
    int logits(int32_t seq, const float ** out, std::string * error) const;

  private:
    enum class State { free, reading, generating, full };

    BatchStep(MixtureInput & input, llama_context * ctx, int32_t n_seq, bool checkpoint_prompts, int n_workers);
    int  check_sequence(int32_t seq, std::string * error) const;
    void add_prompt_rows();
    int  decode(std::string * error);
    void save_checkpoint(size_t s);
    // Samples and mixes the live sequences live_[j] with j = worker, worker + n_workers, ...
    static void sample_share(void * self, int worker);
    void        sample(int32_t j, int worker);

    MixtureInput &  input_;
    llama_context * ctx_;
    int32_t         n_seq_;
    uint32_t        n_ctx_seq_;

    // Per sequence, sized once by open() (prompts by add()): steps do not allocate.
    std::vector<State>                    state_;
    std::vector<llama_sampler *>          samplers_;
    std::vector<float>                    betas_;
    std::vector<int32_t>                  top_k_;
    std::vector<int32_t>                  chain_top_k_;
    std::vector<ThinkingSpan>             spans_;
    std::vector<int32_t>                  n_past_;
    std::vector<std::vector<llama_token>> prompts_;
    std::vector<int32_t>                  prompt_read_;  // prompt tokens already decoded
    std::vector<int32_t>                  logits_row_;   // row of its logits in the latest decode, or -1
    std::vector<int32_t>                  reading_order_;  // sequences reading their prompts, oldest first
    // Per sequence, its state at the end of its prompt (when checkpoint_prompts).
    bool                       checkpoint_prompts_;
    // A recurrent state reports its one position as its first (llama_memory_seq_pos_min).
    bool                       recurrent_state_;
    std::vector<SeqCheckpoint> checkpoints_;
    std::vector<uint8_t>       checkpoint_due_;  // the prompt was read: save before the first mixture is decoded
    // Rows of the next decode, in sequence order: one mixture per generating
    // sequence, the next chunk of each prompt being read.
    EmbeddingBatch rows_;

    // One step's live sequences (those with logits), their logits, the row each
    // mixes into (-1 when its context is full) and their sampled tokens. Sampling runs
    // on the pool: llama.cpp's sampler chains are independent, and the decode
    // threads are idle between decodes.
    std::vector<int32_t>       live_;
    std::vector<const float *> live_logits_;
    std::vector<int32_t>       live_rows_;
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
