"""How the update is carried out: plain torch (one process, or ranks that average gradients by hand) or
DeepSpeed ZeRO (the Ray trainer's default). Both run the same step (step.py) through the same interface:
`forward_backward(batch, loss_fn, scale)` per micro-batch, then `optimizer_step()`.

Both split the parameters the same way (`optim.build_param_groups`): AdamW for the embedding and the
lm_head, Muon for the hidden matrices.

Why the DeepSpeed backend is a hybrid (docs/deepspeed_muon.md, measured on DeepSpeed 0.19.8): under
ZeRO-1/2 a client optimizer only sees flat 1-D partitions, so Muon cannot run inside DeepSpeed's
optimizer; DeepSpeed's built-in Muon clips Muon updates by default, picks parameters by name and runs
Newton-Schulz in fp16/bf16. So DeepSpeed ZeRO shards the AdamW parameters (and their state), and
raychat's own distributed Muon (optim.py) updates the matrices. It is exact by construction: the same
Muon code runs in the single-process reference.

Mixed precision: the weights and optimizer states stay fp32; on GPU the forward pass runs under bf16
autocast, as nanochat does.

torch.compile: only the callable the training step runs is compiled (`self.train_forward`, a compiled
copy of the model's forward). Evaluation, sampling and the KV-cache engine call the model itself, eager,
so their ever-changing shapes never recompile the training graph (nor keep other ranks waiting).
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.utils import clip_grads_with_norm_, get_total_norm

from raychat.model import compile_loss_kernel
from raychat.optim import Muon, build_adamw, build_param_groups, ns_dtype_for


def extensions_dir() -> Path:
    """Where DeepSpeed's JIT-compiled ops go: one cache per Python environment. On CPU, DeepSpeed compiles
    its shared-memory all-reduce op (25-70 s on 2 busy cores) into torch's extension cache, and the build
    file names this environment's paths, so environments sharing the default ~/.cache/torch_extensions
    (several checkouts, CI) rebuild it in turn: measured as part of nearly every demo run's start-up."""
    return Path(sys.prefix) / "torch_extensions"


def prebuild_deepspeed_ops() -> None:
    """Compile DeepSpeed's CPU shared-memory all-reduce op into `extensions_dir()` now (`make install`
    calls this), so that the first training run does not spend its start-up compiling it. Not needed
    where CUDA is available (the op is for CPU training)."""
    if torch.cuda.is_available():
        return
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(extensions_dir()))
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder
    builder = ShareMemCommBuilder()
    if builder.is_compatible(verbose=False):   # as DeepSpeed itself: elsewhere (macOS) it falls back to gloo
        builder.load(verbose=False)


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _norm(params) -> float:
    grads = [p.grad for p in params if p.grad is not None]
    return float(get_total_norm(grads)) if grads else 0.0


