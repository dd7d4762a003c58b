// The C ABI of pymoi.h over the C++ core: status codes and a per-thread last
// error instead of exceptions.
#include <algorithm>
#include <new>
#include <string>
#include <vector>

#include "architecture.h"
#include "batch_step.h"
#include "decode_step.h"
#include "embedding_rows.h"
#include "mixer.h"
#include "mixture_input.h"
#include "pymoi.h"
#include "seq_checkpoint.h"
#include "soft_thinking.h"

struct pymoi_embedding_rows {
    std::unique_ptr<pymoi::EmbeddingRows> rows;
};

struct pymoi_session {
    std::unique_ptr<pymoi::MixtureInput> input;
    std::unique_ptr<pymoi::DecodeStep>   step;
};

struct pymoi_batch {
    std::unique_ptr<pymoi::BatchStep> step;
};

struct pymoi_checkpoint {
    pymoi::SeqCheckpoint checkpoint;
};

namespace {

thread_local std::string g_last_error;

pymoi_status fail(pymoi_status status, std::string message) {
    g_last_error = std::move(message);
    return status;
}

pymoi_status to_status(int status, std::string & error) {
    if (status == PYMOI_OK) return PYMOI_OK;
    return fail(static_cast<pymoi_status>(status), std::move(error));
}

// Runs `body`, turning any C++ exception into PYMOI_ERR_INTERNAL.
template <typename Body> pymoi_status guarded(Body body) {
    try {
        g_last_error.clear();
        return body();
    } catch (const std::bad_alloc &) {
        return fail(PYMOI_ERR_INTERNAL, "out of memory");
    } catch (const std::exception & e) {
        return fail(PYMOI_ERR_INTERNAL, e.what());
    } catch (...) {
        return fail(PYMOI_ERR_INTERNAL, "unknown C++ exception");
    }
}

}  // namespace

