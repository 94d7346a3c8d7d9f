"""Surgery: physically remove the planned units, so the model really gets smaller and faster.

Everything works tensor by tensor on ``(name, tensor)`` pairs, so the same code slices a model's
in-memory state dict and (later) checkpoint shards streamed from disk. A layer whose attention
(MLP) lost every unit skips that block; with ``remove_empty_layers`` a layer that lost both is
dropped and the following layers are renumbered.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers.initialization import no_init_weights

from gp_lightning.model.gp_pruned.modeling_gp_pruned import GPPrunedForCausalLM
from gp_lightning.model.layout import ModelLayout, decoder_layers
from gp_lightning.selection.plan import PruningPlan
from gp_lightning.surgery.pruned_config import pruned_config
from gp_lightning.surgery.slicer import TensorSlicer, unit_rows

if TYPE_CHECKING:
    from gp_lightning.compensation.run import Compensation


def apply_plan(model: nn.Module, layout: ModelLayout, plan: PruningPlan, provenance: dict,
               compensation: Compensation | None = None, dtype: torch.dtype | None = None) -> GPPrunedForCausalLM:
    """Return a new, physically smaller model carrying the dense model's remaining weights (refit where
    ``compensation`` refit them), in ``dtype`` (default: the dense model's)."""
    config = pruned_config(model.config, layout, plan, provenance, compensation)
    config._attn_implementation = getattr(model.config, "_attn_implementation", None)
    dtype = dtype or next(model.parameters()).dtype
    device = torch.get_default_device()  # where a freshly constructed model would live
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    dense = model.state_dict()
    dense_storages = {tensor.untyped_storage().data_ptr() for tensor in dense.values()}
    state = {}
    for name, tensor in TensorSlicer(layout, plan, compensation, dtype).apply(dense.items()):
        if name in tied:
            continue  # the embedding, tied below
        tensor = tensor.to(device=device, dtype=dtype)
        if tensor.untyped_storage().data_ptr() in dense_storages:  # passed through unsliced: own it
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        state[name] = tensor
    del dense
    # Parameters on the meta device and no initialization: random weights that loading would overwrite
    # were most of the surgery's time. Buffers computed at construction (rotary frequencies) stay real.
    with init_empty_weights(include_buffers=False), no_init_weights():
        pruned = GPPrunedForCausalLM(config)
    missing, unexpected = pruned.load_state_dict(state, strict=False, assign=True)
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"Surgery produced a state dict that does not fit: missing={missing}, unexpected={unexpected}")
    if tied:
        pruned.tie_weights()
        if pruned.lm_head.weight is not pruned.model.embed_tokens.weight:
            raise RuntimeError("Surgery could not tie lm_head to the input embeddings")
    pruned.to(dtype)  # the buffers follow the weights' dtype, as in a model built and then cast
    left = [name for name, tensor in (*pruned.named_parameters(), *pruned.named_buffers()) if tensor.is_meta]
    if left:
        raise RuntimeError(f"Surgery left tensors without data: {left}")
    pruned.generation_config = model.generation_config
    return pruned.eval()


@torch.no_grad()
def mask_units(model: nn.Module, layout: ModelLayout, plan: PruningPlan) -> None:
    """Zero the planned units in a dense model in place (the reference that surgery must equal)."""
    for layer, lp, module in zip(layout.layers, plan.layers, decoder_layers(model), strict=True):
        gone = sorted(set(range(lp.num_groups)) - set(lp.keep_groups))
        if gone:
            attn = module.self_attn
            q_rows = unit_rows(gone, layer.queries_per_kv * layer.head_dim)
            kv_rows = unit_rows(gone, layer.head_dim)
            for proj, rows in ((attn.q_proj, q_rows), (attn.k_proj, kv_rows), (attn.v_proj, kv_rows)):
                proj.weight[rows] = 0
                if proj.bias is not None:
                    proj.bias[rows] = 0
            attn.o_proj.weight[:, q_rows] = 0
        gone_c = torch.tensor(sorted(set(range(lp.num_channels)) - set(lp.keep_channels)), dtype=torch.long)
        if gone_c.numel():
            mlp = module.mlp
            for proj in (mlp.gate_proj, mlp.up_proj):
                proj.weight[gone_c] = 0
                if proj.bias is not None:
                    proj.bias[gone_c] = 0
            mlp.down_proj.weight[:, gone_c] = 0
