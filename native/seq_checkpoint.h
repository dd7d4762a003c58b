// A checkpoint of one sequence at the end of its prompt: the part of its memory
// that llama_memory_seq_rm cannot roll back (a recurrent state, a sliding
// window's cells), so that the positions generated after it, fed mixtures, can
// be dropped and the prompt kept, as llama-server's context checkpoints do.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "llama.h"

namespace pymoi {

// Whether a context of `model` needs a checkpoint to drop the tail of a
// sequence: recurrent and hybrid memories never can, a sliding-window cache
// can only when it holds every position (swa_full).
bool memory_needs_checkpoint(const llama_model * model, bool swa_full);

class SeqCheckpoint {
  public:
    // Saves sequence `seq` of `ctx` as it stands (through its last position).
    // The buffer grows to the largest checkpoint taken and is reused. False
    // when llama.cpp wrote nothing; throws std::bad_alloc when out of memory.
    bool save(llama_context * ctx, llama_seq_id seq);
    // Restores the saved part of sequence `seq` and drops every position after
    // the checkpoint's from the rest of its memory. False, with the sequence
    // cleared, when llama.cpp refuses it or the memory does not end at the
    // checkpoint afterwards.
    bool restore(llama_context * ctx, llama_seq_id seq) const;
    // Forgets the checkpoint (the buffer is kept for the next one).
    void clear() { pos_ = -1; }

    // The last position the checkpoint holds, or -1 when there is none.
    llama_pos pos() const { return pos_; }
    // Bytes the latest checkpoint takes.
    size_t size() const { return size_; }

  private:
    std::vector<uint8_t> data_;
    size_t               size_ = 0;
    llama_pos            pos_  = -1;
};

}  // namespace pymoi
