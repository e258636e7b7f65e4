"""How the update is carried out: plain torch (the bare trainer) or DeepSpeed (the Ray trainer).

Both split the parameters the same way (`optim.build_param_groups`): AdamW for the embedding and the
lm_head, Muon for the hidden matrices.

Why the DeepSpeed backend is a hybrid (see shared/DEEPSPEED_MUON.md, measured on DeepSpeed 0.19.8):
under ZeRO-1/2 a client optimizer only sees flat 1-D partitions, so Muon cannot run inside DeepSpeed's
optimizer; DeepSpeed's built-in Muon clips Muon updates by default, picks parameters by name and runs
Newton-Schulz in fp16/bf16. So DeepSpeed ZeRO shards the AdamW parameters (and their state), and raychat's
own distributed Muon (optim.py: gradients averaged across ranks, Newton-Schulz split across ranks) updates
the matrices. It is exact by construction: the same Muon code runs in the single-process reference.

Mixed precision: the weights and DeepSpeed stay fp32; on GPU the forward pass runs under bf16 autocast,
as nanochat does.
"""
from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path

import torch
import torch.distributed as dist

from raychat.optim import Muon, build_param_groups


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class TrainBackend:
    """Common parts: parameter groups, schedules, autocast, loss/token reduction across ranks."""

    def __init__(self, model: torch.nn.Module, train_cfg, device: str, dtype: str):
        self.model = model
        self.device = device
        self.world = _world()
        # weights stay fp32 (the optimizers' master copy); bf16 is autocast for the forward pass
        self.autocast = (torch.autocast(device_type="cuda" if device == "cuda" else "cpu", dtype=torch.bfloat16)
                         if dtype == "bf16" else contextlib.nullcontext())
        self.adamw_groups, self.muon_params = build_param_groups(
            model, train_cfg.embedding_lr, train_cfg.unembedding_lr, train_cfg.matrix_lr, train_cfg.weight_decay)
        self.muon = Muon(self.muon_params, lr=train_cfg.matrix_lr, momentum=0.95)
        self.grad_clip = train_cfg.grad_clip
        self._grad_norm = float("nan")

    # -- schedules ------------------------------------------------------------------------------------
    def adamw_param_groups(self) -> list[dict]:
        raise NotImplementedError

    def set_hyperparameters(self, lr_mult: float, momentum: float) -> None:
        for group in self.adamw_param_groups():
            group["lr"] = group["initial_lr"] * lr_mult
        for group in self.muon.param_groups:
            group["lr"] = group["initial_lr"] * lr_mult
            group["momentum"] = momentum

    def last_grad_norm(self) -> float:
        return self._grad_norm

    def all_reduce_mean_and_sum(self, mean_value: float, sum_value: int) -> tuple[float, int]:
        """Loss averaged over ranks, tokens summed over ranks (one small collective per step)."""
        if self.world == 1:
            return mean_value, sum_value
        t = torch.tensor([mean_value, float(sum_value)], dtype=torch.float64,
                         device=self.device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t)
        return t[0].item() / self.world, int(t[1].item())

    def _muon_step(self) -> float:
        """Muon averages its gradients across ranks, then updates; returns their global norm."""
        self.muon.step()
        norm = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in self.muon_params if p.grad is not None))
        self.muon.zero_grad(set_to_none=True)
        return float(norm)


