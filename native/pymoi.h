// pymoi: Mixture of Inputs (MoI) decoding on top of llama.cpp.
//
// A flat C ABI. Every function that can fail returns a pymoi_status; on failure
// pymoi_last_error() returns a message for the calling thread. No C++ exception
// crosses this boundary.
//
// Ownership: objects returned through an out-pointer belong to the caller and
// are released with the matching *_free function. Pointers to llama.cpp objects
// (llama_model, llama_context, llama_sampler) are borrowed: they must outlive
// every pymoi object that was given them.
#ifndef PYMOI_H
#define PYMOI_H

#include <stdbool.h>
#include <stdint.h>

#include "llama.h"

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#    define PYMOI_API __declspec(dllexport)
#else
#    define PYMOI_API __attribute__((visibility("default")))
#endif

typedef enum pymoi_status {
    PYMOI_OK                   = 0,
    PYMOI_ERR_INVALID_ARGUMENT = 1,  // a parameter is out of range
    PYMOI_ERR_IO               = 2,  // a file could not be opened or mapped
    PYMOI_ERR_FORMAT           = 3,  // a file is not a usable GGUF model
    PYMOI_ERR_UNSUPPORTED      = 4,  // the model cannot take a mixed input
    PYMOI_ERR_DECODE           = 5,  // llama_decode failed
    PYMOI_ERR_CONTEXT_FULL     = 6,  // no room left in the context window
    PYMOI_ERR_INTERNAL         = 7,  // out of memory or another unexpected failure
} pymoi_status;

// Message describing the last failure on this thread ("" if none). Valid until
// the next pymoi call on the same thread.
PYMOI_API const char * pymoi_last_error(void);

// beta values at or below this select the direct mixture (weights = prior over
// the top-K, sampled token ignored), as in the authors' mixinputs package.
#define PYMOI_DIRECT_MIXTURE_BETA (-99.0f)

// True if beta is a valid mixing strength: finite and >= 0, +infinity (plain
// token input), or <= PYMOI_DIRECT_MIXTURE_BETA.
PYMOI_API bool pymoi_beta_is_valid(float beta);

// Mixture weights for one position.
//   logits:   n_vocab raw logits (before temperature, penalties, grammar)
//   token:    the sampled token y, 0 <= token < n_vocab
//   top_k:    number of candidates K, 1 <= top_k <= n_vocab
//   out_ids, out_weights: caller-provided arrays of at least top_k + 1 entries
//   out_n:    number of entries written (K, or K + 1 when y is not among the
//             top K; 1 for beta = +infinity)
// Candidates are ordered by logit, highest first, lower id first on ties; y
// comes last when it is not a candidate. The weights sum to 1.
PYMOI_API pymoi_status pymoi_mixture_weights(
        const float * logits, int32_t n_vocab, int32_t token, float beta, int32_t top_k,
        int32_t * out_ids, float * out_weights, int32_t * out_n);

// The top_k candidates of pymoi_mixture_weights alone: ids of the top_k highest
// logits, best first, lower id first on ties, NaN ranked as -infinity (so any
// logits, +/-inf and NaN included, have an answer). out_ids has top_k entries.
PYMOI_API pymoi_status pymoi_select_top_k(const float * logits, int32_t n_vocab, int32_t top_k, int32_t * out_ids);

// Entry i of the deny list: architectures (GGUF general.architecture) whose
// graph aborts on embedding input, so that the input probe cannot run on them.
// Writes static strings and returns true for 0 <= i < the list's length;
// returns false past its end.
PYMOI_API bool pymoi_denied_architecture(int32_t i, const char ** out_architecture, const char ** out_reason);

// Rows of a model's token-embedding matrix, read from the memory-mapped GGUF
// file (or the split that holds it) and dequantised one row at a time.
typedef struct pymoi_embedding_rows pymoi_embedding_rows;

typedef struct pymoi_embedding_rows_info {
    int64_t n_embd;       // floats per row
    int64_t n_vocab;      // rows
    int32_t ggml_type;    // enum ggml_type of the stored matrix
} pymoi_embedding_rows_info;

