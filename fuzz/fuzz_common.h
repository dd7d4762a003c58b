// Shared helpers of the libFuzzer targets in fuzz/ (see fuzz/run.py).
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "pymoi.h"

namespace fuzz {

// Aborts (a finding for libFuzzer) with a message when `ok` is false.
inline void require(bool ok, const char * what, const std::string & detail = "") {
    if (ok) return;
    std::fprintf(stderr, "fuzz invariant violated: %s %s\n", what, detail.c_str());
    std::abort();
}

// A failed pymoi call must have a known status and say what is wrong.
inline void require_clean_failure(pymoi_status status, const char * call) {
    require(status > PYMOI_OK && status <= PYMOI_ERR_INTERNAL, call, "returned an unknown status");
    require(std::strlen(pymoi_last_error()) > 0, call, "failed without a message");
}

// Reads fixed-size values from the front of a fuzz input; zeros once it runs out.
class Reader {
  public:
    Reader(const uint8_t * data, size_t size) : data_(data), size_(size) {}
    template <typename T> T take() {
        T value {};
        const size_t n = sizeof(T) < size_ ? sizeof(T) : size_;
        std::memcpy(&value, data_, n);
        data_ += n;
        size_ -= n;
        return value;
    }
    const uint8_t * rest() const { return data_; }
    size_t          remaining() const { return size_; }
    bool            empty() const { return size_ == 0; }

  private:
    const uint8_t * data_;
    size_t          size_;
};

// A scratch directory for files the targets write ($PYMOI_FUZZ_TMP, else /tmp).
inline std::string scratch_dir() {
    const char * dir = std::getenv("PYMOI_FUZZ_TMP");
    return dir && *dir ? dir : "/tmp";
}

inline void write_file(const std::string & path, const uint8_t * data, size_t size) {
    FILE * f = std::fopen(path.c_str(), "wb");
    require(f != nullptr, "cannot write", path);
    require(std::fwrite(data, 1, size, f) == size || size == 0, "short write", path);
    std::fclose(f);
}

}  // namespace fuzz
