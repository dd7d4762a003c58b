#include "architecture.h"

#include <cmath>
#include <cstring>

namespace pymoi {

namespace {

// Graphs that read the input token ids beyond the embedding lookup (checked
// against llama.cpp's src/models/*.cpp as vendored by llama-cpp-python 0.3.36).
struct Refusal {
    const char * architecture;
    const char * reason;
};

constexpr Refusal kRefused[] = {
    { "gemma3n", "it adds per-layer embeddings looked up from the input token ids" },
    { "gemma4", "it adds per-layer embeddings looked up from the input token ids" },
    { "cogvlm", "it selects text or image weights by whether the input is token ids" },
    { "deepseek4", "it routes experts by input token id" },
    { "granite-switch", "its graph requires token input" },
    { "t5", "it is an encoder-decoder model" },
    { "t5encoder", "it is an encoder model" },
};

// Graphs that scale token embeddings by sqrt(n_embd) but leave embedding input
// as given: `ggml_scale(inpL, ubatch.token ? sqrtf(n_embd) : 1.0f)`.
constexpr const char * kSqrtScaledTokens[] = { "gemma3", "gemma-embedding" };

}  // namespace

TokenInputPolicy token_input_policy(const std::string & architecture, int n_embd) {
    TokenInputPolicy policy;
    for (const Refusal & refusal : kRefused) {
        if (architecture == refusal.architecture) {
            policy.supported = false;
            policy.reason    = "architecture '" + architecture + "' cannot take a mixture of inputs: " + refusal.reason;
            return policy;
        }
    }
    for (const char * name : kSqrtScaledTokens) {
        if (architecture == name) {
            policy.token_only_scale = sqrtf(static_cast<float>(n_embd));
        }
    }
    return policy;
}

}  // namespace pymoi
