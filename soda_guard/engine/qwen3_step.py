"""The Qwen3 forward the engine runs: prefill on top of a cached prefix and the batched decode
step, over key/value buffers the engine owns (`kv`), without `transformers`' per-call machinery.

On CPU with a small judge, the decorated `forward` (output capture, config merging, mask
building, keyword plumbing through every layer) and even plain `nn.Module` calls cost more than
the arithmetic of one token (benchmarks/RESULTS.md). `LeanQwen3` holds the model's own weights
and runs the arithmetic of `Qwen3Model.forward` with SDPA attention as functional ops, the same
calls as the model for the same mask, so its logits are the model's bit for bit, except in
float32 on CPU, where two steps compute the same values faster, equal to float rounding: the
prefill on top of a prefix (see `_prefill_attend`) and the decode step's matrix products (see
`row_products`). tests/test_engine_backend.py checks both against the model. `supports` says
when the model is one this reproduces; the engine refuses any other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from transformers import Qwen3ForCausalLM, Qwen3Model

from soda_guard.engine.kv import KVCache

_CPU_FLASH = "_scaled_dot_product_flash_attention_for_cpu"


def supports(model: Any) -> bool:
    """Qwen3 with SiLU MLPs and no sliding-window layer: the SODA judge and Qwen3Guard are all
    of this kind. Attention is always computed as `transformers`' SDPA implementation (its
    default) computes it, whatever the model was loaded with."""
    config = model.config
    return (
        isinstance(model, (Qwen3ForCausalLM, Qwen3Model))
        and config.hidden_act == "silu"
        and all(kind == "full_attention" for kind in config.layer_types)
    )


def _norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`Qwen3RMSNorm`: normalised in float32, cast back, then scaled."""
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


@dataclass(frozen=True)
class _Layer:
    input_norm: torch.Tensor
    q: tuple[torch.Tensor, torch.Tensor | None]
    k: tuple[torch.Tensor, torch.Tensor | None]
    v: tuple[torch.Tensor, torch.Tensor | None]
    o: tuple[torch.Tensor, torch.Tensor | None]
    qk_norm: torch.Tensor
    """`q_norm`'s weight on each query head, then `k_norm`'s on each key head ([heads, head_dim]):
    both norms as one call over the query and key heads side by side."""
    post_norm: torch.Tensor
    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor


class Stopped(Exception):
    """A forward stopped between two layers (`stop` answered true): its caller has given up
    on it, and the cache it was appending to holds some layers' new keys and not others'."""


Stop = Callable[[], bool]
"""Asked between layers: whether to stop the forward there (`Stopped`)."""


