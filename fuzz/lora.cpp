// libFuzzer target: pymoi_lora_changes_token_embeddings on a mutated GGUF file
// (the LoRA adapter check reads a user-supplied file before llama.cpp does).
#include <unistd.h>

#include "fuzz_common.h"
#include "ggml.h"

namespace {
std::string g_path;
void        quiet(ggml_log_level, const char *, void *) {}
}  // namespace

extern "C" int LLVMFuzzerInitialize(int *, char ***) {
    ggml_log_set(quiet, nullptr);
    g_path = fuzz::scratch_dir() + "/lora-" + std::to_string(getpid()) + ".gguf";
    return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t * data, size_t size) {
    fuzz::write_file(g_path, data, size);
    bool               changes = false;
    const pymoi_status status  = pymoi_lora_changes_token_embeddings(g_path.c_str(), &changes);
    if (status != PYMOI_OK) {
        fuzz::require(status == PYMOI_ERR_FORMAT, "a bad adapter gave a status other than PYMOI_ERR_FORMAT");
        fuzz::require_clean_failure(status, "pymoi_lora_changes_token_embeddings");
    }
    return 0;
}
