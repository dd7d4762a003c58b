"""Tiny random-weight GGUF models of llama.cpp's recurrent and hybrid architectures, for tests.

``write_recurrent_model`` writes a small model (0.5 to 2 MiB) with the
``gguf`` package that ``llama_cpp.Llama`` loads and generates with in well
under a second on a CPU: pure recurrent models (Mamba, Mamba-2, RWKV-7),
hybrids that interleave recurrent layers (gated delta net, Mamba-2, short
convolution) with attention layers (Qwen3.5, Qwen3-Next, LFM2, Granite
hybrid, Falcon-H1), and ``qwen4exp``, whose per-layer n-gram hash
embeddings read the token ids themselves.  As in ``tiny_models``, the
weights are random but scaled so that greedy decoding produces varied
tokens, never an end-of-generation token, and the next tokens depend
clearly on every input (its embedding scale and, for the M-RoPE models, all
its position sections).

The gated-delta-net hybrids (``SCALABLE_ARCHITECTURES``: qwen35, qwen35moe,
qwen3next) can also be written larger, e.g. a Qwen3.5-shaped model of about
100M parameters for benchmarks, by passing ``dims=Dims(...)``; the default
``Dims()`` is the tiny model every test uses.
"""

from __future__ import annotations

import functools
import os
import pathlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Union

import gguf
import numpy as np

from tiny_models import _CONTROL_TOKENS, HEAD_DIM, WRITER_EMBEDDING_TYPES, _add_vocab, write_model_file

_Tensors = dict[str, np.ndarray]
_KvValue = Union[int, float, tuple[gguf.GGUFValueType, list[int]]]  # arrays: (element type, values)


@dataclass
class _Model:
    """Metadata (``<arch>.``-relative keys) and F32 tensors (numpy shape = ggml shape reversed) of one model."""

    kv: dict[str, tuple[gguf.GGUFValueType, _KvValue]] = field(default_factory=dict)
    tensors: _Tensors = field(default_factory=dict)

    def u32(self, key: str, value: int | list[int]) -> None:
        if isinstance(value, list):
            self.kv[key] = (gguf.GGUFValueType.ARRAY, (gguf.GGUFValueType.UINT32, value))
        else:
            self.kv[key] = (gguf.GGUFValueType.UINT32, value)

    def i32s(self, key: str, value: list[int]) -> None:
        self.kv[key] = (gguf.GGUFValueType.ARRAY, (gguf.GGUFValueType.INT32, value))

    def f32(self, key: str, value: float) -> None:
        self.kv[key] = (gguf.GGUFValueType.FLOAT32, value)


