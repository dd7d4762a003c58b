#include "embedding_rows.h"

#include <cstring>
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

struct GgufFile {
    gguf_context * gguf = nullptr;
    ggml_context * meta = nullptr;

    explicit GgufFile(const std::string & path) {
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

// Path of the split that holds token_embd.weight ("" if none does).
std::string find_tensor_file(const std::string & path, const GgufFile & first, std::string * error) {
    if (gguf_find_tensor(first.gguf, kTokenEmbd) >= 0) return path;
    const int64_t key = gguf_find_key(first.gguf, kSplitCount);
    if (key < 0 || gguf_get_kv_type(first.gguf, key) != GGUF_TYPE_UINT16) return "";
    const int split_count = gguf_get_val_u16(first.gguf, key);
    std::vector<char> prefix(path.size() + 1);
    if (llama_split_prefix(prefix.data(), prefix.size(), path.c_str(), 0, split_count) <= 0) {
        *error = "'" + path + "' declares " + std::to_string(split_count) +
                 " splits but is not named like the first split (PREFIX-00001-of-NNNNN.gguf)";
        return "";
    }
    std::vector<char> split_path(path.size() + 32);
    for (int i = 1; i < split_count; ++i) {
        llama_split_path(split_path.data(), split_path.size(), prefix.data(), i, split_count);
        GgufFile split(split_path.data());
        if (!split.gguf) {
            *error = "cannot read split '" + std::string(split_path.data()) + "' of '" + path + "'";
            return "";
        }
        if (gguf_find_tensor(split.gguf, kTokenEmbd) >= 0) return split_path.data();
    }
    return "";
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
    {
        GgufFile first(path);
        if (!first.gguf) {
            *status = PYMOI_ERR_FORMAT;
            *error  = "'" + path + "' is not a valid GGUF file (bad magic, unsupported version or truncated header)";
            return nullptr;
        }
        tensor_path = find_tensor_file(path, first, error);
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

    std::unique_ptr<EmbeddingRows> rows(new EmbeddingRows());
    rows->n_embd_   = tensor->ne[0];
    rows->n_vocab_  = tensor->ne[1];
    rows->type_     = type;
    rows->to_float_ = traits->to_float;
    rows->row_size_ = ggml_row_size(type, rows->n_embd_);

    const size_t offset = gguf_get_data_offset(file.gguf) + gguf_get_tensor_offset(file.gguf, id);
    const size_t nbytes = rows->row_size_ * static_cast<size_t>(rows->n_vocab_);
    rows->mapping_      = map_file(tensor_path, &rows->mapping_size_);
    if (rows->mapping_ == nullptr) {
        *status = PYMOI_ERR_IO;
        *error  = "cannot memory-map '" + tensor_path + "'";
        return nullptr;
    }
    if (offset + nbytes > rows->mapping_size_) {
        *status = PYMOI_ERR_FORMAT;
        *error  = "'" + tensor_path + "' is truncated: token embeddings end at byte " +
                 std::to_string(offset + nbytes) + " of a " + std::to_string(rows->mapping_size_) + "-byte file";
        return nullptr;
    }
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
