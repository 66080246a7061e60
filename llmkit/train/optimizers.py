"""The optimizer: AdamW (fused), Adam, SGD, 8-bit AdamW (torchao), Muon with AdamW (torch), DeepSpeed's CPU Adam.

Every group carries `lr_scale`, the multiple of the schedule's learning rate it trains at (LoRA+ trains LoRA's B
matrices faster); the loop sets each group's rate from it. Weight decay falls on matrices only.
"""

from __future__ import annotations

from typing import Any

import torch

from llmkit.config import OptimizerConfig
from llmkit.errors import UserError
from llmkit.train.strategies import Strategy

# Optimizers that keep their own state layout: a ZeRO/FSDP shard of it is not theirs to read.
SINGLE_PROCESS_STATE = ("adamw8bit", "muon")


def build_optimizer(
    model: Any, cfg: OptimizerConfig, strategy: Strategy | None = None, lora_plus_ratio: float = 1.0
) -> torch.optim.Optimizer:
    """The optimizer over `model`'s trained parameters (see the module's docstring).

    When DeepSpeed keeps optimizer states in CPU memory (the -offload strategies), Adam runs as DeepSpeed's
    CPU Adam with the same hyperparameters (Accelerate's automatic swap would drop betas and epsilon).
    """
    groups = _groups(model, cfg, lora_plus_ratio)
    if strategy is not None and strategy.offloads_optimizer:
        if cfg.name not in ("adamw", "adam"):
            raise UserError("optimizer offload runs Adam on the CPU; use optimizer.name=adamw or adam")
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, adamw_mode=cfg.name == "adamw")
    if cfg.name == "adamw":  # one fused kernel over all parameters, on CUDA and on CPU alike
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=True)
    if cfg.name == "adam":
        # Adam's weight decay is L2 added to the gradient (the classic form), unlike AdamW's decoupled decay.
        return torch.optim.Adam(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=True)
    if cfg.name == "adamw8bit":
        from torchao.optim import AdamW8bit

        return AdamW8bit(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    if cfg.name == "muon":
        return MuonWithAdamW(model, groups, cfg)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)


def _groups(model: Any, cfg: OptimizerConfig, lora_plus_ratio: float) -> list[dict[str, Any]]:
    """Parameter groups by (decayed, lr_scale): matrices decay, norms and biases do not; LoRA+'s B matrices apart.
    The two plain groups always exist (an empty one too), so an older run's optimizer state still loads."""
    kinds: dict[tuple[bool, float], list[torch.nn.Parameter]] = {(True, 1.0): [], (False, 1.0): []}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            shape = getattr(parameter, "ds_shape", parameter.shape)  # ZeRO-3 parameters are built sharded (1-D)
            scale = lora_plus_ratio if ".lora_B." in name else 1.0
            kinds.setdefault((len(shape) >= 2, scale), []).append(parameter)
    return [
        {"params": params, "weight_decay": cfg.weight_decay if decays else 0.0, "lr": cfg.lr * scale, "lr_scale": scale}
        for (decays, scale), params in kinds.items()
    ]


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon (torch.optim.Muon: momentum orthogonalized by Newton-Schulz) on the hidden layers' matrices, AdamW on
    everything else (embeddings, output head, norms, biases), as Muon's authors train. Muon's step is scaled to
    AdamW's update size (`adjust_lr_fn="match_rms_adamw"`, as Moonlight does), so one learning rate serves both.
    One optimizer to the loop: its groups are both parts' groups, its state dict holds both."""

    def __init__(self, model: Any, groups: list[dict[str, Any]], cfg: OptimizerConfig) -> None:
        embeddings = {id(m.weight) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m}
        hidden: list[dict[str, Any]] = []
        rest: list[dict[str, Any]] = []
        for group in groups:
            for use_muon in (True, False):
                params = [p for p in group["params"] if (p.ndim == 2 and id(p) not in embeddings) == use_muon]
                if params:
                    (hidden if use_muon else rest).append({**group, "params": params})
        if not hidden:
            raise UserError("optimizer.name=muon: no hidden-layer matrix trains here; use adamw")
        self.muon = torch.optim.Muon(
            hidden, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum, adjust_lr_fn="match_rms_adamw"
        )
        self.adamw = torch.optim.AdamW(rest or [{"params": []}], lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
        self.defaults = {"lr": cfg.lr}
        self.param_groups = self.muon.param_groups + self.adamw.param_groups
        self._parts = (self.muon, self.adamw)

    @property  # type: ignore[override]
    def state(self) -> dict[Any, Any]:
        return {**self.muon.state, **self.adamw.state}

    @state.setter
    def state(self, value: Any) -> None:
        pass  # each part keeps its own

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for part in self._parts:
            part.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self._parts:
            part.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.muon.load_state_dict(state_dict["muon"])
        self.adamw.load_state_dict(state_dict["adamw"])
