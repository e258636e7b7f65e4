"""The GPT model (nanochat architecture).

Rotary position embeddings, QK-norm, parameter-free RMSNorm, ReLU^2 MLP (4x), no biases, untied token
embedding and lm_head, logits soft-capped at 15. Attention goes through `scaled_dot_product_attention`,
so a GPU gets the flash kernel during training (no mask, `is_causal=True`).

The model is built on the meta device (no memory, no init work), moved with `to_empty(device=...)`, then
`init_weights()` fills it:

    with torch.device("meta"):
        model = GPT(GPTConfig(depth=20, vocab_size=65536))
    model.to_empty(device="cuda")
    model.init_weights()

Inference with a KV cache passes `kv_cache=` (see `KVCache`): each row of the batch may sit at its own
position, which is what continuous batching in `raychat.engine` needs.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

LOGIT_SOFTCAP = 15.0
ROTARY_BASE = 10000.0
ROTARY_LENGTH_FACTOR = 10  # rotary tables cover 10x the training context, so generation can run past it


@dataclass
class GPTConfig:
    """Model shape. Everything follows from the depth: width = 64 x depth, head dim 128."""
    depth: int
    vocab_size: int
    sequence_len: int = 2048
    n_kv_head: int | None = None  # grouped-query attention: fewer key/value heads; None = n_head

    def __post_init__(self):
        for name in ("depth", "vocab_size", "sequence_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if not (1 <= self.n_kv_head <= self.n_head) or self.n_head % self.n_kv_head:
            raise ValueError(f"GPTConfig.n_kv_head must divide n_head={self.n_head}, got {self.n_kv_head}")

    @property
    def n_layer(self) -> int:
        return self.depth

    @property
    def n_embd(self) -> int:
        return 64 * self.depth

    @property
    def head_dim(self) -> int:
        return 128 if self.n_embd >= 128 else self.n_embd

    @property
    def n_head(self) -> int:
        return max(1, self.n_embd // self.head_dim)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        return cls(**{k: d[k] for k in ("depth", "vocab_size", "sequence_len", "n_kv_head") if k in d})


def norm(x: torch.Tensor) -> torch.Tensor:
    """Parameter-free RMSNorm in the input's dtype. Autocast would run it on an fp32 copy of a bf16 input
    and keep that copy for backward (twice the bytes, four times per layer); rms_norm accumulates in
    fp32 internally either way."""
    if torch.is_autocast_enabled(x.device.type):
        with torch.autocast(x.device.type, enabled=False):
            return F.rms_norm(x, (x.size(-1),))
    return F.rms_norm(x, (x.size(-1),))   # no autocast: skip the context (decoding calls this ~100x a token)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half) of the head dimension. x: (B, T, H, D); cos/sin: (B|1, T, 1, D/2).
    Computed in x's dtype (bf16 under autocast, as nanochat), so no fp32 copy of q and k is made."""
    half = x.size(-1) // 2
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype matmuls run in here: autocast's when it is on for t's device, else t's own."""
    device_type = t.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return t.dtype


def autocast_context(device: str | torch.device):
    """bf16 autocast on CUDA; plain fp32 elsewhere (bf16 matmuls are ~3x slower on AVX2 CPUs)."""
    device_type = torch.device(device).type
    if device_type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------- KV cache

