// How each model architecture treats its token input, as far as MoI cares.
#pragma once

#include <string>

namespace pymoi {

struct TokenInputPolicy {
    bool  supported = true;
    // Factor the graph applies to token-path embeddings only (not to
    // embedding input), which a mixed input must therefore carry itself.
    float token_only_scale = 1.0f;
    // Why a mixed input cannot stand in for the tokens, when !supported.
    std::string reason;
};

// `n_embd` is the model's input width.
TokenInputPolicy token_input_policy(const std::string & architecture, int n_embd);

}  // namespace pymoi