class TrainBackend:
    """Common parts: parameter groups, schedules, autocast, clipping, reductions across ranks."""
    kind = ""

    def __init__(self, model: torch.nn.Module, train_cfg, device: str, dtype: str, compile: bool | str = False):
        self.model = model
        self.device = device
        self.world = _world()
        # weights stay fp32 (the optimizers' master copy); bf16 is autocast for the forward pass
        self.autocast = (torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
                         if dtype == "bf16" else contextlib.nullcontext())
        self.adamw_groups, self.muon_params = build_param_groups(
            model, train_cfg.embedding_lr, train_cfg.unembedding_lr, train_cfg.matrix_lr, train_cfg.weight_decay)
        self.adamw_params = [p for g in self.adamw_groups for p in g["params"]]
        self.muon = Muon(self.muon_params, lr=train_cfg.matrix_lr, momentum=0.95,
                         ns_dtype=ns_dtype_for(train_cfg.muon_dtype, device))
        self.grad_clip = train_cfg.grad_clip
        # compile: False, True (inductor) or a torch.compile backend name (tests use "aot_eager" on CPU)
        compiler = compile if isinstance(compile, str) else "inductor"
        if compile:
            compile_loss_kernel(compiler)
        self.train_forward = torch.compile(model.forward, backend=compiler) if compile else model.forward

    # -- schedules ------------------------------------------------------------------------------------
    def adamw_param_groups(self) -> list[dict]:
        raise NotImplementedError

    def set_hyperparameters(self, lr_mult: float, momentum: float) -> None:
        for group in self.adamw_param_groups():
            group["lr"] = group["initial_lr"] * lr_mult
        for group in self.muon.param_groups:
            group["lr"] = group["initial_lr"] * lr_mult
            group["momentum"] = momentum

    def all_reduce_sum(self, values: list) -> list[float]:
        """Sums over the ranks of a few numbers (Python numbers or 0-d tensors), as Python floats."""
        if self.world == 1:
            return [float(v) for v in values]
        device = self.device if dist.get_backend() == "nccl" else "cpu"
        t = torch.stack([torch.as_tensor(v, dtype=torch.float64).to(device) for v in values])
        dist.all_reduce(t)
        return t.tolist()

    def _clip_coefficient(self, total_norm: float) -> float:
        """nanochat's clipping of all parameters together: scale every gradient by max_norm / norm when the
        global norm exceeds max_norm (grad_clip = 0: never)."""
        if self.grad_clip <= 0 or not math.isfinite(total_norm) or total_norm <= self.grad_clip:
            return 1.0
        return self.grad_clip / (total_norm + 1e-6)

    # -- checkpoint state (the weights are saved separately, once, as safetensors) ---------------------
    def optimizer_state(self) -> dict:
        raise NotImplementedError

    def load_optimizer_state(self, state: dict) -> None:
        raise NotImplementedError

    def save_state(self, directory: Path, rank: int) -> Path:
        path = directory / f"optim_rank{rank:03d}.pt"
        torch.save(self.optimizer_state(), path)
        return path

    def load_state(self, directory: Path, rank: int) -> None:
        """After the weights are loaded: this rank's optimizer state."""
        state = torch.load(directory / f"optim_rank{rank:03d}.pt", map_location=self.device, weights_only=True)
        self.load_optimizer_state(state)


class TorchBackend(TrainBackend):
    """Plain torch: one process, or several under torchrun / Ray with gradients averaged by hand."""
    kind = "torch"

    def __init__(self, model, train_cfg, device, dtype, compile: bool | str = False):
        super().__init__(model, train_cfg, device, dtype, compile)
        self.adamw = build_adamw(self.adamw_groups, fused=torch.device(device).type == "cuda")

    def adamw_param_groups(self):
        return self.adamw.param_groups

    def forward_backward(self, batch, loss_fn, scale: float) -> torch.Tensor:
        with self.autocast:
            loss = loss_fn(self.train_forward, batch)
        (loss * scale).backward()
        return loss.detach()

    def optimizer_step(self) -> float:
        """Average the gradients across ranks, clip them together if asked, update; returns the norm."""
        if self.world > 1:
            for p in self.adamw_params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)
                p.grad.div_(self.world)
        self.muon.reduce_gradients()
        total = math.hypot(_norm(self.adamw_params), _norm(self.muon_params))
        coefficient = self._clip_coefficient(total)
        if coefficient < 1.0:
            clip_grads_with_norm_(self.adamw_params + self.muon_params, self.grad_clip, torch.tensor(total))
        self.adamw.step()
        self.muon.step()
        self.adamw.zero_grad(set_to_none=True)
        self.muon.zero_grad(set_to_none=True)
        return total

    def optimizer_state(self) -> dict:
        return {"adamw": self.adamw.state_dict(), "muon": self.muon.state_dict()}

    def load_optimizer_state(self, state: dict) -> None:
        self.adamw.load_state_dict(state["adamw"])
        self.muon.load_state_dict(state["muon"])


class _TrainingForward(torch.nn.Module):
    """What DeepSpeed wraps: the model, called through its compiled forward, under the backend's autocast.

    Two DeepSpeed 0.19.8 behaviours make this wrapper necessary. `engine.compile()` would compile the
    model module in place, so that evaluation and decoding would run (and recompile) the compiled graph
    too. And `engine.forward` turns off a CUDA autocast that is on around it unless its own
    `torch_autocast` section is set: found on the first GPU run, where d20 trained in fp32 at 5 % MFU.
    Autocast entered here, inside the engine, holds whatever DeepSpeed does around it."""

    def __init__(self, model: torch.nn.Module, forward, autocast):
        super().__init__()
        self.model = model
        self._forward = forward   # a function, not a module: not registered, not in any state dict
        self._autocast = autocast

    def forward(self, *args, **kwargs):
        with self._autocast:
            return self._forward(*args, **kwargs)