class _Init:
    """Random tensor factory of one model (see ``tiny_models._random_tensors`` for the scaling rationale)."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def linear(self, n_out: int, n_in: int, gain: float = 1.0) -> np.ndarray:
        w = self.rng.standard_normal((n_out, n_in), dtype=np.float32) / np.float32(np.sqrt(n_in))
        return (np.float32(gain) * w).astype(np.float32)

    def unit_rows(self, n_out: int, n_in: int) -> np.ndarray:
        rows = self.rng.standard_normal((n_out, n_in), dtype=np.float32)
        return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)

    def normal(self, shape: tuple[int, ...] | int, std: float = 1.0, mean: float = 0.0) -> np.ndarray:
        return (mean + std * self.rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)

    def uniform(self, shape: tuple[int, ...] | int, low: float, high: float) -> np.ndarray:
        return self.rng.uniform(low, high, shape).astype(np.float32)

    def signs(self, n: int) -> np.ndarray:
        return self.rng.choice(np.array([-1.0, 1.0], dtype=np.float32), n)

    @staticmethod
    def ones(*shape: int, value: float = 1.0) -> np.ndarray:
        return np.full(shape, value, dtype=np.float32)


@dataclass(frozen=True)
class Dims:
    """Sizes of a model written by ``write_recurrent_model``; the defaults are the tiny test models'.

    Every architecture uses ``n_vocab``, ``n_embd``, ``n_ff``, ``n_layer`` and
    ``head_dim`` (attention heads: ``n_head = n_embd // head_dim``,
    ``n_head_kv = n_head // 2``); the other fields are the gated delta net
    hybrids'.  Only ``SCALABLE_ARCHITECTURES`` accept sizes other than the
    defaults.
    """

    n_vocab: int = 300
    n_embd: int = 64
    n_ff: int = 128
    n_layer: int = 4
    head_dim: int = HEAD_DIM
    full_attention_interval: int = 2  # layer il is an attention layer iff (il + 1) % interval == 0
    gdn_d_state: int = 16  # gated delta net head size (key and value heads alike)
    gdn_n_k_heads: int = 2  # ssm.group_count
    gdn_n_v_heads: int = 4  # ssm.time_step_rank; a multiple of gdn_n_k_heads
    gdn_d_conv: int = 4
    # M-RoPE sections in rotary pairs per (t, h, w, e): the 16-dim heads' (3, 3, 2, 0), like Qwen3.5's (11, 11, 10, 0)
    mrope_sections: tuple[int, int, int, int] = (3, 3, 2, 0)
    n_rot: int | None = None  # rope.dimension_count (Qwen3.5: a quarter of the head); None: all of it, not written
    context_length: int = 2048

    @property
    def n_head(self) -> int:
        return self.n_embd // self.head_dim

    @property
    def n_head_kv(self) -> int:
        return self.n_head // 2

    def is_attention_layer(self, il: int) -> bool:
        """Whether layer ``il`` of a gated delta net hybrid is a (full) attention layer."""
        return (il + 1) % self.full_attention_interval == 0

    def check(self) -> None:
        """Raises ValueError for sizes llama.cpp would not load."""
        if self.n_vocab < len(_CONTROL_TOKENS) + 257:
            raise ValueError(f"n_vocab must be at least {len(_CONTROL_TOKENS) + 257}, got {self.n_vocab}")
        if self.n_embd <= 0 or self.n_embd % 32:
            raise ValueError(f"n_embd must be a positive multiple of 32, got {self.n_embd}")
        if self.head_dim <= 0 or self.n_embd % self.head_dim or self.n_head < 2:
            raise ValueError(f"n_embd ({self.n_embd}) must hold at least 2 heads of head_dim ({self.head_dim})")
        if min(self.n_ff, self.n_layer, self.full_attention_interval, self.gdn_d_state, self.gdn_d_conv) <= 0:
            raise ValueError("n_ff, n_layer, full_attention_interval, gdn_d_state and gdn_d_conv must be positive")
        if self.gdn_n_k_heads <= 0 or self.gdn_n_v_heads % self.gdn_n_k_heads:
            raise ValueError(
                f"gdn_n_v_heads ({self.gdn_n_v_heads}) must be a multiple of gdn_n_k_heads ({self.gdn_n_k_heads})"
            )
        rotary = self.head_dim if self.n_rot is None else self.n_rot
        if rotary <= 0 or rotary % 2 or rotary > self.head_dim or sum(self.mrope_sections) > rotary // 2:
            raise ValueError(f"mrope_sections {self.mrope_sections} need more than the {rotary // 2} rotary pairs")


# Scales of the branch outputs (attention, recurrent mixer, FFN), as in tiny_models: a small attention gain
# keeps attention from averaging the context into one repeated token, a large FFN gain keeps tokens distinct.
_ATTN_GAIN, _MIX_GAIN, _FFN_GAIN = 0.25, 1.0, 2.0


def _common(
    m: _Model,
    init: _Init,
    d: Dims,
    *,
    output_norm: str | None = "output_norm",
    norm_eps: tuple[str, float] = ("attention.layer_norm_rms_epsilon", 1e-6),
) -> None:
    """Context / size hyperparameters, norm epsilon, token embeddings, output norm (if named) and projection.

    Token embedding and output rows are random unit vectors, the output norm
    random +-1, as in ``tiny_models``; the control tokens' output rows are
    scaled down so that greedy decoding never picks them (in particular EOS).
    """
    m.u32("context_length", d.context_length)
    m.u32("embedding_length", d.n_embd)
    m.u32("block_count", d.n_layer)
    m.f32(*norm_eps)
    m.tensors["token_embd.weight"] = init.unit_rows(d.n_vocab, d.n_embd)
    if output_norm is not None:
        m.tensors[f"{output_norm}.weight"] = init.signs(d.n_embd)
    m.tensors["output.weight"] = init.unit_rows(d.n_vocab, d.n_embd)
    m.tensors["output.weight"][: len(_CONTROL_TOKENS)] *= np.float32(0.01)


def _attention_heads(m: _Model, d: Dims, *, rope_base: float = 10000.0) -> None:
    m.u32("attention.head_count", d.n_head)
    m.u32("attention.head_count_kv", d.n_head_kv)
    m.u32("attention.key_length", d.head_dim)
    m.u32("attention.value_length", d.head_dim)
    m.f32("rope.freq_base", rope_base)
    if d.n_rot is not None:
        m.u32("rope.dimension_count", d.n_rot)


def _attn_tensors(
    init: _Init,
    d: Dims,
    *,
    q_gate: bool = False,
    qk_norm: bool = False,
    gain: float = _ATTN_GAIN,
    qk_norm_gain: float = 1.0,
) -> _Tensors:
    """attn_q/k/v/output (+ q/k norms); ``q_gate`` doubles attn_q for the per-head output gate (Qwen3-Next style)."""
    n_q = d.n_head * d.head_dim
    n_kv = d.n_head_kv * d.head_dim
    t = {
        "attn_q.weight": init.linear(2 * n_q if q_gate else n_q, d.n_embd),
        "attn_k.weight": init.linear(n_kv, d.n_embd),
        "attn_v.weight": init.linear(n_kv, d.n_embd),
        "attn_output.weight": init.linear(d.n_embd, n_q, gain),
    }
    if qk_norm:
        t["attn_q_norm.weight"] = init.ones(d.head_dim, value=qk_norm_gain)
        t["attn_k_norm.weight"] = init.ones(d.head_dim, value=qk_norm_gain)
    return t


def _ffn_tensors(init: _Init, d: Dims, gain: float = _FFN_GAIN) -> _Tensors:
    return {
        "ffn_gate.weight": init.linear(d.n_ff, d.n_embd),
        "ffn_up.weight": init.linear(d.n_ff, d.n_embd),
        "ffn_down.weight": init.linear(d.n_embd, d.n_ff, gain),
    }


_N_EXPERT, _N_EXPERT_USED = 4, 2


def _moe_tensors(init: _Init, d: Dims, gain: float = _FFN_GAIN) -> _Tensors:
    """Routed experts (``n_ff / 2`` wide) plus a sigmoid-gated shared expert (Qwen3-Next / Qwen3.5-MoE layout)."""
    n_expert, n_ff_exp = _N_EXPERT, d.n_ff // 2

    def experts(n_out: int, n_in: int, g: float = 1.0) -> np.ndarray:
        return np.stack([init.linear(n_out, n_in, g) for _ in range(n_expert)])

    return {
        "ffn_gate_inp.weight": init.linear(n_expert, d.n_embd),
        "ffn_gate_exps.weight": experts(n_ff_exp, d.n_embd),
        "ffn_up_exps.weight": experts(n_ff_exp, d.n_embd),
        "ffn_down_exps.weight": experts(d.n_embd, n_ff_exp, gain),
        "ffn_gate_inp_shexp.weight": init.normal(d.n_embd, 0.1),
        "ffn_gate_shexp.weight": init.linear(d.n_ff, d.n_embd),
        "ffn_up_shexp.weight": init.linear(d.n_ff, d.n_embd),
        "ffn_down_shexp.weight": init.linear(d.n_embd, d.n_ff, gain),
    }


def _blk(m: _Model, il: int, tensors: _Tensors) -> None:
    m.tensors.update((f"blk.{il}.{name}", t) for name, t in tensors.items())


# --- gated delta net hybrids: qwen35, qwen35moe, qwen3next ------------------------------------------------

def _gated_delta_net(
    m: _Model, init: _Init, d: Dims, *, mrope: bool, moe: bool, fused_beta_alpha: bool = False, norms: bool = True
) -> None:
    """Gated delta net layers and, every ``d.full_attention_interval``-th layer (tiny: 1 and 3), gated
    attention layers; a dense or MoE FFN after each.

    ``mrope`` writes M-RoPE sections (the architecture's rope type decides
    MROPE / IMROPE), ``fused_beta_alpha`` one ``ssm_ba`` instead of
    ``ssm_beta`` + ``ssm_alpha`` (Qwen3-Next), ``norms=False`` leaves out the
    per-layer and output RMS norms (qwen4exp's hyper-connections replace them).
    """
    _common(m, init, d, output_norm="output_norm" if norms else None)
    _attention_heads(m, d)
    m.u32("feed_forward_length", d.n_ff)
    m.u32("ssm.conv_kernel", d.gdn_d_conv)
    m.u32("ssm.state_size", d.gdn_d_state)
    m.u32("ssm.group_count", d.gdn_n_k_heads)
    m.u32("ssm.time_step_rank", d.gdn_n_v_heads)
    m.u32("ssm.inner_size", d.gdn_d_state * d.gdn_n_v_heads)
    m.u32("full_attention_interval", d.full_attention_interval)
    if mrope:
        m.i32s("rope.dimension_sections", list(d.mrope_sections))
    if moe:
        m.u32("expert_count", _N_EXPERT)
        m.u32("expert_used_count", _N_EXPERT_USED)
        m.u32("expert_feed_forward_length", d.n_ff // 2)
        m.u32("expert_shared_feed_forward_length", d.n_ff)

    n_v_heads = d.gdn_n_v_heads
    key_dim = d.gdn_d_state * d.gdn_n_k_heads
    value_dim = d.gdn_d_state * n_v_heads
    for il in range(d.n_layer):
        blk: _Tensors = {}
        if norms:
            blk["attn_norm.weight"] = init.ones(d.n_embd)
            blk["post_attention_norm.weight"] = init.ones(d.n_embd)
        if d.is_attention_layer(il):
            # sharp attention (large q/k norms) with a larger gain than tiny_models', so positions matter
            blk.update(_attn_tensors(init, d, q_gate=True, qk_norm=True, gain=0.5, qk_norm_gain=2.0))
        else:
            blk.update(
                {
                    "attn_qkv.weight": init.linear(2 * key_dim + value_dim, d.n_embd),
                    "attn_gate.weight": init.linear(value_dim, d.n_embd),
                    "ssm_conv1d.weight": init.normal((2 * key_dim + value_dim, d.gdn_d_conv), 0.5),
                    "ssm_dt.bias": init.normal(n_v_heads, 0.5),
                    "ssm_a": -init.uniform(n_v_heads, 0.2, 1.0),  # decay exp(softplus(.) * a) of the state
                    "ssm_norm.weight": init.ones(d.gdn_d_state),
                    "ssm_out.weight": init.linear(d.n_embd, value_dim, _MIX_GAIN),
                }
            )
            if fused_beta_alpha:
                blk["ssm_ba.weight"] = init.linear(2 * n_v_heads, d.n_embd)  # [beta; alpha] per key head
            else:
                blk["ssm_beta.weight"] = init.linear(n_v_heads, d.n_embd)
                blk["ssm_alpha.weight"] = init.linear(n_v_heads, d.n_embd)
        blk.update(_moe_tensors(init, d) if moe else _ffn_tensors(init, d))
        _blk(m, il, blk)


# --- qwen4exp: Qwen3.5-style hybrid with hyper-connections, MoE and per-layer n-gram hash embeddings --------

_HC, _HC_LOW_RANK = 2, 8
_INDEXER_HEADS, _INDEXER_DIM, _INDEXER_TOP_K = 2, 16, 64
_PLE_NGRAM, _PLE_HEADS_PER_NGRAM, _PLE_CONV_KERNEL = 3, 2, 2
_PLE_MULTIPLIERS = [1, 31337, 1000003]
_PLE_HEAD_VOCAB_SIZES = [61, 59, 67, 53]


def _qwen4exp(m: _Model, init: _Init, d: Dims) -> None:
    """A qwen35 stack whose layer 0 also adds n-gram hash embeddings gathered by token id."""
    n, hc_dim = d.n_embd, _HC * d.n_embd
    n_ple_heads = (_PLE_NGRAM - 1) * _PLE_HEADS_PER_NGRAM
    ple_dim = n // n_ple_heads  # the gathered heads, side by side, are the PLE key / value input
    # the hyper-connection mixers are the layer and output norms
    _gated_delta_net(m, init, d, mrope=True, moe=True, norms=False)
    m.u32("hyper_connection.count", _HC)
    m.u32("hyper_connection.low_rank", _HC_LOW_RANK)
    m.u32("attention.indexer.head_count", _INDEXER_HEADS)
    m.u32("attention.indexer.key_length", _INDEXER_DIM)
    m.u32("attention.indexer.top_k", _INDEXER_TOP_K)  # no compress_ratios: every attention layer is dense
    m.u32("ple.layers", [0])
    m.u32("ple.ngram_size", _PLE_NGRAM)
    m.u32("ple.heads_per_ngram", _PLE_HEADS_PER_NGRAM)
    m.u32("ple.conv_kernel", _PLE_CONV_KERNEL)
    m.u32("ple.eos_token_id", 2)
    m.u32("embedding_length_per_layer_input", ple_dim)
    offsets = [int(x) for x in np.cumsum([0, *_PLE_HEAD_VOCAB_SIZES[:-1]])]
    m.kv["ple.layer_multipliers"] = (gguf.GGUFValueType.ARRAY, (gguf.GGUFValueType.UINT64, _PLE_MULTIPLIERS))
    m.kv["ple.head_offsets"] = (gguf.GGUFValueType.ARRAY, (gguf.GGUFValueType.UINT64, offsets))
    m.kv["ple.head_vocab_sizes"] = (gguf.GGUFValueType.ARRAY, (gguf.GGUFValueType.UINT64, _PLE_HEAD_VOCAB_SIZES))
    m.tensors["per_layer_token_embd.weight"] = init.unit_rows(sum(_PLE_HEAD_VOCAB_SIZES), ple_dim)

    def hc_mixer(prefix: str, inject: bool = True) -> _Tensors:
        t = {
            f"{prefix}_norm.weight": init.ones(_HC, n),
            f"{prefix}_down.weight": init.linear(_HC_LOW_RANK, hc_dim),
            f"{prefix}_up.weight": init.linear(hc_dim, _HC_LOW_RANK),
        }
        if inject:
            t[f"{prefix}_inject.weight"] = init.linear(_HC, hc_dim)
        return t

    m.tensors.update(hc_mixer("output_hc", inject=False))
    for il in range(d.n_layer):
        blk = {**hc_mixer("hc_attn"), **hc_mixer("hc_ffn")}
        if d.is_attention_layer(il):
            blk.update(
                {
                    "indexer.q_proj.weight": init.linear(_INDEXER_HEADS * _INDEXER_DIM, n),
                    "indexer.k_proj.weight": init.linear(_INDEXER_DIM, n),
                    "indexer.q_norm.weight": init.ones(_INDEXER_DIM),
                    "indexer.k_norm.weight": init.ones(_INDEXER_DIM),
                }
            )
        if il == 0:
            blk.update(
                {
                    "ple_key.weight": init.linear(hc_dim, n),
                    "ple_value.weight": init.linear(n, n),
                    "ple_norm_key.weight": init.ones(_HC, n),
                    "ple_norm_query.weight": init.ones(_HC, n),
                    "ple_norm_conv.weight": init.ones(_HC, n),
                    "ple_conv1d.weight": init.normal((hc_dim, _PLE_CONV_KERNEL), 0.5),
                }
            )
        _blk(m, il, blk)


# --- Mamba family: mamba, mamba2, granitehybrid, falcon-h1 -------------------------------------------------

_SSM_D_STATE, _SSM_D_CONV = 16, 4


def _mamba(m: _Model, init: _Init, d: Dims) -> None:
    d_inner, dt_rank = 2 * d.n_embd, 4
    _common(m, init, d)
    m.u32("ssm.conv_kernel", _SSM_D_CONV)
    m.u32("ssm.inner_size", d_inner)
    m.u32("ssm.state_size", _SSM_D_STATE)
    m.u32("ssm.time_step_rank", dt_rank)
    for il in range(d.n_layer):
        a_log = np.log(np.tile(np.arange(1, _SSM_D_STATE + 1, dtype=np.float32), (d_inner, 1)))
        _blk(
            m,
            il,
            {
                "attn_norm.weight": init.ones(d.n_embd),
                "ssm_in.weight": init.linear(2 * d_inner, d.n_embd),
                "ssm_conv1d.weight": init.normal((d_inner, _SSM_D_CONV), 0.5),
                "ssm_conv1d.bias": init.normal(d_inner, 0.1),
                "ssm_x.weight": init.linear(dt_rank + 2 * _SSM_D_STATE, d_inner),
                "ssm_dt.weight": init.linear(d_inner, dt_rank),
                "ssm_dt.bias": init.uniform(d_inner, -2.0, 0.0),
                "ssm_a": -np.exp(a_log).astype(np.float32) * np.float32(0.25),
                "ssm_d": init.ones(d_inner),
                "ssm_out.weight": init.linear(d.n_embd, d_inner, _MIX_GAIN),
            },
        )


def _mamba2_mixer(init: _Init, d: Dims, n_group: int, n_ssm_head: int) -> _Tensors:
    """A Mamba-2 mixer with ``d_inner = 2 * n_embd`` (granitehybrid requires the factor 2) and a grouped norm."""
    d_inner = 2 * d.n_embd
    conv_dim = d_inner + 2 * n_group * _SSM_D_STATE
    t = {
        "ssm_in.weight": init.linear(d_inner + conv_dim + n_ssm_head, d.n_embd),  # rows [z; x; B; C; dt]
        "ssm_conv1d.weight": init.normal((conv_dim, _SSM_D_CONV), 0.5),
        "ssm_dt.bias": init.uniform(n_ssm_head, -2.0, 0.0),
        "ssm_a": -init.uniform((n_ssm_head, 1), 0.5, 2.0),
        "ssm_d": init.ones(n_ssm_head, 1),
        "ssm_norm.weight": init.ones(n_group, d_inner // n_group),
        "ssm_out.weight": init.linear(d.n_embd, d_inner, _MIX_GAIN),
    }
    t["ssm_conv1d.bias"] = init.normal(conv_dim, 0.1)
    return t


def _mamba2_hparams(m: _Model, d: Dims, n_group: int, n_ssm_head: int) -> None:
    m.u32("ssm.conv_kernel", _SSM_D_CONV)
    m.u32("ssm.inner_size", 2 * d.n_embd)
    m.u32("ssm.state_size", _SSM_D_STATE)
    m.u32("ssm.time_step_rank", n_ssm_head)
    m.u32("ssm.group_count", n_group)


def _mamba2(m: _Model, init: _Init, d: Dims) -> None:
    n_group, n_ssm_head = 2, 8
    _common(m, init, d)
    _mamba2_hparams(m, d, n_group, n_ssm_head)
    for il in range(d.n_layer):
        _blk(m, il, {"attn_norm.weight": init.ones(d.n_embd), **_mamba2_mixer(init, d, n_group, n_ssm_head)})


def _granitehybrid(m: _Model, init: _Init, d: Dims) -> None:
    n_group, n_ssm_head = 2, 8
    _common(m, init, d)
    _attention_heads(m, d)
    m.u32("feed_forward_length", d.n_ff)
    _mamba2_hparams(m, d, n_group, n_ssm_head)
    # a layer is a Mamba-2 layer iff its KV head count is 0: layers 1, 3 attention
    m.u32("attention.head_count_kv", [d.n_head_kv if (il + 1) % 2 == 0 else 0 for il in range(d.n_layer)])
    for il in range(d.n_layer):
        blk = {"attn_norm.weight": init.ones(d.n_embd), "ffn_norm.weight": init.ones(d.n_embd)}
        if (il + 1) % 2 == 0:
            blk.update(_attn_tensors(init, d))
        else:
            blk.update(_mamba2_mixer(init, d, n_group, n_ssm_head))
        blk.update(_ffn_tensors(init, d))
        _blk(m, il, blk)


def _falcon_h1(m: _Model, init: _Init, d: Dims) -> None:
    n_group, n_ssm_head = 1, 8
    _common(m, init, d)
    _attention_heads(m, d)
    m.u32("feed_forward_length", d.n_ff)
    _mamba2_hparams(m, d, n_group, n_ssm_head)
    for il in range(d.n_layer):
        # attention and Mamba-2 run in parallel on the same normed input in every layer
        blk = {"attn_norm.weight": init.ones(d.n_embd), "ffn_norm": init.ones(d.n_embd)}
        blk.update(_attn_tensors(init, d))
        blk.update(_mamba2_mixer(init, d, n_group, n_ssm_head))
        blk.update(_ffn_tensors(init, d))
        _blk(m, il, blk)


# --- LFM2: short convolution + attention ---------------------------------------------------------------------

_SHORTCONV_L_CACHE = 3


def _lfm2(m: _Model, init: _Init, d: Dims) -> None:
    _common(m, init, d, output_norm="token_embd_norm")
    _attention_heads(m, d)
    m.u32("feed_forward_length", d.n_ff)
    m.u32("shortconv.l_cache", _SHORTCONV_L_CACHE)
    # a layer is a short-convolution layer iff its KV head count is 0: layers 1, 3 attention
    m.u32("attention.head_count_kv", [d.n_head_kv if (il + 1) % 2 == 0 else 0 for il in range(d.n_layer)])
    for il in range(d.n_layer):
        blk = {"attn_norm.weight": init.ones(d.n_embd), "ffn_norm.weight": init.ones(d.n_embd)}
        if (il + 1) % 2 == 0:
            blk.update(_attn_tensors(init, d, qk_norm=True))
        else:
            blk.update(
                {
                    # rows [B; C; x]: y = C * conv(B * x)
                    "shortconv.in_proj.weight": init.linear(3 * d.n_embd, d.n_embd),
                    "shortconv.conv.weight": init.normal((d.n_embd, _SHORTCONV_L_CACHE), 0.7),
                    "shortconv.out_proj.weight": init.linear(d.n_embd, d.n_embd, _MIX_GAIN),
                }
            )
        blk.update(_ffn_tensors(init, d))
        _blk(m, il, blk)


# --- RWKV-7 --------------------------------------------------------------------------------------------------

_WKV_HEAD_SIZE, _RWKV_LORA = 64, 16  # head size: ggml-cpu's SIMD wkv7 kernel needs a multiple of 64 (GGML_F32_STEP)
_RWKV_LN_EPS = 0.02  # large, so that the input LayerNorm does not cancel a wrong scale of the inputs


def _rwkv7(m: _Model, init: _Init, d: Dims) -> None:
    n, r = d.n_embd, _RWKV_LORA
    _common(m, init, d, norm_eps=("attention.layer_norm_epsilon", _RWKV_LN_EPS))
    m.u32("feed_forward_length", d.n_ff)
    m.u32("wkv.head_size", _WKV_HEAD_SIZE)
    m.u32("attention.decay_lora_rank", r)
    m.u32("attention.iclr_lora_rank", r)
    m.u32("attention.value_residual_mix_lora_rank", r)
    m.u32("attention.gate_lora_rank", r)
    m.u32("token_shift_count", 2)
    m.tensors["token_embd_norm.weight"] = init.ones(n)
    m.tensors["token_embd_norm.bias"] = init.ones(n, value=0.0)
    m.tensors["output_norm.bias"] = init.ones(n, value=0.0)
    for il in range(d.n_layer):
        _blk(
            m,
            il,
            {
                "attn_norm.weight": init.ones(n),
                "attn_norm.bias": init.ones(n, value=0.0),
                "attn_norm_2.weight": init.ones(n),
                "attn_norm_2.bias": init.ones(n, value=0.0),
                "time_mix_w0.weight": init.uniform(n, -1.0, 1.0),
                "time_mix_w1.weight": init.linear(r, n),
                "time_mix_w2.weight": init.linear(n, r),
                "time_mix_a0.weight": init.normal(n, 0.5),
                "time_mix_a1.weight": init.linear(r, n),
                "time_mix_a2.weight": init.linear(n, r),
                "time_mix_v0.weight": init.normal(n, 0.5),
                "time_mix_v1.weight": init.linear(r, n),
                "time_mix_v2.weight": init.linear(n, r),
                "time_mix_g1.weight": init.linear(r, n),
                "time_mix_g2.weight": init.linear(n, r, 2.0),
                "time_mix_lerp_fused.weight": init.uniform((6, 1, 1, n), 0.0, 1.0),
                "time_mix_k_k.weight": init.uniform(n, 0.5, 1.5),
                "time_mix_k_a.weight": init.uniform(n, 0.5, 1.5),
                "time_mix_r_k.weight": init.normal(n, 0.5),
                "time_mix_key.weight": init.linear(n, n),
                "time_mix_value.weight": init.linear(n, n),
                "time_mix_receptance.weight": init.linear(n, n),
                "time_mix_ln.weight": init.ones(n),
                "time_mix_ln.bias": init.ones(n, value=0.0),
                "time_mix_output.weight": init.linear(n, n, _MIX_GAIN),
                "channel_mix_lerp_k.weight": init.uniform((1, 1, n), 0.0, 1.0),
                "channel_mix_key.weight": init.linear(d.n_ff, n),
                "channel_mix_value.weight": init.linear(n, d.n_ff, _FFN_GAIN),
            },
        )


_BUILDERS: dict[str, Callable[[_Model, _Init, Dims], None]] = {
    "qwen35": functools.partial(_gated_delta_net, mrope=True, moe=False),
    "qwen35moe": functools.partial(_gated_delta_net, mrope=True, moe=True),
    "qwen3next": functools.partial(_gated_delta_net, mrope=False, moe=True, fused_beta_alpha=True),
    "mamba": _mamba,
    "mamba2": _mamba2,
    "granitehybrid": _granitehybrid,
    "falcon-h1": _falcon_h1,
    "lfm2": _lfm2,
    "rwkv7": _rwkv7,
    "qwen4exp": _qwen4exp,
}

RECURRENT_ARCHITECTURES: tuple[str, ...] = tuple(_BUILDERS)
"""Architectures ``write_recurrent_model`` can write (llama.cpp ``general.architecture`` names)."""

SCALABLE_ARCHITECTURES: tuple[str, ...] = ("qwen35", "qwen35moe", "qwen3next")
"""Architectures ``write_recurrent_model`` writes with any ``Dims`` (the gated delta net hybrids); every
other architecture's layer pattern and mixer sizes are fixed to the tiny defaults."""

ARCHITECTURE_KINDS: dict[str, str] = {
    "qwen35": "hybrid",
    "qwen35moe": "hybrid",
    "qwen3next": "hybrid",
    "mamba": "recurrent",
    "mamba2": "recurrent",
    "granitehybrid": "hybrid",
    "falcon-h1": "hybrid",
    "lfm2": "hybrid",
    "rwkv7": "recurrent",
    "qwen4exp": "hybrid",
}
"""Per architecture: ``"recurrent"`` (recurrent state only) or ``"hybrid"`` (recurrent state and a KV cache)."""

PURE_RECURRENT_ARCHITECTURES: tuple[str, ...] = tuple(a for a, k in ARCHITECTURE_KINDS.items() if k == "recurrent")
"""mamba, mamba2, rwkv7: no attention, no KV cache."""

HYBRID_ARCHITECTURES: tuple[str, ...] = tuple(a for a, k in ARCHITECTURE_KINDS.items() if k == "hybrid")
"""Recurrent and attention layers: qwen35, qwen35moe, qwen3next, granitehybrid, falcon-h1, lfm2, qwen4exp."""

MROPE_ARCHITECTURES: tuple[str, ...] = ("qwen35", "qwen35moe", "qwen4exp")
"""Architectures with IMROPE positions: 4 positions per embedding row, (p, p, p, 0) for text."""

TOKEN_ID_ARCHITECTURES: tuple[str, ...] = ("qwen4exp",)
"""Architectures whose graph reads the token ids beyond the embedding lookup (qwen4exp's n-gram hash
embeddings), so feeding the token embedding rows does not reproduce token input."""


def write_recurrent_model(
    path: str | os.PathLike[str],
    arch: str,
    *,
    seed: int = 0,
    token_embd_type: str = "F32",
    dims: Dims | None = None,
) -> pathlib.Path:
    """Write a random-weight model of architecture ``arch`` (one of ``RECURRENT_ARCHITECTURES``) to ``path``.

    ``token_embd.weight`` is stored as ``token_embd_type`` (one of
    ``tiny_models.WRITER_EMBEDDING_TYPES``), every other tensor as F32.  The
    vocabulary is ``tiny_models``' SentencePiece-style one (BOS 1, EOS 2) of
    ``dims.n_vocab`` tokens.  ``dims`` (default ``Dims()``, the tiny model)
    sets the sizes, for ``SCALABLE_ARCHITECTURES`` only.  Returns ``path``.
    """
    if arch not in _BUILDERS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {RECURRENT_ARCHITECTURES}")
    if token_embd_type not in WRITER_EMBEDDING_TYPES:
        raise ValueError(f"unsupported token_embd_type {token_embd_type!r}; expected one of {WRITER_EMBEDDING_TYPES}")
    dims = Dims() if dims is None else dims
    if dims != Dims() and arch not in SCALABLE_ARCHITECTURES:
        raise ValueError(f"{arch} is written with the default Dims only; other sizes: {SCALABLE_ARCHITECTURES}")
    dims.check()
    model = _Model()
    _BUILDERS[arch](model, _Init(seed), dims)

    path = pathlib.Path(path)
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name("tiny random model")
    for key, (vtype, value) in model.kv.items():
        if vtype == gguf.GGUFValueType.ARRAY:
            sub_type, values = value
            writer.add_key_value(f"{arch}.{key}", values, vtype, sub_type=sub_type)
        else:
            writer.add_key_value(f"{arch}.{key}", value, vtype)
    _add_vocab(writer, dims.n_vocab)
    return write_model_file(writer, path, model.tensors, token_embd_type)
