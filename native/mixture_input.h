// One mixed input row: the top-K candidates of a step's raw logits, their
// weights, and the weighted sum of their token-embedding rows.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "embedding_rows.h"
#include "input_probe.h"
#include "llama.h"

namespace pymoi {

// out[0..n_out) = scale * sum_i weights[i] * row(ids[i]), zero-padded past the
// row width; `row` is scratch of rows.n_embd() floats. Zero weights read no row.
void mix_rows(const EmbeddingRows & rows, const int32_t * ids, const float * weights, int32_t n, float scale,
              float * row, float * out, int32_t n_out);

// Per-token host time of the MoI step outside llama_decode, measured on `rows`
// with caller-supplied logits: top-K selection, weights, and the mixed row; and
// beside it what stock sampling and MoI's shared sampling (see
// MixtureInput::sample) take with llama-cpp-python's default chain.
struct HostTime {
    double select_us         = 0.0;
    double weights_us        = 0.0;
    double mix_us            = 0.0;
    double stock_sample_us   = 0.0;  // fill the vocabulary's candidates, apply the chain
    double shared_sample_us  = 0.0;  // one top-k pass, the chain on those k candidates
};

// Runs n_tokens steps, step t on logits set t % n_sets (n_vocab floats each) and
// sampled token tokens[t % n_sets]. Returns a pymoi_status; `error` is set on failure.
int measure_host_time(const EmbeddingRows & rows, const float * logits, int32_t n_sets, int32_t n_vocab,
                      const int32_t * tokens, float beta, int32_t top_k, int32_t n_tokens, HostTime * out,
                      std::string * error);

// The k of llama-cpp-python's default sampler chain's top-k step.
constexpr int32_t kDefaultChainTopK = 40;

// MixtureInput::sample() on a vocabulary of n_vocab logits; the top_k (or
// chain_top_k) candidates go to `ids`.
llama_token sample_and_select(const float * logits, int32_t n_vocab, llama_sampler * sampler, int32_t top_k,
                              int32_t chain_top_k, int32_t * ids, llama_token_data * candidates);

// Working space of one thread building mixtures: sized once, reused every step.
struct MixtureScratch {
    std::vector<int32_t> ids;
    std::vector<float>   weights;
    std::vector<float>   row;
    std::vector<float>   noise;  // Soft Thinking's Gumbel noise, one value per concept candidate
};

class MixtureInput {
  public:
    // Opens the token-embedding rows of `model` (loaded from `model_path`) and
    // runs the input probe on `threads`. Returns nullptr with `status` / `error`
    // set when the model cannot take a mixture: an architecture on the deny list,
    // an encoder-decoder model, or a probe that found different logits.
    static std::unique_ptr<MixtureInput> open(const llama_model * model, const std::string & model_path,
                                              ProbeThreads threads, int * status, std::string * error);

    int32_t n_vocab() const { return n_vocab_; }
    // Width of an input row (llama_model_n_embd_inp): token rows are zero-padded to it.
    int32_t n_embd() const { return n_embd_; }
    // Positions llama.cpp reads for each input row (4 on M-RoPE models).
    int32_t n_pos_per_row() const { return n_pos_per_row_; }
    const ProbeVerdict & verdict() const { return verdict_; }

    // Checks beta, top_k and chain_top_k (see sample()) and sizes `scratch` for them
    // (so sample() and build() do not allocate). Returns a pymoi_status; `error` is
    // set on failure.
    int prepare(float beta, int32_t top_k, int32_t chain_top_k, MixtureScratch & scratch, std::string * error) const;

    // Samples a token from a step's raw logits with `sampler` (applied, then accepted,
    // as llama_sampler_sample does) and keeps the mixture's top_k candidates in
    // `scratch`. chain_top_k >= top_k declares that the chain samples the same token
    // from the chain_top_k best logits as from all (pymoi_session_share_top_k): it is
    // then handed just those candidates, sorted, found in the same pass over the
    // logits as the mixture's. Otherwise (0, or below top_k) it gets the whole vocabulary in
    // `candidates` (n_vocab entries). Ties rank the lower id first, NaN last.
    // Returns the token, or -1 when the sampler selected none.
    llama_token sample(const float * logits, llama_sampler * sampler, int32_t top_k, int32_t chain_top_k,
                       MixtureScratch & scratch, llama_token_data * candidates) const;

    // For callers that sample on their own (the patched llama-server): prepare()
    // for a chain that sees the whole vocabulary, and the top_k candidates alone.
    int  prepare(float beta, int32_t top_k, MixtureScratch & scratch, std::string * error) const;
    void select(const float * logits, int32_t top_k, MixtureScratch & scratch) const;

    // Writes to `out` (n_embd floats) the input that stands for `sampled` after
    // the step whose candidates sample() kept: the mixture for `beta`, with the
    // scaling the model applies to token inputs. Safe to call from several
    // threads with different scratch spaces.
    int build(const float * logits, llama_token sampled, float beta, int32_t top_k, MixtureScratch & scratch,
              float * out, std::string * error) const;

    // Sizes `scratch` for n candidates (as prepare() does for top_k), for callers
    // that weigh candidates themselves (Soft Thinking's concept tokens).
    void reserve(int32_t n, MixtureScratch & scratch) const;

    // Writes to `out` (n_embd floats) sum_i weights[i] * row(ids[i]) with the
    // scaling the model applies to token inputs: a concept token.
    void weighted_rows(const int32_t * ids, const float * weights, int32_t n, MixtureScratch & scratch, float * out) const;

    // Writes the row of `token` alone, times `scale`, through the same path as
    // build(): what the input probe compares with the token path.
    void token_row(llama_token token, float scale, MixtureScratch & scratch, float * out) const;

  private:
    MixtureInput() = default;

    // out = scale * sum_i weights[i] * row(ids[i]), zero-padded to n_embd.
    void mix(const int32_t * ids, const float * weights, int32_t n, float scale, MixtureScratch & scratch,
             float * out) const;

    std::unique_ptr<EmbeddingRows> rows_;
    ProbeVerdict                   verdict_;
    int32_t                        n_vocab_       = 0;
    int32_t                        n_embd_        = 0;
    int32_t                        n_pos_per_row_ = 1;
};

}  // namespace pymoi