def _linear(module: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    return module.weight, module.bias


Product = Callable[..., torch.Tensor]
"""(input, weight, bias=None) → input @ weight.T + bias, as `F.linear`."""


ONEDNN_MIN_WEIGHT = 1 << 18
"""Elements of a weight (1 MiB in float32) from which a decode step multiplies by it with
oneDNN (`row_products`): a product over a weight that size streams it from memory, where
oneDNN is ahead; over a smaller one, held in cache, the call costs more than the arithmetic,
and oneDNN's call costs ~15 µs where MKL's costs 2 to 6 (benchmarks/RESULTS.md, round 20)."""


def row_products(weight: torch.Tensor) -> Product:
    """The product the decode step runs its few rows through, for a model whose weights are
    like `weight`.

    A decode step multiplies one row per judgment by every weight of the model: it reads each
    weight from memory once and does little arithmetic with it, so its time is the speed it
    streams the weights at. In float32 on CPU `F.linear` sends such a product to MKL's
    matrix-vector kernel, which runs on one thread (and on AMD processors, MKL's generic code):
    on the 2-core development machine it read the benchmark judge's weights at 11 GB/s of the
    memory's 27, and a Qwen3-4B MLP weight at 17. oneDNN's kernel for the same product (the op
    `torch.compile` itself emits for a CPU linear, taking the weight as it is, no copy) uses the
    intra-op threads: 1.2 to 3 times as fast for 1 to 16 rows, over weights of
    `ONEDNN_MIN_WEIGHT` elements and more (smaller ones keep `F.linear`). It sums in another
    order, so a decode step's logits equal the model's to float rounding (1e-6 here), as a
    prefill on a prefix already does; a warmed and a cold judgment decode alike, so warming
    still changes no verdict. Anywhere else, or where this torch has no such op or it does not
    answer as `F.linear` does, `F.linear` itself."""
    op = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or op is None or not torch.backends.mkldnn.is_available():
        return F.linear

    def product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if weight.numel() < ONEDNN_MIN_WEIGHT:
            return F.linear(x, weight, bias)
        return op(x, weight, bias, "none", [], None)

    with torch.inference_mode():
        probe, rows = torch.linspace(-1.0, 1.0, weight.shape[1])[None, None], weight[:16]
        try:
            answered = op(probe, rows, None, "none", [], None)
        except RuntimeError:
            return F.linear
        if not torch.allclose(answered, F.linear(probe, rows), rtol=1e-4, atol=1e-5):
            return F.linear
    return product


Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""(query, key, value) → attention output [batch, heads, new tokens, head_dim]."""

LayerAttend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""(layer index, query, new keys, new values) → attention output: stores the new keys and values
in the cache it was built over and attends over that cache."""


def _cached(kv: KVCache, attend: Attend) -> LayerAttend:
    """Attention over one cache of `kv.batch` aligned rows."""
    return lambda index, query, key, value: attend(query, *kv.layers[index].append(key, value))


class LeanQwen3:
    """The model's weights (shared, not copied) and its forward pass. Built once per engine or
    stream monitor: gathering the weights is itself a few hundred attribute lookups. `model` is
    a `Qwen3ForCausalLM` (logits) or a bare `Qwen3Model` backbone (hidden states only)."""

    def __init__(self, model: Any, *, compiled: bool = False) -> None:
        """`compiled`: its decode step is to be traced by `torch.compile`, which picks the
        products' kernels itself (and takes oneDNN's op only over weights it holds as
        constants), so the step multiplies with `F.linear`."""
        if not supports(model):
            raise ValueError(f"the in-process engine runs Qwen3 models (full attention, SiLU), not {type(model).__name__}")
        inner, config = (model.model, model.config) if isinstance(model, Qwen3ForCausalLM) else (model, model.config)
        self.embed = inner.embed_tokens.weight
        self.rotary = inner.rotary_emb
        self.final_norm = inner.norm.weight
        self.lm_head = model.lm_head.weight if isinstance(model, Qwen3ForCausalLM) else None
        self.eps = config.rms_norm_eps
        self.row_product = F.linear if compiled else row_products(self.embed)
        self.layer_count = config.num_hidden_layers
        self.kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = inner.layers[0].self_attn.scaling
        self.query_heads = config.num_attention_heads
        half = self.head_dim // 2
        self.sin_signs = torch.tensor([-1.0] * half + [1.0] * half, dtype=self.embed.dtype, device=self.embed.device)
        self.layers = [
            _Layer(
                layer.input_layernorm.weight,
                _linear(layer.self_attn.q_proj),
                _linear(layer.self_attn.k_proj),
                _linear(layer.self_attn.v_proj),
                _linear(layer.self_attn.o_proj),
                torch.cat((layer.self_attn.q_norm.weight.expand(config.num_attention_heads, -1),
                           layer.self_attn.k_norm.weight.expand(config.num_key_value_heads, -1))),
                layer.post_attention_layernorm.weight,
                layer.mlp.gate_proj.weight,
                layer.mlp.up_proj.weight,
                layer.mlp.down_proj.weight,
            )
            for layer in inner.layers
        ]

    def new_cache(self, batch: int, capacity: int, *, growable: bool = False) -> KVCache:
        return KVCache.empty(self.layer_count, batch, self.kv_heads, capacity, self.head_dim,
                             dtype=self.embed.dtype, device=self.embed.device, growable=growable)

    def _hidden(
        self, tokens: torch.Tensor, positions: torch.Tensor, attend: LayerAttend, stop: Stop | None = None, product: Product = F.linear
    ) -> torch.Tensor:
        """Final hidden states [batch, new, hidden] of `tokens` ([batch, new]) before the final
        norm; `attend` stores their keys and values wherever their rows' caches are, and every
        weight is applied with `product`. `stop`
        is asked before each layer after the first: a long prefill nobody waits for any more
        ends within a layer's work, not a whole forward's."""
        batch, new = tokens.shape
        eps = self.eps
        hidden = F.embedding(tokens, self.embed)
        # `transformers` rotates with `x * cos + rotate_half(x) * sin`, where rotate_half(x) is
        # (-x2, x1); (x2, x1) * (-sin1, sin2) is the same products to the bit (a sign is exact),
        # one roll instead of two slices, a negation and a concatenation
        cos, sin = self.rotary(hidden, positions)
        cos, sin = cos[:, :, None], (sin * self.sin_signs)[:, :, None]
        shape, half, heads = (batch, new, -1, self.head_dim), self.head_dim // 2, self.query_heads
        for index, layer in enumerate(self.layers):
            if index and stop is not None and stop():
                raise Stopped
            normed = _norm(hidden, layer.input_norm, eps)
            # query and key heads side by side, normed and rotated in one pass: each head's norm
            # reads only its own row, so the values are the model's two separate calls' exactly
            both = torch.cat((product(normed, *layer.q).view(shape), product(normed, *layer.k).view(shape)), 2)
            both = _norm(both, layer.qk_norm, eps)
            both = (both * cos + both.roll(half, -1) * sin).transpose(1, 2)
            query, key = both[:, :heads], both[:, heads:]
            value = product(normed, *layer.v).view(shape).transpose(1, 2)
            out = attend(index, query, key, value).transpose(1, 2).reshape(batch, new, -1)
            hidden = hidden + product(out, *layer.o)
            normed = _norm(hidden, layer.post_norm, eps)
            hidden = hidden + product(F.silu(product(normed, layer.gate)) * product(normed, layer.up), layer.down)
        return hidden

    def _logits(self, hidden: torch.Tensor, product: Product = F.linear) -> torch.Tensor:
        assert self.lm_head is not None, "a bare backbone has no logits"
        return product(_norm(hidden, self.final_norm, self.eps), self.lm_head)

    def decode_step(self, tokens: torch.Tensor, positions: torch.Tensor, kv: KVCache, mask: torch.Tensor | None) -> torch.Tensor:
        """Logits [batch, vocab] for one new token per row, the model's (to float rounding where
        `row_product` is not `F.linear`). `tokens` and
        `positions` are [batch, 1]; `mask` is the 2-D padding mask over cache plus new token, or
        None when no row is padded (then SDPA runs unmasked, as `transformers` does for an
        all-ones mask)."""
        attend_mask = None if mask is None else mask[:, None, None, :].bool()
        groups, scale = self.groups, self.scaling

        def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
            if groups == 1:
                return F.scaled_dot_product_attention(query, key, value, attn_mask=attend_mask, scale=scale)
            if attend_mask is None:
                return F.scaled_dot_product_attention(query, key, value, scale=scale, enable_gqa=True)
            # one query per row: its heads become queries of their key/value head (`pack_gqa`)
            batch = query.shape[0]
            packed = query.reshape(batch, -1, groups, query.shape[-1])
            out = F.scaled_dot_product_attention(packed, key, value, attn_mask=attend_mask, scale=scale)
            return out.reshape(batch, -1, 1, value.shape[-1])

        product = self.row_product
        return self._logits(self._hidden(tokens, positions, _cached(kv, attend), product=product)[:, -1], product)

    def prefill(self, tokens: torch.Tensor, kv: KVCache, stop: Stop | None = None) -> torch.Tensor:
        """Logits [1, vocab] after `tokens` ([1, new]) that continue the `kv.length` tokens
        already in `kv`, appending theirs (raises `Stopped` where `stop` says so)."""
        return self._logits(self.extend(tokens, kv, stop)[:, -1])

    def extend(self, tokens: torch.Tensor, kv: KVCache, stop: Stop | None = None) -> torch.Tensor:
        """Hidden states [1, new, hidden] (before the final norm) of `tokens` continuing `kv`."""
        start = kv.length
        positions = torch.arange(start, start + tokens.shape[1], device=tokens.device)[None]
        return self._hidden(tokens, positions, _cached(kv, self._prefill_attend(start)), stop)

    def extend_packed(self, rows: Sequence[tuple[torch.Tensor, KVCache]]) -> list[torch.Tensor]:
        """Hidden states [new, hidden] (before the final norm) of each row's `tokens` ([new])
        continuing that row's own single-row cache, in one forward.

        Rows of different lengths over caches of different lengths are packed end to end into
        one sequence, not padded: the projections and MLPs, which read every weight, run once
        for all of them, and each row attends alone over its own cache with the very call
        `extend` makes for it, so no mask is needed and a row's result does not depend on the
        others beyond float rounding in the shared matrix products."""
        sizes = [len(tokens) for tokens, _ in rows]
        starts = [kv.length for _, kv in rows]
        attends = [self._prefill_attend(start) for start in starts]
        positions = torch.cat([torch.arange(start, start + size) for start, size in zip(starts, sizes)])

        def attend(index: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
            parts = zip(query.split(sizes, 2), key.split(sizes, 2), value.split(sizes, 2), rows, attends)
            return torch.cat([row_attend(q, *kv.layers[index].append(k, v)) for q, k, v, (_, kv), row_attend in parts], 2)

        tokens = torch.cat([tokens for tokens, _ in rows])[None]
        return list(self._hidden(tokens, positions.to(tokens.device)[None], attend)[0].split(sizes))

    def final_norm_of(self, hidden: torch.Tensor) -> torch.Tensor:
        return _norm(hidden, self.final_norm, self.eps)

    def _prefill_attend(self, start: int) -> Attend:
        """Causal attention of new tokens over `start` cached ones plus themselves.

        With nothing cached this is the model's own call (causal SDPA, no mask). On top of a
        prefix, `transformers` passes an explicit bottom-right causal mask, which sends CPU SDPA
        to its masked kernel: on a judge prompt two to three times the unmasked flash kernel
        (benchmarks/RESULTS.md), enough that reusing a short shared header made prefill slower
        than starting over. For a float32 model on CPU each layer therefore attends twice with
        the flash kernel, unmasked over the prefix and causally over the new tokens, and merges
        the two by their log-sum-exps in float32: the same softmax, to float rounding. In a
        16-bit dtype that merge is not the model's arithmetic (the fused kernel rounds its
        probabilities to the input dtype before weighting the values; a float32 merge of two
        partial results moved logits by ~0.02 on average from `generate`'s), and a 16-bit judge
        must write what `generate` writes, so it takes the model's masked call, as on a GPU."""
        groups, scale = self.groups, self.scaling
        if start == 0:
            return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=groups > 1)
        flash = getattr(torch.ops.aten, _CPU_FLASH, None)
        if self.embed.device.type == "cpu" and self.embed.dtype == torch.float32 and flash is not None:
            def split(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
                # no mask over the prefix, so a key/value head's query heads attend as one block
                # of queries (`pack_gqa`): each cached key and value is read once per block, not
                # once per query head (7% off this call with 8 query heads on 2, 15% with 32 on 8)
                batch, heads, count, size = query.shape
                packed = query.reshape(batch, key.shape[1], heads // key.shape[1] * count, size)
                old, old_lse = flash(packed, key[:, :, :start], value[:, :, :start], 0.0, False, scale=scale)
                old, old_lse = old.reshape(query.shape), old_lse.reshape(batch, heads, count)
                new, new_lse = flash(query, key[:, :, start:], value[:, :, start:], 0.0, True, scale=scale)
                top = torch.maximum(old_lse, new_lse)
                old_weight, new_weight = (old_lse - top).exp()[..., None], (new_lse - top).exp()[..., None]
                return (old * old_weight + new * new_weight) / (old_weight + new_weight)

            return split

        def masked(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
            new, total = query.shape[2], key.shape[2]
            allowed = torch.ones((new, total), dtype=torch.bool, device=query.device).tril(total - new)
            if groups > 1:  # as `transformers` does for a masked call (masked GQA is slow on CUDA)
                key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
            return F.scaled_dot_product_attention(query, key, value, attn_mask=allowed, scale=scale)

        return masked