extern "C" {

const char * pymoi_last_error(void) {
    return g_last_error.c_str();
}

bool pymoi_beta_is_valid(float beta) {
    return pymoi::beta_is_valid(beta);
}

pymoi_status pymoi_mixture_weights(const float * logits, int32_t n_vocab, int32_t token, float beta, int32_t top_k,
                                   int32_t * out_ids, float * out_weights, int32_t * out_n) {
    return guarded([&] {
        if (logits == nullptr || out_ids == nullptr || out_weights == nullptr || out_n == nullptr) {
            return fail(PYMOI_ERR_INVALID_ARGUMENT, "logits and output arrays must not be null");
        }
        if (n_vocab < 1) return fail(PYMOI_ERR_INVALID_ARGUMENT, "n_vocab must be at least 1");
        if (token < 0 || token >= n_vocab) {
            return fail(PYMOI_ERR_INVALID_ARGUMENT, "token " + std::to_string(token) + " is outside the vocabulary [0, " +
                                                        std::to_string(n_vocab) + ")");
        }
        if (top_k < 1 || top_k > n_vocab) {
            return fail(PYMOI_ERR_INVALID_ARGUMENT, "top_k must be between 1 and n_vocab " + std::to_string(n_vocab) +
                                                        "; got " + std::to_string(top_k));
        }
        if (!pymoi::beta_is_valid(beta)) {
            return fail(PYMOI_ERR_INVALID_ARGUMENT,
                        "beta must be >= 0, +inf, or <= -99 for the direct mixture; got " + std::to_string(beta));
        }
        pymoi::select_top_k(logits, n_vocab, top_k, out_ids);
        std::string   error;
        const int32_t n = pymoi::mixture_weights(logits, top_k, token, beta, out_ids, out_weights, &error);
        if (n < 0) return fail(PYMOI_ERR_INVALID_ARGUMENT, error);
        *out_n = n;
        return PYMOI_OK;
    });
}

pymoi_status pymoi_select_top_k(const float * logits, int32_t n_vocab, int32_t top_k, int32_t * out_ids) {
    if (logits == nullptr || out_ids == nullptr) {
        return fail(PYMOI_ERR_INVALID_ARGUMENT, "logits and out_ids must not be null");
    }
    if (n_vocab < 1 || top_k < 1 || top_k > n_vocab) {
        return fail(PYMOI_ERR_INVALID_ARGUMENT, "top_k must be between 1 and n_vocab >= 1; got top_k " +
                                                    std::to_string(top_k) + ", n_vocab " + std::to_string(n_vocab));
    }
    pymoi::select_top_k(logits, n_vocab, top_k, out_ids);
    return PYMOI_OK;
}

pymoi_status pymoi_concept_weights(const float * logits, int32_t n_vocab, const pymoi_soft_thinking * settings,
                                   const float * gumbel, int32_t * out_ids, float * out_weights, int32_t * out_n,
                                   float * out_entropy) {
    return guarded([&] {
        if (logits == nullptr || settings == nullptr || out_ids == nullptr || out_weights == nullptr || out_n == nullptr ||
            out_entropy == nullptr) {
            return fail(PYMOI_ERR_INVALID_ARGUMENT, "logits, settings and the out pointers must not be null");
        }
        std::string error;
        if (n_vocab < 2) return fail(PYMOI_ERR_INVALID_ARGUMENT, "n_vocab must be at least 2 (two tags)");
        const int status = pymoi::check_soft_thinking(*settings, n_vocab, &error);
        if (status != PYMOI_OK) return to_status(status, error);
        pymoi::select_top_k(logits, n_vocab, settings->top_k, out_ids);
        const int32_t n = pymoi::concept_weights(logits, n_vocab, out_ids, *settings, gumbel, out_weights, out_entropy, &error);
        if (n < 0) return fail(PYMOI_ERR_INVALID_ARGUMENT, error);
        *out_n = n;
        return PYMOI_OK;
    });
}

bool pymoi_denied_architecture(int32_t i, const char ** out_architecture, const char ** out_reason) {
    size_t                            count   = 0;
    const pymoi::DeniedArchitecture * entries = pymoi::denied_architectures(&count);
    if (i < 0 || static_cast<size_t>(i) >= count || out_architecture == nullptr || out_reason == nullptr) return false;
    *out_architecture = entries[i].architecture;
    *out_reason       = entries[i].reason;
    return true;
}

pymoi_status pymoi_embedding_rows_open(const char * gguf_path, pymoi_embedding_rows ** out_rows) {
    return guarded([&] {
        if (gguf_path == nullptr || out_rows == nullptr) {
            return fail(PYMOI_ERR_INVALID_ARGUMENT, "path and out_rows must not be null");
        }
        int         status = PYMOI_OK;
        std::string error;
        auto        rows = pymoi::EmbeddingRows::open(gguf_path, &status, &error);
        if (!rows) return to_status(status, error);
        *out_rows = new pymoi_embedding_rows { std::move(rows) };
        return PYMOI_OK;
    });
}

void pymoi_embedding_rows_free(pymoi_embedding_rows * rows) {
    delete rows;
}

pymoi_status pymoi_embedding_rows_info_get(const pymoi_embedding_rows * rows, pymoi_embedding_rows_info * out_info) {
    if (rows == nullptr || out_info == nullptr) {
        return fail(PYMOI_ERR_INVALID_ARGUMENT, "rows and out_info must not be null");
    }
    out_info->n_embd    = rows->rows->n_embd();
    out_info->n_vocab   = rows->rows->n_vocab();
    out_info->ggml_type = rows->rows->type();
    return PYMOI_OK;
}

pymoi_status pymoi_embedding_rows_dequantise(const pymoi_embedding_rows * rows, int32_t token, float * out) {
    if (rows == nullptr || out == nullptr) return fail(PYMOI_ERR_INVALID_ARGUMENT, "rows and out must not be null");
    if (token < 0 || token >= rows->rows->n_vocab()) {
        return fail(PYMOI_ERR_INVALID_ARGUMENT, "token " + std::to_string(token) + " is outside the vocabulary [0, " +
                                                    std::to_string(rows->rows->n_vocab()) + ")");
    }
    rows->rows->dequantise(token, out);
    return PYMOI_OK;
}

pymoi_status pymoi_sample(const float * logits, int32_t n_vocab, llama_sampler * sampler, int32_t top_k,
                          int32_t chain_top_k, llama_token_data * candidates, int32_t * out_ids, llama_token * out_token) {
    return guarded([&] {
        if (logits == nullptr || sampler == nullptr || candidates == nullptr || out_ids == nullptr || out_token == nullptr) {
            return fail(PYMOI_ERR_INVALID_ARGUMENT, "logits, sampler, candidates, out_ids and out_token must not be null");
        }
        if (n_vocab < 1 || top_k < 1 || top_k > n_vocab || chain_top_k < 0) {
            return fail(PYMOI_ERR_INVALID_ARGUMENT, "pymoi_sample needs 1 <= top_k <= n_vocab and chain_top_k >= 0");
        }
        std::vector<int32_t> ids(static_cast<size_t>(std::max(top_k, std::min(chain_top_k, n_vocab))));
        const llama_token    token = pymoi::sample_and_select(logits, n_vocab, sampler, top_k, chain_top_k, ids.data(), candidates);
        if (token < 0) return fail(PYMOI_ERR_INTERNAL, "the sampler selected no token");
        std::copy(ids.begin(), ids.begin() + top_k, out_ids);
        *out_token = token;
        return PYMOI_OK;
    });
}

pymoi_status pymoi_host_time_measure(const pymoi_embedding_rows * rows, const float * logits, int32_t n_sets,
                                     int32_t n_vocab, const llama_token * tokens, float beta, int32_t top_k,
                                     int32_t n_tokens, pymoi_host_time * out) {
    return guarded([&] {
        if (rows == nullptr || logits == nullptr || tokens == nullptr || out == nullptr) {
            return fail(PYMOI_ERR_INVALID_ARGUMENT, "rows, logits, tokens and out must not be null");
        }
        pymoi::HostTime time;
        std::string     error;
        const int status =
            pymoi::measure_host_time(*rows->rows, logits, n_sets, n_vocab, tokens, beta, top_k, n_tokens, &time, &error);
        if (status != PYMOI_OK) return to_status(status, error);
        out->select_us  = time.select_us;
        out->weights_us = time.weights_us;
        out->mix_us     = time.mix_us;
        out->stock_sample_us  = time.stock_sample_us;
        out->shared_sample_us = time.shared_sample_us;
        return PYMOI_OK;
    });
}

pymoi_status pymoi_lora_changes_token_embeddings(const char * lora_path, bool * out_changes) {
    return guarded([&] {
        if (lora_path == nullptr || out_changes == nullptr) {
            return fail(PYMOI_ERR_INVALID_ARGUMENT, "lora_path and out_changes must not be null");
        }
        std::string error;
        return to_status(pymoi::lora_changes_token_embeddings(lora_path, out_changes, &error), error);
    });
}

pymoi_status pymoi_session_open(llama_model * model, llama_context * ctx, const char * model_path,
                                pymoi_session ** out_session) {
    return guarded([&] {
        if (model == nullptr || ctx == nullptr || model_path == nullptr || out_session == nullptr) {
            return fail(PYMOI_ERR_INVALID_ARGUMENT, "model, ctx, model_path and out_session must not be null");
        }
        int         status = PYMOI_OK;
        std::string error;
        const pymoi::ProbeThreads threads { llama_n_threads(ctx), llama_n_threads_batch(ctx) };
        auto input = pymoi::MixtureInput::open(model, model_path, threads, &status, &error);
        if (!input) return to_status(status, error);
        auto step    = std::make_unique<pymoi::DecodeStep>(*input, ctx);
        *out_session = new pymoi_session { std::move(input), std::move(step) };
        return PYMOI_OK;
    });
}

void pymoi_session_free(pymoi_session * session) {
    delete session;
}

pymoi_status pymoi_session_info_get(const pymoi_session * session, pymoi_session_info * out_info) {
    if (session == nullptr || out_info == nullptr) {
        return fail(PYMOI_ERR_INVALID_ARGUMENT, "session and out_info must not be null");
    }
    const pymoi::ProbeVerdict & verdict = session->input->verdict();
    out_info->n_embd                    = session->input->n_embd();
    out_info->n_pos_per_row             = session->input->n_pos_per_row();
    out_info->input_scale               = verdict.input_scale;
    out_info->probe_exact               = verdict.exact;
    out_info->probe_cached              = verdict.cached;
    out_info->probe_seconds             = verdict.seconds;
    return PYMOI_OK;
}

pymoi_status pymoi_session_begin(pymoi_session * session, float beta, int32_t top_k) {
    return guarded([&] {
        if (session == nullptr) return fail(PYMOI_ERR_INVALID_ARGUMENT, "session must not be null");
        std::string error;
        return to_status(session->step->begin(beta, top_k, &error), error);
    });
}

pymoi_status pymoi_session_share_top_k(pymoi_session * session, int32_t chain_top_k) {
    return guarded([&] {
        if (session == nullptr) return fail(PYMOI_ERR_INVALID_ARGUMENT, "session must not be null");
        std::string error;
        return to_status(session->step->share_top_k(chain_top_k, &error), error);
    });
}

pymoi_status pymoi_session_step(pymoi_session * session, llama_sampler * sampler, int32_t n_past,
                                llama_token * out_token) {
    return guarded([&] {
        if (session == nullptr || out_token == nullptr) {
            return fail(PYMOI_ERR_INVALID_ARGUMENT, "session and out_token must not be null");
        }
        std::string error;
        return to_status(session->step->step(sampler, n_past, out_token, &error), error);
    });
}

pymoi_status pymoi_session_flush(pymoi_session * session, int32_t n_past) {
    return guarded([&] {
        if (session == nullptr) return fail(PYMOI_ERR_INVALID_ARGUMENT, "session must not be null");
        std::string error;
        return to_status(session->step->flush(n_past, &error), error);
    });
}

pymoi_status pymoi_session_soft_thinking(pymoi_session * session, const pymoi_soft_thinking * settings) {
    return guarded([&] {
        if (session == nullptr) return fail(PYMOI_ERR_INVALID_ARGUMENT, "session must not be null");
        std::string error;
        return to_status(session->step->soft_thinking(settings, &error), error);
    });
}

pymoi_status pymoi_session_thinking_info(const pymoi_session * session, pymoi_thinking_info * out_info) {
    if (session == nullptr || out_info == nullptr) {
        return fail(PYMOI_ERR_INVALID_ARGUMENT, "session and out_info must not be null");
    }
    *out_info = session->step->thinking_info();
    return PYMOI_OK;
}

bool pymoi_session_has_pending(const pymoi_session * session) {
    return session != nullptr && session->step->has_pending();
}

pymoi_status pymoi_batch_open(pymoi_session * session, llama_context * ctx, int32_t n_seq, bool checkpoint_prompts,
                              pymoi_batch ** out_batch) {
    return guarded([&] {
        if (session == nullptr || ctx == nullptr || out_batch == nullptr) {
            return fail(PYMOI_ERR_INVALID_ARGUMENT, "session, ctx and out_batch must not be null");
        }
        int         status = PYMOI_OK;
        std::string error;
        auto        step = pymoi::BatchStep::open(*session->input, ctx, n_seq, checkpoint_prompts, &status, &error);
        if (!step) return to_status(status, error);
        *out_batch = new pymoi_batch { std::move(step) };
        return PYMOI_OK;
    });
}

void pymoi_batch_free(pymoi_batch * batch) {
    delete batch;
}

pymoi_status pymoi_batch_add(pymoi_batch * batch, int32_t seq, llama_sampler * sampler, float beta, int32_t top_k,
                             const llama_token * tokens, int32_t n_tokens, int32_t n_keep, int32_t * out_n_kept) {
    return guarded([&] {
        if (batch == nullptr || tokens == nullptr) {
            return fail(PYMOI_ERR_INVALID_ARGUMENT, "batch and tokens must not be null");
        }
        std::string error;
        int32_t     n_kept = 0;
        return to_status(batch->step->add(seq, sampler, beta, top_k, tokens, n_tokens, n_keep, out_n_kept ? out_n_kept : &n_kept, &error), error);
    });
}

pymoi_status pymoi_batch_share_top_k(pymoi_batch * batch, int32_t seq, int32_t chain_top_k) {
    return guarded([&] {
        if (batch == nullptr) return fail(PYMOI_ERR_INVALID_ARGUMENT, "batch must not be null");
        std::string error;
        return to_status(batch->step->share_top_k(seq, chain_top_k, &error), error);
    });
}

pymoi_status pymoi_batch_step(pymoi_batch * batch, llama_token * out_tokens) {
    return guarded([&] {
        if (batch == nullptr || out_tokens == nullptr) {
            return fail(PYMOI_ERR_INVALID_ARGUMENT, "batch and out_tokens must not be null");
        }
        std::string error;
        return to_status(batch->step->step(out_tokens, &error), error);
    });
}

pymoi_status pymoi_batch_finish(pymoi_batch * batch, int32_t seq, int32_t n_keep, int32_t * out_n_kept) {
    return guarded([&] {
        if (batch == nullptr) return fail(PYMOI_ERR_INVALID_ARGUMENT, "batch must not be null");
        std::string error;
        int32_t n_kept = 0;
        return to_status(batch->step->finish(seq, n_keep, out_n_kept ? out_n_kept : &n_kept, &error), error);
    });
}

bool pymoi_memory_needs_checkpoint(const llama_model * model, bool swa_full) {
    return model != nullptr && pymoi::memory_needs_checkpoint(model, swa_full);
}

pymoi_status pymoi_checkpoint_new(pymoi_checkpoint ** out_checkpoint) {
    return guarded([&] {
        if (out_checkpoint == nullptr) return fail(PYMOI_ERR_INVALID_ARGUMENT, "out_checkpoint must not be null");
        *out_checkpoint = new pymoi_checkpoint {};
        return PYMOI_OK;
    });
}

void pymoi_checkpoint_free(pymoi_checkpoint * checkpoint) {
    delete checkpoint;
}

pymoi_status pymoi_checkpoint_save(pymoi_checkpoint * checkpoint, llama_context * ctx, int32_t seq) {
    return guarded([&] {
        if (checkpoint == nullptr || ctx == nullptr) return fail(PYMOI_ERR_INVALID_ARGUMENT, "checkpoint and ctx must not be null");
        if (seq < 0 || static_cast<uint32_t>(seq) >= llama_n_seq_max(ctx)) {
            return fail(PYMOI_ERR_INVALID_ARGUMENT, "sequence " + std::to_string(seq) + " is not in the context");
        }
        try {
            if (checkpoint->checkpoint.save(ctx, seq)) return PYMOI_OK;
        } catch (...) {
            checkpoint->checkpoint.clear();
            throw;
        }
        return fail(PYMOI_ERR_INTERNAL, "llama.cpp saved no state for sequence " + std::to_string(seq));
    });
}

pymoi_status pymoi_checkpoint_restore(const pymoi_checkpoint * checkpoint, llama_context * ctx, int32_t seq) {
    return guarded([&] {
        if (checkpoint == nullptr || ctx == nullptr) return fail(PYMOI_ERR_INVALID_ARGUMENT, "checkpoint and ctx must not be null");
        if (seq < 0 || static_cast<uint32_t>(seq) >= llama_n_seq_max(ctx)) {
            return fail(PYMOI_ERR_INVALID_ARGUMENT, "sequence " + std::to_string(seq) + " is not in the context");
        }
        if (checkpoint->checkpoint.restore(ctx, seq)) return PYMOI_OK;
        return fail(PYMOI_ERR_INTERNAL, checkpoint->checkpoint.pos() < 0
                                            ? std::string("no checkpoint is saved")
                                            : "llama.cpp did not restore the checkpoint of sequence " + std::to_string(seq));
    });
}

pymoi_status pymoi_checkpoint_info_get(const pymoi_checkpoint * checkpoint, pymoi_checkpoint_info * out_info) {
    if (checkpoint == nullptr || out_info == nullptr) return fail(PYMOI_ERR_INVALID_ARGUMENT, "checkpoint and out_info must not be null");
    out_info->pos   = checkpoint->checkpoint.pos();
    out_info->bytes = checkpoint->checkpoint.pos() < 0 ? 0 : checkpoint->checkpoint.size();
    return PYMOI_OK;
}

pymoi_status pymoi_batch_soft_thinking(pymoi_batch * batch, int32_t seq, const pymoi_soft_thinking * settings) {
    return guarded([&] {
        if (batch == nullptr) return fail(PYMOI_ERR_INVALID_ARGUMENT, "batch must not be null");
        std::string error;
        return to_status(batch->step->soft_thinking(seq, settings, &error), error);
    });
}

pymoi_status pymoi_batch_thinking_info(const pymoi_batch * batch, int32_t seq, pymoi_thinking_info * out_info) {
    return guarded([&] {
        if (batch == nullptr || out_info == nullptr) {
            return fail(PYMOI_ERR_INVALID_ARGUMENT, "batch and out_info must not be null");
        }
        std::string error;
        return to_status(batch->step->thinking_info(seq, out_info, &error), error);
    });
}

pymoi_status pymoi_batch_logits(const pymoi_batch * batch, int32_t seq, const float ** out_logits) {
    return guarded([&] {
        if (batch == nullptr || out_logits == nullptr) {
            return fail(PYMOI_ERR_INVALID_ARGUMENT, "batch and out_logits must not be null");
        }
        std::string error;
        return to_status(batch->step->logits(seq, out_logits, &error), error);
    });
}

}  // extern "C"