PYMOI_API pymoi_status pymoi_embedding_rows_open(const char * gguf_path, pymoi_embedding_rows ** out_rows);
PYMOI_API void         pymoi_embedding_rows_free(pymoi_embedding_rows * rows);
PYMOI_API pymoi_status pymoi_embedding_rows_info_get(const pymoi_embedding_rows * rows, pymoi_embedding_rows_info * out_info);
// Writes the n_embd floats of row `token` to out.
PYMOI_API pymoi_status pymoi_embedding_rows_dequantise(const pymoi_embedding_rows * rows, int32_t token, float * out);

// One step's sampling on caller-supplied logits (n_vocab floats), as the MoI
// steps do it: `sampler` applied (and accepting its token), the top_k mixture
// candidates written to out_ids (top_k entries, best first), and chain_top_k
// as for pymoi_session_share_top_k. `candidates` is scratch of n_vocab entries.
PYMOI_API pymoi_status pymoi_sample(const float * logits, int32_t n_vocab, struct llama_sampler * sampler,
                                    int32_t top_k, int32_t chain_top_k, llama_token_data * candidates,
                                    int32_t * out_ids, llama_token * out_token);

// Host time per generated token that MoI adds beyond stock sampling, measured
// on real embedding rows: what a step spends outside llama_decode and the
// sampler chain, so what a GPU build would see on top of stock decoding.
typedef struct pymoi_host_time {
    double select_us;         // top-K selection over the vocabulary (when the chain cannot share its top-k)
    double weights_us;        // prior, entropy and weights of the K (+1) entries
    double mix_us;            // dequantising and summing the weighted rows
    double stock_sample_us;   // llama-cpp-python's default chain as llama_sampler_sample applies it
    double shared_sample_us;  // the same chain on its top-k, found in one pass with MoI's (pymoi_session_share_top_k)
} pymoi_host_time;

// Runs n_tokens MoI steps without decoding: step t takes logits set t % n_sets
// (`logits` holds n_sets x n_vocab floats, 40 <= n_vocab <= the rows' vocabulary)
// and sampled token tokens[t % n_sets], selects the top_k (<= 40) candidates,
// weighs them for beta and mixes their rows; and samples the same logits with
// llama-cpp-python's default chain, stock and shared. Writes the mean
// microseconds per step of each part. MoI adds shared - stock + weights + mix
// beyond stock sampling, or select + weights + mix where the chain cannot share.
PYMOI_API pymoi_status pymoi_host_time_measure(
        const pymoi_embedding_rows * rows, const float * logits, int32_t n_sets, int32_t n_vocab,
        const llama_token * tokens, float beta, int32_t top_k, int32_t n_tokens, pymoi_host_time * out);

// Whether the LoRA adapter file at `lora_path` changes the token embeddings
// (has tensors for token_embd.weight): llama.cpp adds its delta on the token
// path only, so a mixture of inputs would silently leave it out.
PYMOI_API pymoi_status pymoi_lora_changes_token_embeddings(const char * lora_path, bool * out_changes);

// Checkpoints of one sequence (see llama-server's context checkpoints): the
// part of its memory that llama_memory_seq_rm cannot roll back, saved with
// llama_state_seq_get_data_ext(LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY), so that the
// positions generated after the prompt, fed mixtures, can be dropped while the
// prompt stays cached.

// True when a context of `model` needs a checkpoint to drop the tail of a
// sequence: recurrent and hybrid models, and a sliding-window cache that does
// not hold every position (swa_full false).
PYMOI_API bool pymoi_memory_needs_checkpoint(const struct llama_model * model, bool swa_full);

typedef struct pymoi_checkpoint pymoi_checkpoint;

typedef struct pymoi_checkpoint_info {
    int32_t  pos;    // the last position the checkpoint holds, -1 when none is saved
    uint64_t bytes;  // size of the saved state
} pymoi_checkpoint_info;

