// Rows of the token-embedding matrix, straight from the memory-mapped GGUF file.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "ggml.h"

namespace pymoi {

// Whether the LoRA adapter file at `path` has tensors for the token embeddings,
// which llama.cpp adds on the token path only. Returns a pymoi_status; `error`
// is set when the file is not a readable GGUF.
int lora_changes_token_embeddings(const std::string & path, bool * changes, std::string * error);

class EmbeddingRows {
  public:
    // Maps the file (or the split of a split model) holding token_embd.weight.
    // Returns nullptr with `error` set, and `status` set to a pymoi_status,
    // when that fails.
    static std::unique_ptr<EmbeddingRows> open(const std::string & path, int * status, std::string * error);
    ~EmbeddingRows();
    EmbeddingRows(const EmbeddingRows &)             = delete;
    EmbeddingRows & operator=(const EmbeddingRows &) = delete;

    int64_t   n_embd() const { return n_embd_; }
    int64_t   n_vocab() const { return n_vocab_; }
    ggml_type type() const { return type_; }

    // Dequantises row `token` into `out` (n_embd floats).
    void dequantise(int32_t token, float * out) const;

  private:
    EmbeddingRows() = default;

    void *              mapping_      = nullptr;
    size_t              mapping_size_ = 0;
    const uint8_t *     first_row_    = nullptr;
    size_t              row_size_     = 0;
    int64_t             n_embd_       = 0;
    int64_t             n_vocab_      = 0;
    ggml_type           type_         = GGML_TYPE_F32;
    ggml_to_float_t     to_float_     = nullptr;
};

}  // namespace pymoi
