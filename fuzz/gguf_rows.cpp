// libFuzzer target: pymoi_embedding_rows_open / _info_get / _dequantise on a
// mutated GGUF file.
//
// The input is written as the first shard `<dir>/rows-<pid>-00001-of-00002.gguf`
// next to a valid second shard that holds a 4 x 32 F32 `token_embd.weight`
// (split.no 1, split.count 2), so that inputs declaring split.count = 2 without
// token embeddings of their own reach the split-following code. Other inputs are
// read as one file. When the file opens, every row is dequantised (ASan sees any
// read outside the mapping) and rows outside the vocabulary must be refused.
#include <unistd.h>

#include <cmath>
#include <vector>

#include "fuzz_common.h"
#include "ggml.h"
#include "gguf.h"

namespace {

std::string g_first;

void quiet(ggml_log_level, const char *, void *) {}

// The valid second shard, written with ggml's own GGUF writer.
void write_second_shard(const std::string & path) {
    ggml_init_params params = { 1024 * 1024, nullptr, false };
    ggml_context *   ctx    = ggml_init(params);
    ggml_tensor *    t      = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, 32, 4);
    ggml_set_name(t, "token_embd.weight");
    for (int i = 0; i < 32 * 4; ++i) static_cast<float *>(t->data)[i] = 0.25f * static_cast<float>(i % 7);
    gguf_context * gguf = gguf_init_empty();
    gguf_set_val_str(gguf, "general.architecture", "llama");
    gguf_set_val_u16(gguf, "split.no", 1);
    gguf_set_val_u16(gguf, "split.count", 2);
    gguf_add_tensor(gguf, t);
    fuzz::require(gguf_write_to_file(gguf, path.c_str(), false), "cannot write the second shard", path);
    gguf_free(gguf);
    ggml_free(ctx);
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int *, char ***) {
    ggml_log_set(quiet, nullptr);
    const std::string stem = fuzz::scratch_dir() + "/rows-" + std::to_string(getpid());
    g_first                = stem + "-00001-of-00002.gguf";
    write_second_shard(stem + "-00002-of-00002.gguf");
    return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t * data, size_t size) {
    fuzz::write_file(g_first, data, size);
    pymoi_embedding_rows * rows   = nullptr;
    const pymoi_status     status = pymoi_embedding_rows_open(g_first.c_str(), &rows);
    if (status != PYMOI_OK) {
        fuzz::require_clean_failure(status, "pymoi_embedding_rows_open");
        fuzz::require(rows == nullptr, "a failed open returned rows");
        return 0;
    }
    pymoi_embedding_rows_info info {};
    fuzz::require(pymoi_embedding_rows_info_get(rows, &info) == PYMOI_OK, "info_get failed on open rows");
    fuzz::require(info.n_embd >= 1 && info.n_vocab >= 1 && info.n_vocab <= INT32_MAX, "rows of an unusable shape",
                  std::to_string(info.n_vocab) + " x " + std::to_string(info.n_embd));
    std::vector<float> out(static_cast<size_t>(info.n_embd));
    const int32_t      n_vocab = static_cast<int32_t>(info.n_vocab);
    const int32_t      stride  = n_vocab > 64 ? n_vocab / 64 : 1;
    for (int32_t token = 0; token < n_vocab; token += stride) {
        fuzz::require(pymoi_embedding_rows_dequantise(rows, token, out.data()) == PYMOI_OK, "dequantise failed");
    }
    fuzz::require(pymoi_embedding_rows_dequantise(rows, n_vocab - 1, out.data()) == PYMOI_OK, "last row failed");
    for (const int32_t bad : { -1, n_vocab, INT32_MIN }) {
        if (bad >= 0 && bad < n_vocab) continue;
        const pymoi_status refused = pymoi_embedding_rows_dequantise(rows, bad, out.data());
        fuzz::require(refused == PYMOI_ERR_INVALID_ARGUMENT, "an out-of-range row was not refused");
    }
    fuzz::require(pymoi_embedding_rows_dequantise(rows, 0, nullptr) == PYMOI_ERR_INVALID_ARGUMENT, "null out accepted");
    pymoi_embedding_rows_free(rows);
    return 0;
}
