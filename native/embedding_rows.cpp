#include "embedding_rows.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

#include "gguf.h"
#include "llama.h"
#include "pymoi.h"

#if defined(_WIN32)
#    define WIN32_LEAN_AND_MEAN
#    include <windows.h>
#else
#    include <fcntl.h>
#    include <sys/mman.h>
#    include <sys/stat.h>
#    include <unistd.h>
#endif

namespace pymoi {

namespace {

constexpr const char * kTokenEmbd  = "token_embd.weight";
constexpr const char * kSplitCount = "split.count";
constexpr const char * kSplitNo    = "split.no";

// Why ggml would abort creating a tensor of this file (GGML_ASSERT in ggml_new_tensor) although
// its GGUF parser accepted the shape: a dimension of 0 beside others, or element counts whose
// product reaches INT64_MAX's quotient exactly (the fuzzer found both). Empty when none would.
std::string unrepresentable_shape(const gguf_context * gguf) {
    for (int64_t id = 0; id < gguf_get_n_tensors(gguf); ++id) {
        const int64_t * ne       = gguf_get_tensor_ne(gguf, id);
        int64_t         elements = ne[0];
        for (int i = 1; i < GGML_MAX_DIMS; ++i) {
            if (ne[i] <= 0 || INT64_MAX / ne[i] <= elements) {
                return std::string("tensor '") + gguf_get_tensor_name(gguf, id) + "' has a shape ggml cannot hold (" +
                       std::to_string(ne[0]) + " x " + std::to_string(ne[1]) + " x " + std::to_string(ne[2]) + " x " +
                       std::to_string(ne[3]) + ")";
            }
            elements *= ne[i];
        }
    }
    return "";
}

struct GgufFile {
    gguf_context * gguf = nullptr;
    ggml_context * meta = nullptr;

