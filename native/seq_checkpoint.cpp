#include "seq_checkpoint.h"

namespace pymoi {

bool memory_needs_checkpoint(const llama_model * model, bool swa_full) {
    return llama_model_is_recurrent(model) || llama_model_is_hybrid(model) || (llama_model_n_swa(model) > 0 && !swa_full);
}

bool SeqCheckpoint::save(llama_context * ctx, llama_seq_id seq) {
    pos_                  = -1;
    const llama_pos last  = llama_memory_seq_pos_max(llama_get_memory(ctx), seq);
    const size_t    bytes = llama_state_seq_get_size_ext(ctx, seq, LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY);
    if (last < 0 || bytes == 0) return false;
    if (data_.size() < bytes) data_.resize(bytes);
    size_ = llama_state_seq_get_data_ext(ctx, data_.data(), bytes, seq, LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY);
    if (size_ == 0) return false;
    pos_ = last;
    return true;
}

bool SeqCheckpoint::restore(llama_context * ctx, llama_seq_id seq) const {
    llama_memory_t memory = llama_get_memory(ctx);
    const bool     restored =
        pos_ >= 0 && llama_state_seq_set_data_ext(ctx, data_.data(), size_, seq, LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY) == size_ &&
        llama_memory_seq_rm(memory, seq, pos_ + 1, -1) && llama_memory_seq_pos_max(memory, seq) == pos_;
    if (!restored) llama_memory_seq_rm(memory, seq, -1, -1);
    return restored;
}

}  // namespace pymoi
