// Architectures whose graph aborts on embedding input, so that the input probe
// (input_probe.h) cannot even run on them.
#pragma once

#include <cstddef>
#include <string>

namespace pymoi {

struct DeniedArchitecture {
    const char * architecture;  // GGUF general.architecture
    const char * reason;
};

// The deny list: `count` entries.
const DeniedArchitecture * denied_architectures(size_t * count);

// Why `architecture` is on the deny list, or nullptr.
const char * denial_reason(const std::string & architecture);

}  // namespace pymoi
