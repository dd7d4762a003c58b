#include "embedding_batch.h"

#include <algorithm>
#include <cstring>

namespace pymoi {

int32_t positions_per_row(const llama_model * model) {
    const llama_rope_type rope = llama_model_rope_type(model);
    return rope == LLAMA_ROPE_TYPE_MROPE || rope == LLAMA_ROPE_TYPE_IMROPE ? GGML_MROPE_SECTIONS : 1;
}

EmbeddingBatch::EmbeddingBatch(int32_t capacity, int32_t n_embd, int32_t n_pos_per_row) :
    capacity_(capacity),
    n_embd_(n_embd),
    n_pos_per_row_(n_pos_per_row),
    embd_(static_cast<size_t>(capacity) * static_cast<size_t>(n_embd)),
    text_pos_(static_cast<size_t>(capacity)),
    pos_(static_cast<size_t>(capacity) * static_cast<size_t>(n_pos_per_row)),
    n_seq_id_(static_cast<size_t>(capacity), 1),
    seq_(static_cast<size_t>(capacity)),
    seq_ids_(static_cast<size_t>(capacity)),
    logits_(static_cast<size_t>(capacity)) {
    for (size_t i = 0; i < seq_ids_.size(); ++i) {
        seq_ids_[i] = &seq_[i];
    }
}

float * EmbeddingBatch::add(llama_pos pos, llama_seq_id seq, bool logits) {
    const int32_t i                   = n_rows_++;
    text_pos_[static_cast<size_t>(i)] = pos;
    seq_[static_cast<size_t>(i)]      = seq;
    logits_[static_cast<size_t>(i)]   = logits ? 1 : 0;
    return row(i);
}

int32_t EmbeddingBatch::insert_in_order(int32_t count, llama_pos first_pos, llama_seq_id seq, bool last_logits) {
    int32_t at = n_rows_;
    while (at > 0 && seq_[static_cast<size_t>(at - 1)] > seq) --at;
    const size_t from = static_cast<size_t>(at);
    const size_t to   = static_cast<size_t>(at + count);
    const size_t tail = static_cast<size_t>(n_rows_ - at);
    if (tail > 0) {
        std::memmove(row(at + count), row(at), sizeof(float) * tail * static_cast<size_t>(n_embd_));
        std::copy_backward(text_pos_.begin() + from, text_pos_.begin() + from + tail, text_pos_.begin() + to + tail);
        std::copy_backward(seq_.begin() + from, seq_.begin() + from + tail, seq_.begin() + to + tail);
        std::copy_backward(logits_.begin() + from, logits_.begin() + from + tail, logits_.begin() + to + tail);
    }
    for (int32_t i = 0; i < count; ++i) {
        const size_t r = from + static_cast<size_t>(i);
        text_pos_[r]   = first_pos + i;
        seq_[r]        = seq;
        logits_[r]     = last_logits && i == count - 1 ? 1 : 0;
    }
    n_rows_ += count;
    return at;
}

void EmbeddingBatch::remove_sequence(llama_seq_id seq) {
    int32_t kept = 0;
    for (int32_t i = 0; i < n_rows_; ++i) {
        if (seq_[static_cast<size_t>(i)] == seq) continue;
        if (kept != i) {
            std::memmove(row(kept), row(i), sizeof(float) * static_cast<size_t>(n_embd_));
            text_pos_[static_cast<size_t>(kept)] = text_pos_[static_cast<size_t>(i)];
            seq_[static_cast<size_t>(kept)]      = seq_[static_cast<size_t>(i)];
            logits_[static_cast<size_t>(kept)]   = logits_[static_cast<size_t>(i)];
        }
        ++kept;
    }
    n_rows_ = kept;
}

llama_batch EmbeddingBatch::view() {
    const size_t n = static_cast<size_t>(n_rows_);
    for (int32_t j = 0; j < n_pos_per_row_; ++j) {
        // Sections 0..2 carry the text position; a fourth (M-RoPE) is 0 for text.
        const bool text_section = n_pos_per_row_ == 1 || j < 3;
        for (size_t i = 0; i < n; ++i) {
            pos_[static_cast<size_t>(j) * n + i] = text_section ? text_pos_[i] : 0;
        }
    }
    llama_batch batch = {};
    batch.n_tokens    = n_rows_;
    batch.embd        = embd_.data();
    batch.pos         = pos_.data();
    batch.n_seq_id    = n_seq_id_.data();
    batch.seq_id      = seq_ids_.data();
    batch.logits      = logits_.data();
    return batch;
}

}  // namespace pymoi