class TorchBackend(TrainBackend):
    """Plain torch: one process, or several under torchrun with gradients averaged by hand."""
    kind = "torch"

    def __init__(self, model, train_cfg, device, dtype):
        super().__init__(model, train_cfg, device, dtype)
        fused = device == "cuda"
        self.adamw = torch.optim.AdamW(self.adamw_groups, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0, fused=fused)
        self.adamw_params = [p for g in self.adamw_groups for p in g["params"]]

    def adamw_param_groups(self):
        return self.adamw.param_groups

    def forward(self, inputs, targets):
        with self.autocast:
            return self.model(inputs, targets)

    def forward_backward(self, inputs, targets, grad_accum_steps: int, last: bool):
        loss = self.forward(inputs, targets)
        (loss / grad_accum_steps).backward()
        if last:
            if self.world > 1:
                for p in self.adamw_params:
                    dist.all_reduce(p.grad)
                    p.grad.div_(self.world)
            adamw_norm = self._clip_or_norm(self.adamw_params)
            self.adamw.step()
            self.adamw.zero_grad(set_to_none=True)
            self._grad_norm = math.sqrt(adamw_norm ** 2 + self._muon_step() ** 2)
        return loss

    def _clip_or_norm(self, params) -> float:
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    # -- checkpoint state (weights are saved separately, as safetensors) -------------------------------
    def save_state(self, directory: Path, rank: int) -> None:
        torch.save({"adamw": self.adamw.state_dict(), "muon": self.muon.state_dict()},
                   directory / f"optim_rank{rank:03d}.pt")

    def load_state(self, directory: Path, rank: int) -> None:
        state = torch.load(directory / f"optim_rank{rank:03d}.pt", map_location=self.device, weights_only=False)
        self.adamw.load_state_dict(state["adamw"])
        self.muon.load_state_dict(state["muon"])


class DeepSpeedBackend(TrainBackend):
    """DeepSpeed ZeRO-1/2 engine for the AdamW parameters + raychat's distributed Muon for the matrices."""
    kind = "deepspeed"

    def __init__(self, model, train_cfg, device, dtype, micro_batch_size: int, grad_accum_steps: int):
        super().__init__(model, train_cfg, device, dtype)
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if device == "cuda" else "cpu")
        import deepspeed
        self.client_adamw = torch.optim.AdamW(self.adamw_groups, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0)
        ds_config = {
            "train_micro_batch_size_per_gpu": micro_batch_size,
            "gradient_accumulation_steps": grad_accum_steps,
            "zero_optimization": {"stage": train_cfg.zero_stage},
            "zero_allow_untested_optimizer": True,   # a torch optimizer under ZeRO
            "gradient_clipping": train_cfg.grad_clip,  # explicit: 0.19.8 defaults to 1.0
            "steps_per_print": 10**12,
            "wall_clock_breakdown": False,
        }
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=self.client_adamw, config=ds_config)
        if train_cfg.compile and device == "cuda":
            self.engine.compile()

    def adamw_param_groups(self):
        # under ZeRO the client optimizer's groups hold the flat partitions but keep our keys (initial_lr)
        return self.client_adamw.param_groups

    def forward(self, inputs, targets):
        with self.autocast:
            return self.engine(inputs, targets)

    def forward_backward(self, inputs, targets, grad_accum_steps: int, last: bool):
        loss = self.forward(inputs, targets)
        self.engine.backward(loss)   # DeepSpeed scales by 1/grad_accum_steps and reduces the AdamW grads
        if last:
            assert self.engine.is_gradient_accumulation_boundary()
            muon_norm = self._muon_step()   # DeepSpeed does not touch the Muon gradients (not in its optimizer)
        self.engine.step()               # AdamW update on the boundary, bookkeeping otherwise
        if last:
            adamw_norm = self.engine.get_global_grad_norm()
            adamw_norm = float(adamw_norm) if adamw_norm is not None else 0.0
            self._grad_norm = math.sqrt(adamw_norm ** 2 + muon_norm ** 2)
        return loss

    def save_state(self, directory: Path, rank: int) -> None:
        # collective: every rank writes its ZeRO partition of the AdamW state
        self.engine.save_checkpoint(str(directory), tag="deepspeed", save_latest=False)
        torch.save({"muon": self.muon.state_dict()}, directory / f"muon_rank{rank:03d}.pt")

    def load_state(self, directory: Path, rank: int) -> None:
        load_path, _ = self.engine.load_checkpoint(str(directory), tag="deepspeed", load_optimizer_states=True,
                                                   load_lr_scheduler_states=False)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load its state from {directory}")
        state = torch.load(directory / f"muon_rank{rank:03d}.pt", map_location=self.device, weights_only=False)
        self.muon.load_state_dict(state["muon"])