    explicit GgufFile(const std::string & path) {
        // The tensor infos are read without a ggml context first, so that a shape ggml would
        // abort on is refused before any tensor is made of it.
        gguf_init_params probe = { /*no_alloc =*/ true, /*ctx =*/ nullptr };
        gguf_context *   infos = gguf_init_from_file(path.c_str(), probe);
        if (!infos) return;
        const bool representable = unrepresentable_shape(infos).empty();
        gguf_free(infos);
        if (!representable) return;
        gguf_init_params params = { /*no_alloc =*/ true, /*ctx =*/ &meta };
        gguf                    = gguf_init_from_file(path.c_str(), params);
    }
    ~GgufFile() {
        if (meta) ggml_free(meta);
        if (gguf) gguf_free(gguf);
    }
    GgufFile(const GgufFile &)             = delete;
    GgufFile & operator=(const GgufFile &) = delete;
};

// What ggml's GGUF parser logged (its errors) while refusing `path`, for the error message:
// the parse is repeated with this thread's ggml log captured; other threads' lines still go
// to the logger that was set. Only on the failure path, so it costs nothing on good files.
struct LogCapture {
    std::thread::id   thread;
    std::string       text;
    ggml_log_callback previous      = nullptr;
    void *            previous_data = nullptr;
};

void capture_log(ggml_log_level level, const char * text, void * user_data) {
    auto * capture = static_cast<LogCapture *>(user_data);
    if (std::this_thread::get_id() != capture->thread) {
        if (capture->previous) capture->previous(level, text, capture->previous_data);
        return;
    }
    if (level == GGML_LOG_LEVEL_ERROR && capture->text.size() < 1000) capture->text += text;
}

std::string gguf_refusal(const std::string & path) {
    static std::mutex           mutex;
    std::lock_guard<std::mutex> lock(mutex);
    LogCapture                  capture;
    capture.thread = std::this_thread::get_id();
    ggml_log_get(&capture.previous, &capture.previous_data);
    ggml_log_set(capture_log, &capture);
    {
        gguf_init_params params = { /*no_alloc =*/ true, /*ctx =*/ nullptr };
        gguf_context *   gguf   = gguf_init_from_file(path.c_str(), params);
        if (gguf) {
            capture.text += unrepresentable_shape(gguf) + "\n";
            gguf_free(gguf);
        }
    }
    ggml_log_set(capture.previous, capture.previous_data);
    // "gguf_init_from_file_impl: invalid magic characters ...\n" lines -> "invalid magic characters ...; ..."
    std::string reasons;
    size_t      start = 0;
    while (start < capture.text.size()) {
        size_t end = capture.text.find('\n', start);
        if (end == std::string::npos) end = capture.text.size();
        std::string line = capture.text.substr(start, end - start);
        const size_t colon = line.find(": ");
        if (colon != std::string::npos && line.find(' ') > colon) line = line.substr(colon + 2);
        if (!line.empty()) reasons += (reasons.empty() ? "" : "; ") + line;
        start = end + 1;
    }
    return reasons.empty() ? "ggml's GGUF parser refused it" : reasons;
}

bool file_exists(const std::string & path) {
    FILE * f = std::fopen(path.c_str(), "rb");
    if (!f) return false;
    std::fclose(f);
    return true;
}

// Maps a whole file read-only. Returns nullptr on failure.
void * map_file(const std::string & path, size_t * size) {
#if defined(_WIN32)
    HANDLE file = CreateFileA(path.c_str(), GENERIC_READ, FILE_SHARE_READ, nullptr, OPEN_EXISTING,
                              FILE_ATTRIBUTE_NORMAL, nullptr);
    if (file == INVALID_HANDLE_VALUE) return nullptr;
    LARGE_INTEGER file_size;
    void *        base = nullptr;
    if (GetFileSizeEx(file, &file_size) && file_size.QuadPart > 0) {
        HANDLE mapping = CreateFileMappingA(file, nullptr, PAGE_READONLY, 0, 0, nullptr);
        if (mapping) {
            base = MapViewOfFile(mapping, FILE_MAP_READ, 0, 0, 0);
            CloseHandle(mapping);
        }
        *size = static_cast<size_t>(file_size.QuadPart);
    }
    CloseHandle(file);
    return base;
#else
    const int fd = ::open(path.c_str(), O_RDONLY);
    if (fd < 0) return nullptr;
    struct stat st {};
    void * base = nullptr;
    if (fstat(fd, &st) == 0 && st.st_size > 0) {
        base = mmap(nullptr, static_cast<size_t>(st.st_size), PROT_READ, MAP_SHARED, fd, 0);
        if (base == MAP_FAILED) {
            base = nullptr;
        } else {
            *size = static_cast<size_t>(st.st_size);
        }
    }
    ::close(fd);
    return base;
#endif
}

void unmap_file(void * base, size_t size) {
#if defined(_WIN32)
    (void) size;
    UnmapViewOfFile(base);
#else
    munmap(base, size);
#endif
}

// split.no / split.count of a GGUF file (-1 where absent or not uint16).
int64_t split_value(const GgufFile & file, const char * key) {
    const int64_t id = gguf_find_key(file.gguf, key);
    if (id < 0 || gguf_get_kv_type(file.gguf, id) != GGUF_TYPE_UINT16) return -1;
    return gguf_get_val_u16(file.gguf, id);
}

// An unsigned or signed integer KV as int64 (-1 where absent or of another type).
int64_t integer_value(const GgufFile & file, const std::string & key) {
    const int64_t id = gguf_find_key(file.gguf, key.c_str());
    if (id < 0) return -1;
    switch (gguf_get_kv_type(file.gguf, id)) {
        case GGUF_TYPE_UINT32: return gguf_get_val_u32(file.gguf, id);
        case GGUF_TYPE_INT32:  return gguf_get_val_i32(file.gguf, id);
        case GGUF_TYPE_UINT64: return static_cast<int64_t>(std::min<uint64_t>(gguf_get_val_u64(file.gguf, id), INT64_MAX));
        case GGUF_TYPE_INT64:  return gguf_get_val_i64(file.gguf, id);
        default:               return -1;
    }
}

// The model's declared width of a token row, <arch>.embedding_length (-1 if not declared).
int64_t metadata_n_embd(const GgufFile & file) {
    const int64_t id = gguf_find_key(file.gguf, "general.architecture");
    if (id < 0 || gguf_get_kv_type(file.gguf, id) != GGUF_TYPE_STRING) return -1;
    return integer_value(file, std::string(gguf_get_val_str(file.gguf, id)) + ".embedding_length");
}

// The vocabulary size the tokenizer declares (-1 if it declares none).
int64_t metadata_n_vocab(const GgufFile & file) {
    const int64_t id = gguf_find_key(file.gguf, "tokenizer.ggml.tokens");
    if (id < 0 || gguf_get_kv_type(file.gguf, id) != GGUF_TYPE_ARRAY) return -1;
    return static_cast<int64_t>(gguf_get_arr_n(file.gguf, id));
}

// Path of the split that holds token_embd.weight ("" if none does, with
// `error` set when a split is missing or belongs to another model). Every split
// of a split model is checked, wherever the tensor is: llama.cpp needs them all.
std::string find_tensor_file(const std::string & path, const GgufFile & first, std::string * error) {
    std::string   holder      = gguf_find_tensor(first.gguf, kTokenEmbd) >= 0 ? path : "";
    const int64_t split_count = split_value(first, kSplitCount);
    if (split_count < 2) return holder;
    std::vector<char> prefix(path.size() + 1);
    if (llama_split_prefix(prefix.data(), prefix.size(), path.c_str(), 0, static_cast<int>(split_count)) <= 0) {
        *error = "'" + path + "' declares " + std::to_string(split_count) +
                 " splits but is not named like the first split (PREFIX-00001-of-NNNNN.gguf)";
        return "";
    }
    std::vector<char> split_path(path.size() + 32);
    for (int i = 1; i < split_count; ++i) {
        llama_split_path(split_path.data(), split_path.size(), prefix.data(), i, static_cast<int>(split_count));
        const std::string name(split_path.data());
        if (!file_exists(name)) {
            *error = "split " + std::to_string(i + 1) + " of " + std::to_string(split_count) + " of '" + path +
                     "' is missing: '" + name + "'";
            return "";
        }
        GgufFile split(name);
        if (!split.gguf) {
            *error = "split '" + name + "' of '" + path + "' is not a valid GGUF file: " + gguf_refusal(name);
            return "";
        }
        // A shard of another model (or another shard of this one) would hand out wrong rows.
        const int64_t count = split_value(split, kSplitCount);
        const int64_t index = split_value(split, kSplitNo);
        if (count != split_count || index != i) {
            *error = "split '" + name + "' does not belong with '" + path + "': it says it is split.no " +
                     std::to_string(index) + " of split.count " + std::to_string(count) + ", expected " +
                     std::to_string(i) + " of " + std::to_string(split_count);
            return "";
        }
        if (holder.empty() && gguf_find_tensor(split.gguf, kTokenEmbd) >= 0) holder = name;
    }
    return holder;
}

}  // namespace

int lora_changes_token_embeddings(const std::string & path, bool * changes, std::string * error) {
    GgufFile adapter(path);
    if (!adapter.gguf) {
        *error = "cannot read the LoRA adapter '" + path + "' as a GGUF file";
        return PYMOI_ERR_FORMAT;
    }
    *changes                 = false;
    const std::string prefix = kTokenEmbd;
    for (int64_t i = 0; i < gguf_get_n_tensors(adapter.gguf); ++i) {
        *changes = *changes || std::string(gguf_get_tensor_name(adapter.gguf, i)).rfind(prefix, 0) == 0;
    }
    return PYMOI_OK;
}

std::unique_ptr<EmbeddingRows> EmbeddingRows::open(const std::string & path, int * status, std::string * error) {
    if (!file_exists(path)) {
        *status = PYMOI_ERR_IO;
        *error  = "model file '" + path + "' does not exist or cannot be read";
        return nullptr;
    }
    std::string tensor_path;
    int64_t     expected_n_embd  = -1;
    int64_t     expected_n_vocab = -1;
    {
        GgufFile first(path);
        if (!first.gguf) {
            *status = PYMOI_ERR_FORMAT;
            *error  = "'" + path + "' is not a valid GGUF file: " + gguf_refusal(path);
            return nullptr;
        }
        tensor_path = find_tensor_file(path, first, error);
        expected_n_embd  = metadata_n_embd(first);
        expected_n_vocab = metadata_n_vocab(first);
    }
    if (tensor_path.empty()) {
        *status = PYMOI_ERR_FORMAT;
        if (error->empty()) {
            *error = "'" + path + "' has no token embeddings (tensor '" + kTokenEmbd + "')";
        }
        return nullptr;
    }

    GgufFile      file(tensor_path);
    const int64_t id = file.gguf ? gguf_find_tensor(file.gguf, kTokenEmbd) : -1;
    if (id < 0) {
        *status = PYMOI_ERR_FORMAT;
        *error  = "cannot read tensor '" + std::string(kTokenEmbd) + "' from '" + tensor_path + "'";
        return nullptr;
    }
    const ggml_tensor * tensor = ggml_get_tensor(file.meta, kTokenEmbd);
    const ggml_type     type   = gguf_get_tensor_type(file.gguf, id);
    const auto *        traits = ggml_get_type_traits(type);
    if (type != GGML_TYPE_F32 && traits->to_float == nullptr) {
        *status = PYMOI_ERR_UNSUPPORTED;
        *error  = std::string("token embeddings of type ") + ggml_type_name(type) + " cannot be dequantised";
        return nullptr;
    }

    // gguf_init_from_file has checked the type, that ne[0] is a whole number of blocks and that the
    // tensor's byte size does not overflow; the shape and the bounds in the file are ours to check.
    if (tensor->ne[2] != 1 || tensor->ne[3] != 1 || tensor->ne[0] < 1 || tensor->ne[1] < 1) {
        *status = PYMOI_ERR_FORMAT;
        *error  = "'" + tensor_path + "': tensor '" + kTokenEmbd + "' has shape [" + std::to_string(tensor->ne[0]) +
                 ", " + std::to_string(tensor->ne[1]) + ", " + std::to_string(tensor->ne[2]) + ", " +
                 std::to_string(tensor->ne[3]) + "]; token embeddings are a non-empty n_embd x n_vocab matrix";
        return nullptr;
    }
    if ((expected_n_embd >= 0 && tensor->ne[0] != expected_n_embd) || tensor->ne[1] < expected_n_vocab) {
        *status = PYMOI_ERR_FORMAT;
        *error  = "'" + tensor_path + "': tensor '" + kTokenEmbd + "' is " + std::to_string(tensor->ne[1]) + " x " +
                 std::to_string(tensor->ne[0]) + " but the model declares " + std::to_string(expected_n_vocab) +
                 " tokens of " + std::to_string(expected_n_embd) + " floats";
        return nullptr;
    }
    if (tensor->ne[1] > INT32_MAX) {
        *status = PYMOI_ERR_FORMAT;
        *error  = "'" + tensor_path + "': tensor '" + kTokenEmbd + "' has " + std::to_string(tensor->ne[1]) +
                 " rows, more than 32-bit token ids can address";
        return nullptr;
    }

    std::unique_ptr<EmbeddingRows> rows(new EmbeddingRows());
    rows->n_embd_   = tensor->ne[0];
    rows->n_vocab_  = tensor->ne[1];
    rows->type_     = type;
    rows->to_float_ = traits->to_float;
    rows->row_size_ = ggml_row_size(type, rows->n_embd_);

    const size_t data_offset   = gguf_get_data_offset(file.gguf);
    const size_t tensor_offset = gguf_get_tensor_offset(file.gguf, id);
    rows->mapping_             = map_file(tensor_path, &rows->mapping_size_);
    if (rows->mapping_ == nullptr) {
        *status = PYMOI_ERR_IO;
        *error  = "cannot memory-map '" + tensor_path + "'";
        return nullptr;
    }
    // Every tensor's data must lie in the file, not only ours: a truncated file is refused here
    // rather than by llama.cpp later. Compared without sums that could wrap past 2^64: the
    // offsets and sizes come from the file.
    const size_t size = rows->mapping_size_;
    if (data_offset > size) {
        *status = PYMOI_ERR_FORMAT;
        *error  = "'" + tensor_path + "' is truncated: its tensor data would start at byte " +
                 std::to_string(data_offset) + " of a " + std::to_string(size) + "-byte file";
        return nullptr;
    }
    for (int64_t t = 0; t < gguf_get_n_tensors(file.gguf); ++t) {
        const size_t begin = gguf_get_tensor_offset(file.gguf, t);
        const size_t bytes = gguf_get_tensor_size(file.gguf, t);
        if (begin > size - data_offset || bytes > size - data_offset - begin) {
            *status = PYMOI_ERR_FORMAT;
            *error  = "'" + tensor_path + "' is truncated: tensor '" + gguf_get_tensor_name(file.gguf, t) + "' (" +
                     std::to_string(bytes) + " bytes at byte " + std::to_string(data_offset) + " + " +
                     std::to_string(begin) + ") ends past the end of the " + std::to_string(size) + "-byte file";
            return nullptr;
        }
    }
    const size_t offset = data_offset + tensor_offset;
    rows->first_row_ = static_cast<const uint8_t *>(rows->mapping_) + offset;
    return rows;
}

EmbeddingRows::~EmbeddingRows() {
    if (mapping_) unmap_file(mapping_, mapping_size_);
}

void EmbeddingRows::dequantise(int32_t token, float * out) const {
    const uint8_t * row = first_row_ + row_size_ * static_cast<size_t>(token);
    if (type_ == GGML_TYPE_F32) {
        std::memcpy(out, row, row_size_);
    } else {
        to_float_(row, out, n_embd_);
    }
}

}  // namespace pymoi