class KVCache:
    """Keys and values of every layer for up to `batch_size` rows of `max_seq_len` positions.

    Each row has its own length (`lengths[row]`, a Python int so that no step waits on the device). A
    forward pass with the cache processes the rows `[row_start, row_start + B)` (set with `select`), writes
    its new keys/values at each row's own positions and attends over that row's valid positions only.
    Rows that hold different prompts (different lengths) can therefore decode together in one pass.
    """

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int, max_seq_len: int,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        shape = (num_layers, batch_size, num_kv_heads, max_seq_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.lengths = [0] * batch_size
        self.row_start, self.row_stop = 0, batch_size
        self.key_len = 0         # during a forward pass: cache positions the selected rows attend over
        self._positions = None   # (B, T) absolute positions of the new tokens
        self.common_start = None # during a forward pass: the rows' shared start position, if they share one
        self._attend = None      # "causal", "all", or a (B, 1, T, key_len) boolean mask

    @property
    def batch_size(self) -> int:
        return self.k.size(1)

    @property
    def max_seq_len(self) -> int:
        return self.k.size(3)

    def select(self, start: int, stop: int) -> "KVCache":
        """The next forward pass works on rows [start, stop)."""
        if not 0 <= start < stop <= self.batch_size:
            raise ValueError(f"rows [{start}, {stop}) outside the cache's {self.batch_size} rows")
        self.row_start, self.row_stop = start, stop
        return self

    def reset(self, row: int) -> None:
        self.lengths[row] = 0

    def copy_row(self, src: int, dst: int) -> None:
        """Make row dst a copy of row src (shared prompt prefill, or compaction after a row is freed)."""
        n = self.lengths[src]
        self.k[:, dst, :, :n] = self.k[:, src, :, :n]
        self.v[:, dst, :, :n] = self.v[:, src, :, :n]
        self.lengths[dst] = n

    def resized(self, batch_size: int, max_seq_len: int) -> "KVCache":
        """A larger cache holding this one's contents (caches start small and grow on demand)."""
        layers, rows, heads, length, dim = self.k.shape
        bigger = KVCache(layers, batch_size, heads, dim, max_seq_len, self.k.device, self.k.dtype)
        keep_rows, keep_len = min(rows, batch_size), min(length, max_seq_len)
        bigger.k[:, :keep_rows, :, :keep_len] = self.k[:, :keep_rows, :, :keep_len]
        bigger.v[:, :keep_rows, :, :keep_len] = self.v[:, :keep_rows, :, :keep_len]
        bigger.lengths[:keep_rows] = self.lengths[:keep_rows]
        return bigger

    # -- used by GPT.forward -------------------------------------------------------------------------
    def begin(self, num_tokens: int) -> torch.Tensor:
        """Start a forward pass of `num_tokens` new tokens per selected row; returns their positions (B, T)."""
        starts = self.lengths[self.row_start:self.row_stop]
        if max(starts) + num_tokens > self.max_seq_len:
            raise ValueError(f"KV cache full: {max(starts)} + {num_tokens} tokens > max_seq_len {self.max_seq_len}")
        device = self.k.device
        offsets = torch.arange(num_tokens, device=device)
        positions = torch.tensor(starts, device=device)[:, None] + offsets[None, :]
        self._positions = positions
        # rows in lockstep (samples of one prompt, RL groups): slices instead of gathers and scatters
        self.common_start = starts[0] if all(s == starts[0] for s in starts) else None
        self.key_len = max(starts) + num_tokens
        if all(s == 0 for s in starts):
            self._attend = "causal"  # fresh prefill: plain causal attention (flash kernel on GPU)
        elif num_tokens == 1 and all(s == starts[0] for s in starts):
            self._attend = "all"     # decode step, rows in lockstep: every cached key is visible
        else:
            # row b's query at absolute position p sees keys 0..p of that row, nothing beyond
            keys = torch.arange(self.key_len, device=device)
            self._attend = (keys[None, None, :] <= positions[:, :, None])[:, None]  # (B, 1, T, L)
        return positions

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store this layer's new k, v (B, T, H, D); return all keys/values (B, H, L, D) and the mask mode."""
        if self.common_start is not None:
            span = slice(self.common_start, self.common_start + k.size(1))
            self.k[layer, self.row_start:self.row_stop, :, span] = k.transpose(1, 2)
            self.v[layer, self.row_start:self.row_stop, :, span] = v.transpose(1, 2)
        else:
            rows = torch.arange(self.row_start, self.row_stop, device=k.device)[:, None].expand_as(self._positions)
            self.k[layer][rows, :, self._positions] = k.to(self.k.dtype)
            self.v[layer][rows, :, self._positions] = v.to(self.v.dtype)
        keys = self.k[layer, self.row_start:self.row_stop, :, :self.key_len]
        values = self.v[layer, self.row_start:self.row_stop, :, :self.key_len]
        return keys, values, self._attend

    def end(self, num_tokens: int) -> None:
        for row in range(self.row_start, self.row_stop):
            self.lengths[row] += num_tokens
        self._positions = self._attend = self.common_start = None


# ------------------------------------------------------------------------------------------------- loss

LOSS_CHUNK_ELEMENTS = 2**28   # logits the loss holds at once (1 GiB in fp32): 4,096 rows at vocab 65,536


def _at_least_fp32(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def chunk_loss_and_grad(logits: torch.Tensor, targets: torch.Tensor, token_weights: torch.Tensor):
    """For one chunk of raw logits (n, V): sum_i w_i * CE(softcap(logits_i), t_i), and its gradient with
    respect to the raw logits, in the logits' dtype. Targets of -1 must carry weight 0.

    Written for eager CPU training, where each pass over the chunk costs as much as its share of the
    lm_head matmuls (d2 demo: this function was 45 % of a step): 8 passes instead of ~15, in place where
    possible. The soft-capped logits lie in [-15, 15], so exp cannot overflow in fp32 (the sum is at most
    V * e^15) and the usual max-shift of logsumexp, a pass of its own, is not needed."""
    t = torch.tanh_(logits.to(_at_least_fp32(logits.dtype)) / LOGIT_SOFTCAP)   # softcap(x) = 15 t
    exp = torch.exp_(t * LOGIT_SOFTCAP)
    sum_exp = exp.sum(dim=-1)
    safe = targets.clamp(min=0)[:, None]
    target_logit = LOGIT_SOFTCAP * t.gather(1, safe).squeeze(1)
    loss = ((torch.log(sum_exp) - target_logit) * token_weights).sum()
    grad = exp.mul_((token_weights / sum_exp)[:, None])                # w * softmax
    grad.scatter_add_(1, safe, -token_weights[:, None].to(grad.dtype))  # w * (softmax - onehot)
    grad.addcmul_(grad, t.square_(), value=-1)                          # through tanh: x (1 - t^2)
    return loss, grad.to(logits.dtype)


_chunk_kernel = chunk_loss_and_grad   # replaced by a compiled copy on GPU (compile_loss_kernel)


def compile_loss_kernel(backend: str = "inductor") -> None:
    """Fuse the loss kernel's element-wise work with torch.compile (GPU training): unfused it would read
    and write each chunk of logits about 15 times. Process-wide, like torch.compile's caches."""
    global _chunk_kernel
    if _chunk_kernel is chunk_loss_and_grad:
        _chunk_kernel = torch.compile(chunk_loss_and_grad, dynamic=False, backend=backend)


class _HeadCrossEntropy(torch.autograd.Function):
    """sum_i w_i * CE(softcap(x_i W^T), t_i) whose gradients are computed chunk by chunk in the forward pass.

    The (tokens x vocab) logits of a training micro-batch are the largest tensors of the step (d20 at
    32 x 2048: 8 GiB in bf16, 16 GiB for each fp32 copy autograd would keep). Here only one chunk of logits
    exists at a time; since the loss is the end of the graph, its gradient is known up to the scalar
    that backward brings, so backward only scales the stored gradients."""

    @staticmethod
    def forward(ctx, x, weight, targets, token_weights, chunk_rows: int):
        w = weight.to(x.dtype)
        grad_x = torch.empty(x.shape, dtype=_at_least_fp32(x.dtype), device=x.device)
        grad_w = torch.zeros(weight.shape, dtype=_at_least_fp32(weight.dtype), device=weight.device)
        total = torch.zeros((), dtype=_at_least_fp32(x.dtype), device=x.device)
        for start in range(0, x.size(0), chunk_rows):
            rows = slice(start, start + chunk_rows)
            loss, grad_logits = _chunk_kernel(x[rows] @ w.t(), targets[rows], token_weights[rows])
            total += loss
            grad_x[rows] = grad_logits @ w
            grad_w += grad_logits.t() @ x[rows]
        ctx.save_for_backward(grad_x, grad_w)
        ctx.dtypes = (x.dtype, weight.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_x, grad_w = ctx.saved_tensors
        x_dtype, w_dtype = ctx.dtypes
        return (grad_x * grad_total).to(x_dtype), (grad_w * grad_total).to(w_dtype), None, None, None


@torch.compiler.disable   # a compiled trunk stops here: the loss runs its own (compiled) chunk kernel
def head_loss(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None = None,
              reduction: str = "sum", chunk_rows: int | None = None) -> torch.Tensor:
    """Soft-capped cross-entropy of the lm_head over hidden states x (B, T, C) against targets (B, T),
    -1 = no loss; optional per-token `weights`. reduction "sum" | "mean" (over positions with a target) |
    "none" (B, T). Never materialises more than `chunk_rows` rows of logits, except for "none" with
    gradients (RL-style losses that need per-token values), which keeps one fp32 copy of the logits."""
    if reduction not in ("sum", "mean", "none"):
        raise ValueError(f"loss_reduction must be 'sum', 'mean' or 'none', got {reduction!r}")
    B, T, C = x.shape
    x, targets = x.reshape(-1, C), targets.reshape(-1)
    valid = targets >= 0
    loss_dtype = _at_least_fp32(x.dtype)
    token_weights = valid.to(loss_dtype) if weights is None else weights.reshape(-1).to(loss_dtype) * valid
    chunk_rows = chunk_rows or max(1, LOSS_CHUNK_ELEMENTS // weight.size(0))
    dtype = _compute_dtype(x)
    with torch.autocast(x.device.type, enabled=False):   # dtypes are explicit below
        x = x.to(dtype)
        if reduction != "none" and torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
            total = _HeadCrossEntropy.apply(x, weight, targets, token_weights, chunk_rows)
            return total if reduction == "sum" else total / valid.sum()
        if reduction == "none" and torch.is_grad_enabled():
            capped = LOGIT_SOFTCAP * torch.tanh((x @ weight.to(dtype).t()).to(loss_dtype) / LOGIT_SOFTCAP)
            losses = F.cross_entropy(capped, targets, ignore_index=-1, reduction="none") * token_weights
            return losses.view(B, T)
        losses = torch.empty(x.size(0), dtype=loss_dtype, device=x.device)
        w = weight.to(dtype)
        for start in range(0, x.size(0), chunk_rows):   # no gradients: chunks of logits, one at a time
            rows = slice(start, start + chunk_rows)
            capped = LOGIT_SOFTCAP * torch.tanh((x[rows] @ w.t()).to(loss_dtype) / LOGIT_SOFTCAP)
            losses[rows] = F.cross_entropy(capped, targets[rows], ignore_index=-1, reduction="none")
        losses = losses * token_weights
    if reduction == "none":
        return losses.view(B, T)
    return losses.sum() if reduction == "sum" else losses.sum() / valid.sum()


# ------------------------------------------------------------------------------------------------ model

class Linear(nn.Linear):
    """A bias-free nn.Linear whose CPU decoding path uses every core.

    Measured on the 2-core AVX2 machine: F.linear with 1-8 input rows runs a single-threaded
    matrix-vector product at ~7 GB/s of weights. Splitting the weight into one block of rows per thread
    and multiplying the blocks with one bmm runs on all cores: 2-3x faster per token at batch 1. Only
    inference on CPU takes this path (no autograd, same dtypes); training and GPUs use F.linear.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.size(-1)
        threads = torch.get_num_threads()
        if (rows > 8 or threads < 2 or x.device.type != "cpu" or torch.is_grad_enabled()
                or x.dtype != self.weight.dtype or self.out_features % threads):
            return F.linear(x, self.weight)
        blocks = self.weight.view(threads, self.out_features // threads, self.in_features)
        y = torch.bmm(blocks, x.reshape(rows, -1).t().expand(threads, -1, -1))  # (threads, out/threads, rows)
        return y.reshape(self.out_features, rows).t().reshape(*x.shape[:-1], self.out_features)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.c_q = Linear(config.n_embd, self.n_head * self.head_dim)
        self.c_k = Linear(config.n_embd, self.n_kv_head * self.head_dim)
        self.c_v = Linear(config.n_embd, self.n_kv_head * self.head_dim)
        self.c_proj = Linear(self.n_head * self.head_dim, config.n_embd)

    def forward(self, x, cos, sin, kv_cache: KVCache | None):
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        q, k = norm(apply_rotary(q, cos, sin)), norm(apply_rotary(k, cos, sin))  # QK-norm
        gqa = self.n_kv_head != self.n_head
        if kv_cache is None:
            # one dtype for SDPA whatever autocast made of the norms (bf16 on GPU: the flash kernel)
            q, k, v = q.transpose(1, 2).to(v.dtype), k.transpose(1, 2).to(v.dtype), v.transpose(1, 2)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            keys, values, attend = kv_cache.update(self.layer_idx, k, v)
            q = q.transpose(1, 2).to(keys.dtype)
            if isinstance(attend, str):
                y = F.scaled_dot_product_attention(q, keys, values, is_causal=attend == "causal", enable_gqa=gqa)
            else:
                y = F.scaled_dot_product_attention(q, keys, values, attn_mask=attend, enable_gqa=gqa)
        y = y.transpose(1, 2).reshape(B, T, -1).to(x.dtype)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, kv_cache):
        x = x + self.attn(norm(x), cos, sin, kv_cache)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(config.vocab_size, config.n_embd),
            "h": nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        })
        self.lm_head = Linear(config.n_embd, config.vocab_size)
        # rotary tables are derived, not learned: not saved in checkpoints (persistent=False)
        half = config.head_dim // 2
        rotary_len = config.sequence_len * ROTARY_LENGTH_FACTOR
        self.register_buffer("cos", torch.empty(rotary_len, half), persistent=False)
        self.register_buffer("sin", torch.empty(rotary_len, half), persistent=False)

    # -- initialisation -----------------------------------------------------------------------------
    @torch.no_grad()
    def init_rotary(self) -> None:
        half = self.config.head_dim // 2
        device = self.cos.device
        inv_freq = 1.0 / ROTARY_BASE ** (torch.arange(half, dtype=torch.float32, device=device) / half)
        t = torch.arange(self.cos.size(0), dtype=torch.float32, device=device)
        freqs = torch.outer(t, inv_freq)
        self.cos.copy_(freqs.cos())
        self.sin.copy_(freqs.sin())

    @torch.no_grad()
    def init_weights(self) -> None:
        """nanochat's init: N(0, 1) embedding; linear std 1/sqrt(fan_in) * min(1, sqrt(fan_out/fan_in));
        the lm_head and each block's output projections start at zero, so every block starts as identity."""
        nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=1.0)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                fan_out, fan_in = module.weight.shape
                std = 1.0 / math.sqrt(fan_in) * min(1.0, math.sqrt(fan_out / fan_in))
                nn.init.normal_(module.weight, mean=0.0, std=std)
        nn.init.zeros_(self.lm_head.weight)
        for block in self.transformer.h:
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
        self.init_rotary()

    # -- accounting ---------------------------------------------------------------------------------
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def estimate_flops(self) -> int:
        """Training FLOPs per token: 6 x (parameters except the embedding lookup) + attention scores and
        values over the full context (12 x layers x heads x head_dim x sequence_len)."""
        c = self.config
        matmul_params = self.num_params() - self.transformer.wte.weight.numel()
        return 6 * matmul_params + 12 * c.n_layer * c.n_head * c.head_dim * c.sequence_len

    # -- forward ------------------------------------------------------------------------------------
    def hidden_states(self, idx: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        """The trunk: token ids (B, T) -> final normalised hidden states (B, T, n_embd). Under autocast the
        residual stream is kept in the autocast dtype (bf16), as nanochat's bf16 embedding does."""
        B, T = idx.shape
        if kv_cache is None:
            if T > self.cos.size(0):
                raise ValueError(f"sequence of {T} tokens exceeds the rotary table ({self.cos.size(0)})")
            cos, sin = self.cos[None, :T, None, :], self.sin[None, :T, None, :]
        else:
            if B != kv_cache.row_stop - kv_cache.row_start:
                raise ValueError(f"batch of {B} rows but the KV cache selects {kv_cache.row_stop - kv_cache.row_start}")
            positions = kv_cache.begin(T)
            if kv_cache.key_len > self.cos.size(0):
                raise ValueError(f"position {kv_cache.key_len} exceeds the rotary table ({self.cos.size(0)})")
            if kv_cache.common_start is not None:
                span = slice(kv_cache.common_start, kv_cache.common_start + T)
                cos, sin = self.cos[None, span, None, :], self.sin[None, span, None, :]
            else:
                cos, sin = self.cos[positions][:, :, None, :], self.sin[positions][:, :, None, :]
        x = self.transformer.wte(idx)
        x = norm(x.to(_compute_dtype(x)))
        for block in self.transformer.h:
            x = block(x, cos, sin, kv_cache)
        if kv_cache is not None:
            kv_cache.end(T)
        return norm(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, kv_cache: KVCache | None = None,
                loss_reduction: str = "mean", *, last_only: bool = False, weights: torch.Tensor | None = None):
        """idx (B, T) token ids.

        With targets (-1 = no loss at that position): the soft-capped cross-entropy, a scalar for "sum" /
        "mean" (over the positions with a target) or per-token losses (B, T) for "none" (0 where ignored).
        `weights` (B, T), optional, multiplies each token's loss (RL advantages). The losses never hold the
        logits of the whole batch at once (see `head_loss`).
        Without targets: logits (B, T, V) in fp32, or (B, 1, V) for the last position only with
        `last_only=True` (what sampling needs)."""
        x = self.hidden_states(idx, kv_cache)
        if targets is None:
            if last_only:
                x = x[:, -1:]
            logits = self.lm_head(x).float()
            return LOGIT_SOFTCAP * torch.tanh(logits / LOGIT_SOFTCAP)
        return head_loss(x, self.lm_head.weight, targets, weights, loss_reduction)

    def new_kv_cache(self, batch_size: int, max_seq_len: int, dtype: torch.dtype | None = None) -> KVCache:
        """An empty cache for this model (bf16 on CUDA, fp32 elsewhere unless dtype is given)."""
        device = self.lm_head.weight.device
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else self.lm_head.weight.dtype
        c = self.config
        return KVCache(c.n_layer, batch_size, c.n_kv_head, c.head_dim, max_seq_len, device, dtype)


def build_model(config: GPTConfig, device: str | torch.device = "cpu", init: bool = True) -> GPT:
    """Construct on the meta device, allocate on `device`, then initialise (or leave for a checkpoint)."""
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    if init:
        model.init_weights()
    else:
        model.init_rotary()
    return model