PYMOI_API pymoi_status pymoi_checkpoint_new(pymoi_checkpoint ** out_checkpoint);
PYMOI_API void         pymoi_checkpoint_free(pymoi_checkpoint * checkpoint);
// Saves sequence `seq` of `ctx` through its last position (replacing the
// previous checkpoint; its buffer is reused). PYMOI_ERR_INTERNAL when llama.cpp
// saves nothing or memory runs out; the checkpoint is then empty.
PYMOI_API pymoi_status pymoi_checkpoint_save(pymoi_checkpoint * checkpoint, struct llama_context * ctx, int32_t seq);
// Restores the checkpoint into sequence `seq` and drops every later position
// from the rest of its memory, so that the sequence ends at the checkpoint's
// position. On failure (PYMOI_ERR_INTERNAL) the sequence is cleared.
PYMOI_API pymoi_status pymoi_checkpoint_restore(const pymoi_checkpoint * checkpoint, struct llama_context * ctx, int32_t seq);
PYMOI_API pymoi_status pymoi_checkpoint_info_get(const pymoi_checkpoint * checkpoint, pymoi_checkpoint_info * out_info);

// The per-token MoI step on a llama_context owned by the caller.
typedef struct pymoi_session pymoi_session;

// Opens a session for `model` / `ctx`, whose weights were loaded from
// `model_path`, after the input probe: a few tokens are decoded once as token
// ids and once as pymoi's embedding rows, in a context of the probe's own (ctx
// is not touched), and the logits compared (bitwise on the CPU, within a small
// tolerance when a GPU or RPC backend may run the graph). Fails with
// PYMOI_ERR_UNSUPPORTED, naming the architecture and what differed, when they
// differ for every input scale tried, for architectures on the deny list and
// for encoder-decoder models. The verdict is kept per model file for the life
// of the process.
PYMOI_API pymoi_status pymoi_session_open(
        struct llama_model * model, struct llama_context * ctx, const char * model_path,
        pymoi_session ** out_session);
PYMOI_API void pymoi_session_free(pymoi_session * session);

typedef struct pymoi_session_info {
    int32_t n_embd;          // floats per input row (llama_model_n_embd_inp; token rows zero-padded to it)
    int32_t n_pos_per_row;   // positions llama.cpp reads per input row (4 on M-RoPE models)
    float   input_scale;     // factor the rows carry: 1, or sqrt(n_embd) where the graph scales token input only
    bool    probe_exact;     // the probe required bitwise-equal logits
    bool    probe_cached;    // the verdict came from an earlier probe of the same file
    double  probe_seconds;   // time the probe took when it ran
} pymoi_session_info;

PYMOI_API pymoi_status pymoi_session_info_get(const pymoi_session * session, pymoi_session_info * out_info);

// Starts a generation: forgets any mixture not yet decoded and sets the mixing
// parameters. The caller has just decoded the prompt as tokens, so the context
// holds the logits of its last position.
PYMOI_API pymoi_status pymoi_session_begin(pymoi_session * session, float beta, int32_t top_k);

// Declares that the sampler chains of the following steps (until the next
// pymoi_session_begin, which sets 0) sample the same token from their
// chain_top_k best logits as from the whole vocabulary: a chain whose top-k
// step of that k comes first (llama-cpp-python's default chain, whose penalties
// do nothing at their defaults), or of k - n where before it only penalties
// lower the logits of at most n distinct tokens. When chain_top_k >= top_k the
// chain is handed just those candidates, sorted, found in the same pass over
// the logits as the mixture's top_k; otherwise (0, or below top_k) the whole
// vocabulary. Logits that tie rank the lower token id first (llama.cpp leaves
// their order open), NaN last.
PYMOI_API pymoi_status pymoi_session_share_top_k(pymoi_session * session, int32_t chain_top_k);

