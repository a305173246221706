"""The Llama that `benchmarks.models.train` trains: plain torch, saved as Hugging Face Llama weights.

Same computation and parameter names as `transformers.LlamaForCausalLM` (RMSNorm, rotary
embeddings with the rotate-half convention, grouped-query attention, SwiGLU MLP, untied head), so
`save_hf` writes a folder that transformers and vLLM load as `LlamaForCausalLM`. Written here
rather than trained through transformers for one thing transformers' forward does not do
cheaply on CPU: packed rows of several documents in which every token attends only within its
own document, with positions restarting at each document (as in evaluation, where every prompt
starts at position 0). Such rows can be given as `Spans` (each document's attention computed on
its own, no work on masked-out pairs) or as a dense boolean mask (the reference).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


@dataclasses.dataclass(frozen=True)
class LlamaShape:
    """Architecture. head_dim = hidden_size / num_heads must be >= 32 for vLLM's CPU attention."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    # One matrix embeds and unembeds: a token is copied by attending to it, without a separate
    # output row to learn per token (recall keys are rare tokens that must be copied).
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not divisible by num_kv_heads {self.num_kv_heads}")
        if self.head_dim < 32:
            raise ValueError(f"head_dim {self.head_dim} < 32: vLLM's CPU attention needs head_dim >= 32")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def parameter_count(self) -> int:
        h, d = self.hidden_size, self.head_dim
        attention = h * d * (2 * self.num_heads + 2 * self.num_kv_heads)
        per_layer = attention + 3 * h * self.intermediate_size + 2 * h
        embeddings = (1 if self.tie_word_embeddings else 2) * self.vocab_size * h
        return self.num_layers * per_layer + embeddings + h


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


@dataclasses.dataclass(frozen=True)
class Span:
    """Tokens [start, end) of a row that attend only among themselves: the shared part
    [start, shared_end) causally, and the branch tokens [shared_end, end) as `branch_mask` says
    (boolean [end - shared_end, end - start], True = attend; None when there are none)."""

    start: int
    shared_end: int
    end: int
    branch_mask: torch.Tensor | None = None


# Per row, spans covering the row in order. Attention within a span is exactly what a dense
# block-diagonal mask gives, at the cost of the span's own causal attention rather than t x t
# per row: with 2048-token rows of documents of 100-1600 tokens, about a quarter of the work.
Spans = tuple[tuple[Span, ...], ...]


def span_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spans: Spans) -> torch.Tensor:
    """Attention of q, k, v ([b, heads, t, head_dim], kv heads already repeated) within spans.
    Splitting (not slicing) keeps the backward pass one concatenation per row."""
    rows = []
    for row, q_row, k_row, v_row in zip(spans, q.unbind(0), k.unbind(0), v.unbind(0)):
        query_sizes = [size for s in row for size in (s.shared_end - s.start, s.end - s.shared_end) if size]
        span_sizes = [s.end - s.start for s in row]
        queries = iter(torch.split(q_row, query_sizes, dim=1))
        pieces = []
        for span, keys, values in zip(row, torch.split(k_row, span_sizes, dim=1), torch.split(v_row, span_sizes, dim=1)):
            shared = span.shared_end - span.start
            if shared:
                pieces.append(F.scaled_dot_product_attention(next(queries)[None], keys[None, :, :shared],
                                                             values[None, :, :shared], is_causal=True)[0])
            if span.end > span.shared_end:
                pieces.append(F.scaled_dot_product_attention(next(queries)[None], keys[None], values[None],
                                                             attn_mask=span.branch_mask)[0])
        rows.append(torch.cat(pieces, dim=1))
    return torch.stack(rows)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, shape: LlamaShape) -> None:
        super().__init__()
        h, d = shape.hidden_size, shape.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = shape.num_heads, shape.num_kv_heads, d
        self.q_proj = nn.Linear(h, shape.num_heads * d, bias=False)
        self.k_proj = nn.Linear(h, shape.num_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(h, shape.num_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(shape.num_heads * d, h, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | Spans | None) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        groups = self.num_heads // self.num_kv_heads
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif isinstance(mask, tuple):
            out = span_attention(q, k, v, mask)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, shape: LlamaShape) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(shape.hidden_size, shape.intermediate_size, bias=False)
        self.up_proj = nn.Linear(shape.hidden_size, shape.intermediate_size, bias=False)
        self.down_proj = nn.Linear(shape.intermediate_size, shape.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, shape: LlamaShape) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)
        self.self_attn = Attention(shape)
        self.post_attention_layernorm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)
        self.mlp = MLP(shape)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | Spans | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, shape: LlamaShape) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(shape.vocab_size, shape.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(shape) for _ in range(shape.num_layers))
        self.norm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)