class DeepSpeedBackend(TrainBackend):
    """DeepSpeed ZeRO-1/2 engine for the AdamW parameters + raychat's distributed Muon for the matrices."""
    kind = "deepspeed"

    def __init__(self, model, train_cfg, device, dtype, micro_batch_size: int, grad_accum_steps: int,
                 compile: bool | str = False):
        super().__init__(model, train_cfg, device, dtype, compile)
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.device(device).type == "cuda" else "cpu")
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(extensions_dir()))
        import deepspeed
        self.client_adamw = build_adamw(self.adamw_groups)
        ds_config = {
            "train_micro_batch_size_per_gpu": micro_batch_size,
            "gradient_accumulation_steps": grad_accum_steps,
            "zero_optimization": {"stage": train_cfg.zero_stage},
            "zero_allow_untested_optimizer": True,   # a torch optimizer under ZeRO
            "gradient_clipping": 0.0,   # explicit (0.19.8 defaults to 1.0); clipping is global, see optimizer_step
            "steps_per_print": 10**12,
            "wall_clock_breakdown": False,
            # bf16 autocast inside the engine (see _TrainingForward); no module communicates in bf16
            "torch_autocast": {"enabled": dtype == "bf16", "dtype": "bfloat16", "lower_precision_safe_modules": []},
        }
        self.engine, *_ = deepspeed.initialize(model=_TrainingForward(model, self.train_forward, self.autocast),
                                               optimizer=self.client_adamw, config=ds_config)
        self.zero = self.engine.optimizer   # DeepSpeedZeroOptimizer: holds the AdamW partitions

    def adamw_param_groups(self):
        # under ZeRO the client optimizer's groups hold the flat partitions but keep our keys (initial_lr)
        return self.client_adamw.param_groups

    def forward_backward(self, batch, loss_fn, scale: float) -> torch.Tensor:
        with self.autocast:
            loss = loss_fn(self.engine, batch)
        # scale_wrt_gas=False: the loss is already normalised over the whole step (no implicit 1/GAS)
        self.engine.backward(loss * scale, scale_wrt_gas=False)
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()   # DeepSpeed's micro-step bookkeeping; the update is in optimizer_step
        return loss.detach()

    def optimizer_step(self) -> float:
        assert self.engine.is_gradient_accumulation_boundary()
        self.muon.reduce_gradients()   # DeepSpeed does not touch the Muon gradients (not in its optimizer)
        muon_norm = _norm(self.muon_params)
        if self.grad_clip > 0:
            # One coefficient for all parameters: scale Muon's gradients here, and set DeepSpeed's clip
            # threshold so that its own factor (its norm / threshold) is the same global one.
            adamw_norm = float(self.zero.scaled_global_norm())
            total = math.hypot(adamw_norm, muon_norm)
            coefficient = self._clip_coefficient(total)
            if coefficient < 1.0:
                for p in self.muon_params:
                    p.grad.mul_(coefficient)
            self.zero.clip_grad = self.grad_clip * adamw_norm / total if coefficient < 1.0 else 0.0
        self.muon.step()
        self.muon.zero_grad(set_to_none=True)
        self.engine.step()               # AdamW update on the boundary
        adamw_norm = self.engine.get_global_grad_norm()
        adamw_norm = float(adamw_norm) if adamw_norm is not None else 0.0
        return math.hypot(adamw_norm, muon_norm)

    def optimizer_state(self) -> dict:
        # this rank's ZeRO partition of the AdamW state; DeepSpeed's own save_checkpoint would also write
        # a second copy of every weight
        return {"adamw": self.zero.optimizer.state_dict(), "muon": self.muon.state_dict()}

    def load_optimizer_state(self, state: dict) -> None:
        self.zero.optimizer.load_state_dict(state["adamw"])
        self.zero.refresh_fp32_params()   # ZeRO's fp32 partitions from the weights just loaded
        self.muon.load_state_dict(state["muon"])
