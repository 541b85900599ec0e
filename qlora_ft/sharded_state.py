"""Converting each engine's sharded state to and from the one checkpoint layout (full weights, optimizer state by
parameter position), so that a checkpoint resumes under any engine and process count: torch's optimizer numbering
(`by_position`), FSDP 2's state by parameter name, and DeepSpeed ZeRO-1/2's flat slices.
"""

from __future__ import annotations

from typing import Any

import torch


def trained_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of what the optimizer updates, in the optimizer's order (checkpoints index by it)."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def by_position(state: dict[str, Any], groups: list[dict[str, Any]], params: list[torch.nn.Parameter]):
    """torch's optimizer `state` numbers parameters in the order of its `groups`; the checkpoint numbers them by
    their position among the trained parameters (`params`), as every engine does: the same for one group, not
    for several (LoRA+). torch's `load_state_dict` reads either, as it pairs the numbers group by group."""
    position = {id(p): i for i, p in enumerate(params)}
    number = {k: position[id(p)] for k, p in enumerate(p for g in groups for p in g["params"])}
    if all(k == v for k, v in number.items()):
        return state
    return {
        "state": {number[k]: v for k, v in state["state"].items()},
        "param_groups": [{**g, "params": [number[k] for k in g["params"]]} for g in state["param_groups"]],
    }


# --- FSDP 2 ---------------------------------------------------------------------------------------------


def fsdp_optimizer_state(model, optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    by_name = get_optimizer_state_dict(model, optimizer.optimizer, options=options)
    if not by_name:  # the full state goes to the main process only
        return {}
    index = {name: i for i, (name, _) in enumerate(trained_parameters(model))}
    return {
        "state": {index[name]: state for name, state in by_name["state"].items()},
        "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in by_name["param_groups"]],
    }


def fsdp_set_optimizer_state(model, optimizer, state: dict[str, Any]) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = [n for n, _ in trained_parameters(model)]
    by_name = {
        "state": {names[i]: s for i, s in state["state"].items()},
        "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer.optimizer, by_name, options=StateDictOptions(full_state_dict=True))


# --- DeepSpeed ZeRO-1/2 ---------------------------------------------------------------------------------
# ZeRO keeps the float32 master weights and AdamW's moments as flat slices spread over the processes; its
# own checkpoints keep that layout. deepspeed.utils gathers and scatters them per parameter, which is all
# that is needed to write and read the engine-independent layout.

ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")


def fp32_masters(model) -> list[torch.Tensor]:
    """Copies of the trainable weights before DeepSpeed casts the model to 16 bits (restored as its float32
    masters by `set_fp32_masters`, so a run starts, or resumes, from exactly these values)."""
    return [p.detach().to("cpu", torch.float32, copy=True) for _, p in trained_parameters(model)]  # kept off the GPU


def set_fp32_masters(model, masters: list[torch.Tensor]) -> None:
    from deepspeed.utils import safe_set_full_fp32_param

    for (_, p), value in zip(trained_parameters(model), masters, strict=True):
        safe_set_full_fp32_param(p, value.to(p.device))


# DeepSpeed's dynamic loss scaler: what changes as it trains (its settings come from the config). DeepSpeed's own
# checkpoints pickle the whole object; these numbers are what a checkpoint loaded with weights_only can hold.
LOSS_SCALER_STATE = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")


def loss_scaler_state(scaler) -> dict[str, Any]:
    return {k: getattr(scaler, k) for k in LOSS_SCALER_STATE if hasattr(scaler, k)}


def set_loss_scaler_state(scaler, state: dict[str, Any]) -> None:
    for k, v in state.items():
        if k in LOSS_SCALER_STATE and hasattr(scaler, k):
            setattr(scaler, k, v)


def deepspeed_weights(module) -> dict[str, torch.Tensor]:
    from deepspeed.utils import safe_get_full_fp32_param

    # frozen weights as they are, trainable ones from the float32 masters; by identity, so that tied names
    # (GPT-2's lm_head and wte) keep sharing one tensor and are saved once
    masters = {id(p): safe_get_full_fp32_param(p).cpu() for _, p in trained_parameters(module)}
    return {name: masters.get(id(v), v.detach()) for name, v in module.state_dict(keep_vars=True).items()}


def zero_optimizer(optimizer):
    """(accelerate's wrapper ->) DeepSpeed's ZeRO optimizer -> the torch AdamW over its flat slices."""
    zero = optimizer.optimizer
    return zero, zero.optimizer


def deepspeed_optimizer_state(model, optimizer) -> dict[str, Any]:
    from deepspeed.utils import lazy_init_hp_params_optimizer_state, safe_get_full_optimizer_state

    zero, adamw = zero_optimizer(optimizer)
    # DeepSpeed links parameters to AdamW's state after the first group's first step, before a later one has any
    for i, flat in enumerate(zero.single_partition_of_fp32_groups):
        if flat in adamw.state:
            lazy_init_hp_params_optimizer_state(zero.bit16_groups[i], flat, adamw.state)
    params = [p for _, p in trained_parameters(model)]
    position = {id(p): i for i, p in enumerate(params)}
    # ZeRO keeps one flat slice per parameter group (LoRA+: several), over the group's parameters in order
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [position[id(p)] for p in members]}
              for g, members in zip(adamw.param_groups, zero.bit16_groups, strict=True)]  # fmt: skip
    if not adamw.state:  # no step taken yet
        return {"state": {}, "param_groups": groups}
    state = {}
    for flat, group in zip(zero.single_partition_of_fp32_groups, groups, strict=True):
        step = adamw.state[flat]["step"]  # every parameter of a group has taken its flat slice's steps
        for i in group["params"]:
            state[i] = {"step": step.clone().cpu(),
                        **{k: safe_get_full_optimizer_state(params[i], k).cpu() for k in ADAM_MOMENTS}}  # fmt: skip
    return {"state": state, "param_groups": groups}


def deepspeed_set_optimizer_state(model, optimizer, state: dict[str, Any]) -> None:
    from deepspeed.utils import lazy_init_hp_params_optimizer_state, safe_set_full_optimizer_state

    zero, adamw = zero_optimizer(optimizer)
    for group, saved in zip(adamw.param_groups, state["param_groups"], strict=True):
        group.update({k: v for k, v in saved.items() if k != "params"})
    if not state["state"]:
        return
    # DeepSpeed creates AdamW's state at its first step and links each parameter's slice of it then;
    # to restore a state before that, create it as torch's AdamW would and have DeepSpeed link it now.
    for i, flat in enumerate(zero.single_partition_of_fp32_groups):
        step = state["state"][state["param_groups"][i]["params"][0]]["step"]
        adamw.state[flat] = {"step": step.clone(), **{k: torch.zeros_like(flat) for k in ADAM_MOMENTS}}
        lazy_init_hp_params_optimizer_state(zero.bit16_groups[i], flat, adamw.state)
    for i, (_, p) in enumerate(trained_parameters(model)):
        for k in ADAM_MOMENTS:
            safe_set_full_optimizer_state(p, state["state"][i][k].to(p.device), k)