class Llama(nn.Module):
    """`LlamaForCausalLM` with the same state-dict keys (`model.*`, `lm_head.weight`)."""

    def __init__(self, shape: LlamaShape, initializer_range: float = 0.02) -> None:
        super().__init__()
        self.shape = shape
        self.model = Backbone(shape)
        self.lm_head = nn.Linear(shape.hidden_size, shape.vocab_size, bias=False)
        inv_freq = 1.0 / (shape.rope_theta ** (torch.arange(0, shape.head_dim, 2, dtype=torch.float32) / shape.head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=initializer_range)
        # GPT-2-style scaling of the residual-branch outputs: keeps deep stacks stable at high LR.
        for layer in self.model.layers:
            for proj in (layer.self_attn.o_proj, layer.mlp.down_proj):
                nn.init.normal_(proj.weight, std=initializer_range / math.sqrt(2 * shape.num_layers))
        if shape.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def hidden_states(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                      mask: torch.Tensor | Spans | None = None) -> torch.Tensor:
        """Final-norm hidden states. `mask` is `Spans`, a boolean [b, 1, t, t] (True = attend) or None for
        plain causal attention; `position_ids` default to 0..t-1."""
        b, t = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(t, device=input_ids.device).expand(b, t)
        freqs = position_ids[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [b, 1, t, head_dim]
        x = self.model.embed_tokens(input_ids)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask)
        return self.model.norm(x)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                mask: torch.Tensor | Spans | None = None) -> torch.Tensor:
        return self.lm_head(self.hidden_states(input_ids, position_ids, mask))


def hf_config(shape: LlamaShape, bos_id: int, eos_id: int, pad_id: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        head_dim=shape.head_dim,
        max_position_embeddings=shape.max_position_embeddings,
        rms_norm_eps=shape.rms_norm_eps,
        rope_theta=shape.rope_theta,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        tie_word_embeddings=shape.tie_word_embeddings,
        torch_dtype="float32",
    )


def save_hf(model: Llama, out_dir: Path, bos_id: int, eos_id: int, pad_id: int) -> None:
    """Write `config.json` + `model.safetensors` as transformers' `LlamaForCausalLM` would."""
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM(hf_config(model.shape, bos_id, eos_id, pad_id)).to(torch.float32)
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    missing = [k for k in missing if not k.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise RuntimeError(f"state dict does not match LlamaForCausalLM: missing {missing}, unexpected {unexpected}")
    hf.generation_config.bos_token_id, hf.generation_config.eos_token_id = bos_id, eos_id
    hf.generation_config.pad_token_id = pad_id
    hf.save_pretrained(out_dir, safe_serialization=True)


def expand_depth(model: Llama, num_layers: int) -> Llama:
    """Block expansion (LLaMA Pro, Wu et al. 2024): a deeper model computing the same function.

    Every block is followed by copies of itself whose output projections (attention `o_proj`,
    MLP `down_proj`) are zero, so each copy starts as the identity on the residual stream;
    training then makes the copies contribute. `num_layers` must be a multiple of the depth."""
    old = model.shape.num_layers
    if num_layers < old or num_layers % old:
        raise ValueError(f"can only expand {old} layers to a multiple of {old}, got {num_layers}")
    factor = num_layers // old
    deeper = Llama(dataclasses.replace(model.shape, num_layers=num_layers))
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("model.layers.")}
    for i in range(num_layers):
        source = model.model.layers[i // factor].state_dict()
        for name, tensor in source.items():
            copy = tensor.clone()
            if i % factor and name in ("self_attn.o_proj.weight", "mlp.down_proj.weight"):
                copy.zero_()
            state[f"model.layers.{i}.{name}"] = copy
    deeper.load_state_dict(state)
    return deeper
