"""Optimizers: Muon for the hidden matrices, AdamW for the embedding and the lm_head, and the schedules.

Muon (Keller Jordan) keeps a Nesterov momentum of each matrix's gradient and replaces the update by its
nearest semi-orthogonal matrix (all singular values ~1), computed with 5 Newton-Schulz iterations of a
quintic polynomial. Every direction of the matrix then learns at the same rate.

Distributed use (the trainer runs DeepSpeed ZeRO for the AdamW parameters and this Muon beside it): when
torch.distributed is initialised with world_size > 1, `Muon.step()` averages each gradient across ranks
itself, each rank orthogonalises only the matrices it owns (round-robin within each shape), and the
updates are all-gathered, so every rank applies the same update as a single process would, without
repeating the Newton-Schulz work on every rank. A rank keeps momentum only for the matrices it owns;
`consolidated_state_dict()` gathers all of it for a checkpoint, and `load_state_dict()` accepts it at any
world size.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

ADAMW_BETAS = (0.8, 0.95)
ADAMW_EPS = 1e-10
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # quintic: pushes singular values towards 1 fast


def build_param_groups(model, embedding_lr: float = 0.2, unembedding_lr: float = 0.004, matrix_lr: float = 0.02,
                       weight_decay: float = 0.0):
    """Split the model's parameters: AdamW groups for the embedding and the lm_head (learning rates
    scaled by (d_model / 768) ** -0.5, as tuned at width 768) and the list of matrices for Muon.
    Each AdamW group carries its own lr, initial_lr, betas, eps and weight_decay. (`matrix_lr` is the Muon
    lr; pass it to `Muon(muon_params, lr=matrix_lr)`.)"""
    model = getattr(model, "module", model)        # DeepSpeed engine / DDP
    model = getattr(model, "_orig_mod", model)     # torch.compile
    scale = (model.config.n_embd / 768) ** -0.5
    embedding = [model.transformer.wte.weight]
    unembedding = [model.lm_head.weight]
    matrices = list(model.transformer.h.parameters())
    if len(embedding) + len(unembedding) + len(matrices) != len(list(model.parameters())):
        raise ValueError("build_param_groups: the model has parameters outside wte, lm_head and the blocks")
    if any(p.ndim != 2 for p in matrices):
        raise ValueError("build_param_groups: Muon needs 2-D block parameters")
    groups = []
    for params, lr in ((unembedding, unembedding_lr), (embedding, embedding_lr)):
        groups.append({"params": params, "lr": lr * scale, "initial_lr": lr * scale, "betas": ADAMW_BETAS,
                       "eps": ADAMW_EPS, "weight_decay": weight_decay})
    return groups, matrices


def build_adamw(groups: list[dict], fused: bool = False) -> torch.optim.AdamW:
    """The AdamW for the embedding and the lm_head (groups from `build_param_groups`, which carry their own
    lr and weight decay); `fused` = one CUDA kernel for all parameters."""
    return torch.optim.AdamW(groups, betas=ADAMW_BETAS, eps=ADAMW_EPS, weight_decay=0.0, fused=fused)


def build_optimizers(model, embedding_lr: float = 0.2, unembedding_lr: float = 0.004, matrix_lr: float = 0.02,
                     weight_decay: float = 0.0):
    """(AdamW, Muon) for single-process training (tests, benchmarks)."""
    groups, matrices = build_param_groups(model, embedding_lr, unembedding_lr, matrix_lr, weight_decay)
    adamw = build_adamw(groups, fused=model.lm_head.weight.device.type == "cuda")
    return adamw, Muon(matrices, lr=matrix_lr)


def set_lr_multiplier(optimizers, multiplier: float) -> None:
    """lr = initial_lr x multiplier for every group of every optimizer."""
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * multiplier


# ------------------------------------------------------------------------------------------- schedules

def lr_multiplier(step: int, num_iterations: int, warmup_ratio: float = 0.0, warmdown_ratio: float = 0.2,
                  final_lr_frac: float = 0.0) -> float:
    """Linear warm-up over the first warmup_ratio of the steps, constant, then a linear warm-down over the
    last warmdown_ratio to final_lr_frac (reached at step == num_iterations)."""
    warmup = round(warmup_ratio * num_iterations)
    warmdown = round(warmdown_ratio * num_iterations)
    if step < warmup:
        return (step + 1) / warmup
    if step <= num_iterations - warmdown:
        return 1.0
    progress = max(0.0, (num_iterations - step) / warmdown)
    return progress + (1.0 - progress) * final_lr_frac


def muon_momentum(step: int) -> float:
    """Muon's momentum warms up from 0.85 to 0.95 over the first 300 steps."""
    frac = min(step / 300, 1.0)
    return (1 - frac) * 0.85 + frac * 0.95