// One generated token. If the previous step left a mixture, decodes it at
// position n_past (sequence 0) first. Then samples the next token from the
// current logits with `sampler` (applied as llama_sampler_sample applies it;
// the sampler accepts the token), computes that token's mixture and keeps it
// for the next step.
PYMOI_API pymoi_status pymoi_session_step(
        pymoi_session * session, struct llama_sampler * sampler, int32_t n_past, llama_token * out_token);

// Decodes the pending mixture, if any, at position n_past without sampling
// (before token input is appended to the sequence).
PYMOI_API pymoi_status pymoi_session_flush(pymoi_session * session, int32_t n_past);

// True if a mixture is waiting to be decoded.
PYMOI_API bool pymoi_session_has_pending(const pymoi_session * session);

// Batched generation with continuous batching: up to n_seq sequences, KV
// sequence ids 0..n_seq-1 of `ctx`, that join (pymoi_batch_add) and leave
// (pymoi_batch_finish) between steps. `ctx` must have been created with
// n_seq_max >= n_seq (and n_batch >= n_seq). The batch borrows the session's
// embedding rows: free it before the session. One thread at a time per batch.
typedef struct pymoi_batch pymoi_batch;

// With checkpoint_prompts (see pymoi_memory_needs_checkpoint) a sequence whose
// prompt has been read saves a checkpoint before its first mixture is decoded
// (one per sequence, replacing the previous one); pymoi_batch_finish and
// pymoi_batch_add restore it to keep the prompt.
PYMOI_API pymoi_status pymoi_batch_open(
        pymoi_session * session, struct llama_context * ctx, int32_t n_seq, bool checkpoint_prompts, pymoi_batch ** out_batch);
PYMOI_API void pymoi_batch_free(pymoi_batch * batch);

// Starts sequence `seq` (free: never added, or finished) on a prompt of
// n_tokens >= 1 tokens (copied), with its own sampler (borrowed until
// pymoi_batch_finish(seq)), beta (as for pymoi_session_begin) and moi_top_k.
// The caller says that the sequence's KV cells hold the first n_keep
// (0 <= n_keep < n_tokens) prompt tokens from before (kept by
// pymoi_batch_finish): they are reused when the memory holds exactly positions
// 0..n_keep-1, otherwise the cells are cleared; *out_n_kept (may be null) says
// which. The following steps read the rest.
PYMOI_API pymoi_status pymoi_batch_add(pymoi_batch * batch, int32_t seq, struct llama_sampler * sampler, float beta,
                                       int32_t top_k, const llama_token * tokens, int32_t n_tokens, int32_t n_keep,
                                       int32_t * out_n_kept);

// pymoi_session_share_top_k for sequence `seq` (in use; pymoi_batch_add sets 0).
PYMOI_API pymoi_status pymoi_batch_share_top_k(pymoi_batch * batch, int32_t seq, int32_t chain_top_k);

// One step: a single llama_decode of the mixtures left by the previous step
// and of up to n_batch rows of the prompts still being read (oldest sequence
// first, each prompt token as its own embedding row, which the input probe found
// equal to token input). Then every sequence with logits (a mixture decoded, or
// its prompt's last token) samples its next token into out_tokens[seq] (n_seq
// entries; -1 for the others) and mixes its next input. Sequences are sampled in
// parallel on up to llama_n_threads(ctx) threads, each sampler chain applied as
// llama_sampler_sample does. A sequence whose context is full gets its last
// token and no more; finish it.
PYMOI_API pymoi_status pymoi_batch_step(pymoi_batch * batch, llama_token * out_tokens);

// Ends sequence `seq`: drops its pending input, frees its KV cells past the
// first n_keep prompt positions and releases its sampler; the sequence is free
// for pymoi_batch_add. Positions fed mixtures are never kept. Where the memory
// cannot drop that tail (recurrent, hybrid), the sequence's latest checkpoint
// within the n_keep positions is restored (see checkpoint_prompts), and
// everything is freed without one. *out_n_kept (may be null) says how many
// prompt positions the sequence holds afterwards.
PYMOI_API pymoi_status pymoi_batch_finish(pymoi_batch * batch, int32_t seq, int32_t n_keep, int32_t * out_n_kept);

