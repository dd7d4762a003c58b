// A llama_batch of embedding rows carrying every position llama.cpp reads for
// them: one per row, or GGML_MROPE_SECTIONS per row (section-major) on M-RoPE
// models.
#pragma once

#include <cstdint>
#include <vector>

#include "llama.h"

namespace pymoi {

// Positions llama.cpp reads for each row of embedding input to `model`.
int32_t positions_per_row(const llama_model * model);

class EmbeddingBatch {
  public:
    // Room for `capacity` rows of `n_embd` floats, each at `n_pos_per_row`
    // positions; allocated here once, never on add().
    EmbeddingBatch(int32_t capacity, int32_t n_embd, int32_t n_pos_per_row);

    int32_t size() const { return n_rows_; }
    int32_t capacity() const { return capacity_; }

    // Appends a row at text position `pos` of sequence `seq`, with or without
    // logits; returns its n_embd floats for the caller to fill.
    float * add(llama_pos pos, llama_seq_id seq, bool logits = true);

    // Inserts `count` rows of sequence `seq` at text positions first_pos.. after
    // the rows of sequences up to `seq` and before those of higher ones (the last
    // new row with logits if last_logits); returns the index of the first new row,
    // the others following it. A batch built only this way stays in sequence
    // order, which llama.cpp needs to decode one row of every sequence in one
    // micro-batch: with a KV stream per sequence it takes sequences in ascending
    // order and starts another micro-batch at the first one out of order.
    int32_t insert_in_order(int32_t count, llama_pos first_pos, llama_seq_id seq, bool last_logits);

    // Moves row i to text position `pos`.
    void set_position(int32_t i, llama_pos pos) { text_pos_[static_cast<size_t>(i)] = pos; }

    float *      row(int32_t i) { return embd_.data() + static_cast<size_t>(i) * static_cast<size_t>(n_embd_); }
    llama_seq_id seq(int32_t i) const { return seq_[static_cast<size_t>(i)]; }
    bool         has_logits(int32_t i) const { return logits_[static_cast<size_t>(i)] != 0; }

    void clear() { n_rows_ = 0; }

    // Drops the rows of sequence `seq`, keeping the order of the others.
    void remove_sequence(llama_seq_id seq);

    // The batch for llama_decode, valid until the next change. A text row at
    // position p is (p, p, p, 0) on M-RoPE models, as llama.cpp's token path
    // lays out the positions of a token.
    llama_batch view();

  private:
    int32_t capacity_;
    int32_t n_embd_;
    int32_t n_pos_per_row_;
    int32_t n_rows_ = 0;

    std::vector<float>          embd_;
    std::vector<llama_pos>      text_pos_;  // per row
    std::vector<llama_pos>      pos_;       // what llama.cpp reads: n_pos_per_row sections of n_rows
    std::vector<int32_t>        n_seq_id_;
    std::vector<llama_seq_id>   seq_;
    std::vector<llama_seq_id *> seq_ids_;
    std::vector<int8_t>         logits_;
};

}  // namespace pymoi
