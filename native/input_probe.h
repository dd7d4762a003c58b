// The load-time input probe: whether a model computes the same logits from
// pymoi's embedding rows as from token ids, and with which input scale.
#pragma once

#include <string>

#include "llama.h"

namespace pymoi {

class MixtureInput;

// Threads the probe decodes with: those of the context MoI will run on (a model
// that decodes on one thread may crash on more).
struct ProbeThreads {
    int32_t n_threads       = 1;
    int32_t n_threads_batch = 1;
};

struct ProbeVerdict {
    bool        supported   = false;
    float       input_scale = 1.0f;   // factor the rows carry: 1, or sqrt(n_embd) where only token input is scaled
    bool        exact       = true;   // logits compared for bitwise equality (CPU) rather than within a tolerance
    double      seconds     = 0.0;    // time the probe took when it ran
    bool        cached      = false;  // the verdict was kept from an earlier probe of the same model file
    std::string reason;               // why not, when !supported
};

// Decodes a few tokens once as token ids and once as rows made by `input` (with
// its positions), in a context of its own on `model`, and compares the logits.
// The caller's contexts are not touched. The verdict is kept per model file
// (path, size, modification time) for the life of the process.
ProbeVerdict probe_input(const llama_model * model, const std::string & model_path, const MixtureInput & input,
                         ProbeThreads threads);

}  // namespace pymoi
