#include "architecture.h"

namespace pymoi {

namespace {

// Checked against src/models/*.cpp of the llama.cpp that llama-cpp-python 0.3.36
// vendors. Every other graph is judged by the input probe; encoder-decoder models
// are refused through llama_model_has_encoder().
constexpr DeniedArchitecture kDenied[] = {
    { "graniteswitch", "its graph asserts token input (GGML_ASSERT(ubatch.token)) and would abort the process" },
    { "deepseek4",
      "it routes the experts of its first layers by input token id, which embedding input leaves undefined" },
};

}  // namespace

const DeniedArchitecture * denied_architectures(size_t * count) {
    *count = sizeof(kDenied) / sizeof(kDenied[0]);
    return kDenied;
}

const char * denial_reason(const std::string & architecture) {
    for (const DeniedArchitecture & entry : kDenied) {
        if (architecture == entry.architecture) return entry.reason;
    }
    return nullptr;
}

}  // namespace pymoi