# ----------------------------------------------------------------------------------------------- Muon

GRAM_SPLIT_MIN_ROWS = 256   # below this the extra calls of the block split cost more than the 1/4 they save


def _gram(X: torch.Tensor, base: torch.Tensor | None = None, beta: float = 0.0, alpha: float = 1.0) -> torch.Tensor:
    """beta * base + alpha * X X^T, for a matrix or a stack of matrices. X X^T is symmetric, so from
    GRAM_SPLIT_MIN_ROWS rows on it is computed as the upper half of its rows (one product) and the
    lower-right block, and the lower-left block is the transpose of the upper-right one: 3/4 of the
    multiply-adds (Newton-Schulz at d8's shapes measured ~11 % faster on a 2-core AVX512-BF16 CPU; the
    matrix products already ran at ~90 % of its bf16 peak, so doing fewer of them is what is left).
    `base` is added inside each product (fused, one rounding); it must be symmetric (A in Newton-Schulz
    is), as its lower-left block is taken from the upper-right one."""
    fused = torch.addmm if X.ndim == 2 else torch.baddbmm
    m = X.size(-2)
    if m < GRAM_SPLIT_MIN_ROWS or m % 2:
        return X @ X.mT if base is None else fused(base, X, X.mT, beta=beta, alpha=alpha)
    h = m // 2
    top, bottom = X[..., :h, :], X[..., h:, :]
    if base is None:
        upper, bottom_right = top @ X.mT, bottom @ bottom.mT          # upper = [top-left | top-right]
    else:
        upper = fused(base[..., :h, :], top, X.mT, beta=beta, alpha=alpha)
        bottom_right = fused(base[..., h:, h:], bottom, bottom.mT, beta=beta, alpha=alpha)
    lower = torch.cat([upper[..., h:].mT, bottom_right], -1)
    return torch.cat([upper, lower], -2)