// The raw logits (n_vocab floats, owned by the context) that the latest step
// sampled sequence `seq`'s token from; valid until the next step.
PYMOI_API pymoi_status pymoi_batch_logits(const pymoi_batch * batch, int32_t seq, const float ** out_logits);

// Soft Thinking (Zhang et al., arXiv 2505.15778): inside a reasoning model's
// thinking span each input is a concept token, sum_i p_i e_i over the likely
// next tokens, and no token is sampled. Settings of one generation:
typedef struct pymoi_soft_thinking {
    int32_t     top_k;               // concept candidates, 1 <= top_k <= n_vocab (the reference's 10)
    float       temperature;         // p = softmax(logits / temperature), > 0 (0.6)
    float       top_p;               // candidates kept while the mass before them is below top_p, (0, 1] (0.95)
    float       min_p;               // and while p >= min_p * p_max, [0, 1) (0.001)
    float       gumbel_temperature;  // > 0: Gumbel-softmax noise over the kept, at this temperature; 0: none
    uint32_t    seed;                // of the noise
    float       cold_stop_entropy;   // Cold Stop: the span closes after cold_stop_steps concept tokens in a row
    int32_t     cold_stop_steps;     //   whose entropy (nats) was below cold_stop_entropy (0.01, 256); 0: off
    int32_t     max_thinking_steps;  // the span closes after this many concept tokens; < 0: no budget
    llama_token open_tag;            // the token that opens the span (<think>)
    llama_token close_tag;           // the token that closes it (</think>), fed as a token
    bool        thinking;            // the span is open where the prompt ends
} pymoi_soft_thinking;

// How a thinking span ended (pymoi_thinking_info.ended_by).
#define PYMOI_THINKING_NOT_ENDED 0  // not started, or still open
#define PYMOI_THINKING_CLOSE_TAG 1  // the model's argmax was the close tag
#define PYMOI_THINKING_COLD_STOP 2
#define PYMOI_THINKING_BUDGET    3

typedef struct pymoi_thinking_info {
    bool    thinking;  // the span is open
    int32_t steps;     // concept tokens fed so far
    int32_t ended_by;  // PYMOI_THINKING_*
} pymoi_thinking_info;

// The concept weights of one step, as the steps compute them: ids of the
// settings' top_k highest logits (best first) and their weights (0 for those
// top-p or min-p drop), summing to 1; `gumbel` (top_k noise values, or null)
// is added to the log-weights when gumbel_temperature > 0. out_ids and
// out_weights have top_k entries; *out_n is the number kept, *out_entropy the
// entropy of the kept probabilities before noise (nats).
PYMOI_API pymoi_status pymoi_concept_weights(const float * logits, int32_t n_vocab, const pymoi_soft_thinking * settings,
                                             const float * gumbel, int32_t * out_ids, float * out_weights,
                                             int32_t * out_n, float * out_entropy);

// Soft Thinking for the generation begun by pymoi_session_begin (which turns it
// off): `settings` is copied; null turns it off. With it on, pymoi_session_step
// returns the shown token of each step (a concept step's most probable token,
// or a tag fed as a token) and samples only outside the span, with the
// session's beta (+infinity: plain token input) and sampler.
PYMOI_API pymoi_status pymoi_session_soft_thinking(pymoi_session * session, const pymoi_soft_thinking * settings);
PYMOI_API pymoi_status pymoi_session_thinking_info(const pymoi_session * session, pymoi_thinking_info * out_info);

// The same for sequence `seq` of a batch (in use; pymoi_batch_add turns it off).
PYMOI_API pymoi_status pymoi_batch_soft_thinking(pymoi_batch * batch, int32_t seq, const pymoi_soft_thinking * settings);
PYMOI_API pymoi_status pymoi_batch_thinking_info(const pymoi_batch * batch, int32_t seq, pymoi_thinking_info * out_info);

#ifdef __cplusplus
}
#endif

#endif  // PYMOI_H