def newton_schulz(G: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An approximately semi-orthogonal matrix close to G (U V^T of its SVD), by `steps` iterations of
    X <- aX + (bA + cA^2)X with A = XX^T. The quintic coefficients trade exactness for speed: singular
    values land roughly in [0.7, 1.2] rather than exactly at 1, which works as well for training.
    G may also be a stack of same-shape matrices (3-D): each is orthogonalised on its own, in batched
    matrix products."""
    a, b, c = NS_COEFFICIENTS
    if G.ndim not in (2, 3):
        raise ValueError(f"newton_schulz takes a matrix or a stack of matrices, got shape {tuple(G.shape)}")
    fused = torch.addmm if G.ndim == 2 else torch.baddbmm
    X = G.to(dtype, copy=True)   # our own copy, normalised in place (fresh buffers cost page faults on CPU)
    transposed = G.size(-2) > G.size(-1)
    if transposed:  # iterate on the wide side: XX^T is the smaller product
        X = X.mT
    X.div_(X.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        A = _gram(X)
        B = _gram(A, A, beta=b, alpha=c)   # bA + cA^2, with A^2 = AA^T as A is symmetric
        X = fused(X, B, X, beta=a)         # aX + BX, fused
    return X.mT if transposed else X


def orthogonalise(grads: list[torch.Tensor], steps: int = 5, dtype: torch.dtype = torch.float32,
                  stack: bool = False) -> list[torch.Tensor]:
    """`newton_schulz` of every matrix in `grads`, in the same order. With `stack`, matrices of one shape
    are stacked and orthogonalised together, one batched product per iteration instead of one per
    matrix (nanochat does this on GPUs, where it saves kernel launches). Each result equals the matrix's
    own `newton_schulz` either way (tested), so stacking cannot change training. On the 2-core CPU it
    is no faster (d8's 48 matrices in bf16: 902 vs 847 ms before `_gram`'s block split, 757 vs 749 ms
    with it: one product of a 512-row matrix already keeps both cores busy), so Muon stacks on CUDA only."""
    if not stack:
        return [newton_schulz(g, steps, dtype) for g in grads]
    by_shape: dict[tuple, list[int]] = {}
    for i, g in enumerate(grads):
        by_shape.setdefault(tuple(g.shape), []).append(i)
    out: list[torch.Tensor | None] = [None] * len(grads)
    for indices in by_shape.values():
        stacked = newton_schulz(torch.stack([grads[i] for i in indices]), steps, dtype)
        for i, x in zip(indices, stacked.unbind(0)):
            out[i] = x
    return out


def native_bf16(device: torch.device | str) -> bool:
    """Whether the device multiplies bf16 matrices natively: CUDA, or a CPU with AVX512-BF16 or AMX
    (there bf16 Newton-Schulz runs ~2-3x faster than fp32; on AVX2 it is emulated and slower)."""
    device = torch.device(device)
    if device.type == "cuda":
        return True
    return device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def ns_dtype_for(setting: str, device: torch.device | str) -> torch.dtype:
    """The Newton-Schulz dtype for a config setting: "bf16", "fp32", or "auto" (bf16 where native, as nanochat)."""
    if setting == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[setting]


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class Muon(torch.optim.Optimizer):
    """MomentUm Orthogonalized by Newton-Schulz, for 2-D parameters only.

    update = NS(nesterov_momentum(grad)) * sqrt(max(1, rows / cols)); p -= lr * update.
    Newton-Schulz runs in bf16 where the device multiplies bf16 natively (CUDA, as nanochat; CPUs with
    AVX512-BF16 or AMX) and fp32 elsewhere; set `ns_dtype` to choose (the equality tests use fp32).
    See the module docstring for the distributed behaviour.
    """

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5,
                 ns_dtype: torch.dtype | None = None):
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps)
        super().__init__(params, defaults)
        for group in self.param_groups:
            group.setdefault("initial_lr", group["lr"])
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon takes 2-D matrices only, got a parameter of shape {tuple(p.shape)}")
        self.ns_dtype = ns_dtype
        self._reduced = False   # gradients already averaged across ranks for the coming step

    def _assignments(self, group, world_size: int):
        """[(chunk, offset)] for one group: params of one shape are dealt out world_size at a time, and the
        k-th param of a chunk belongs to rank (offset + k) % world_size. The offset keeps rotating over
        the whole group, so ranks own equal numbers of matrices even when a shape count is not a multiple
        of the world size."""
        by_shape: dict[tuple, list] = {}
        for p in group["params"]:
            by_shape.setdefault(tuple(p.shape), []).append(p)
        chunks, offset = [], 0
        for params in by_shape.values():
            for start in range(0, len(params), world_size):
                chunk = params[start:start + world_size]
                chunks.append((chunk, offset))
                offset = (offset + len(chunk)) % world_size
        return chunks

    @staticmethod
    def _owned_by(rank: int, chunk: list, offset: int, world_size: int):
        k = (rank - offset) % world_size
        return chunk[k] if k < len(chunk) else None

    def _owned(self, world_size: int, rank: int) -> set[int]:
        owned = set()
        for group in self.param_groups:
            for chunk, offset in self._assignments(group, world_size):
                p = self._owned_by(rank, chunk, offset, world_size)
                if p is not None:
                    owned.add(id(p))
        return owned

    def _nesterov(self, p: torch.Tensor, grad: torch.Tensor, group) -> torch.Tensor:
        """Advance p's momentum with grad; return the Nesterov direction to orthogonalise. Computed in place
        in the (fp32) gradient, as nanochat does: nothing reads it after the step, and a fresh buffer per
        matrix costs page faults on CPU."""
        state = self.state[p]
        if "momentum_buffer" not in state:  # fp32 even for bf16 weights: small gradients must not vanish
            state["momentum_buffer"] = torch.zeros_like(grad, dtype=torch.float32)
        buf = state["momentum_buffer"]
        grad = grad.float()
        buf.lerp_(grad, 1 - group["momentum"])
        return grad.lerp_(buf, group["momentum"]) if group["nesterov"] else buf

    def _updates(self, params: list[torch.Tensor], group) -> list[torch.Tensor]:
        """The orthogonalised updates of `params` (in the Newton-Schulz dtype; `_apply` scales them)."""
        if not params:
            return []
        directions = [self._nesterov(p, p.grad, group) for p in params]
        device = params[0].device
        dtype = self.ns_dtype or ns_dtype_for("auto", device)
        return orthogonalise(directions, group["ns_steps"], dtype, stack=device.type == "cuda")

    @staticmethod
    def _apply(p: torch.Tensor, update: torch.Tensor, lr: float) -> None:
        """p -= lr * sqrt(max(1, rows / cols)) * update, the scale folded into add_'s alpha (one pass over
        the update, which may stay bf16) instead of a scaled copy."""
        p.add_(update, alpha=-lr * max(1.0, p.size(-2) / p.size(-1)) ** 0.5)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        rank, world_size = _world()
        self.reduce_gradients()
        self._reduced = False
        for group in self.param_groups:
            chunks = self._assignments(group, world_size)
            if world_size == 1:
                params = [chunk[0] for chunk, _ in chunks if chunk[0].grad is not None]
                for p, update in zip(params, self._updates(params, group)):
                    self._apply(p, update, group["lr"])
                continue
            # each rank orthogonalises its own matrix of every chunk (all of them in one call);
            # one all_gather per chunk shares the updates
            mine = [self._owned_by(rank, chunk, offset, world_size) for chunk, offset in chunks]
            owned = [p for p in mine if p is not None]
            updates = dict(zip(map(id, owned), self._updates(owned, group)))
            pending = []
            for (chunk, offset), p in zip(chunks, mine):
                update = updates[id(p)].to(p.dtype).contiguous() if p is not None else torch.zeros_like(chunk[0])
                received = [torch.empty_like(chunk[0]) for _ in range(world_size)]
                pending.append((chunk, offset, received, dist.all_gather(received, update, async_op=True)))
            for chunk, offset, received, work in pending:
                work.wait()
                for r, update in enumerate(received):
                    p = self._owned_by(r, chunk, offset, world_size)
                    if p is not None:
                        self._apply(p, update, group["lr"])
        return loss

    def reduce_gradients(self) -> None:
        """Average every gradient over the ranks (a missing gradient counts as zero, so that all ranks
        always join the same collectives). `step()` does it when it has not been done; a trainer that
        needs the averaged gradients first (clipping by the global norm) calls it before `step()`."""
        _, world_size = _world()
        if world_size == 1 or self._reduced:
            return
        self._reduced = True
        works = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                works.append((p.grad, dist.all_reduce(p.grad, op=dist.ReduceOp.SUM, async_op=True)))
        for grad, work in works:
            work.wait()
            grad.div_(world_size)

    # -- checkpoints ---------------------------------------------------------------------------------
    def consolidated_state_dict(self) -> dict:
        """The full optimizer state (every matrix's momentum) on every rank; a collective when distributed.
        Equal to `state_dict()` in a single process."""
        rank, world_size = _world()
        if world_size == 1:
            return self.state_dict()
        for group in self.param_groups:
            for chunk, offset in self._assignments(group, world_size):
                for k, p in enumerate(chunk):
                    owner = (offset + k) % world_size
                    has_state = torch.tensor([1 if "momentum_buffer" in self.state[p] else 0], device=p.device)
                    dist.all_reduce(has_state)  # only the owner can have it; every rank needs to know
                    if has_state.item():
                        if owner != rank:
                            self.state[p]["momentum_buffer"] = torch.empty_like(p, dtype=torch.float32)
                        dist.broadcast(self.state[p]["momentum_buffer"], src=owner)
        full = self.state_dict()
        self._drop_foreign_state(world_size, rank)
        return full

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        rank, world_size = _world()
        if world_size > 1:
            self._drop_foreign_state(world_size, rank)

    def _drop_foreign_state(self, world_size: int, rank: int) -> None:
        owned = self._owned(world_size, rank)
        for group in self.param_groups:
            for p in group["params"]:
                if id(p) not in owned and p in self.state:
                    del self.state[p]
