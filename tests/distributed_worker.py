"""Run calibration (or compensation) on a tiny model under a launcher (torchrun) and save the result (rank 0).

Used by tests/test_distributed.py: every rank builds the same seeded model and windows, so the
result can be compared with one process on the same data. ``--cases FILE`` runs several cases
(a JSON list of option dicts, each with its own ``out``) one after the other in the same process
group, so one launch serves many tests; otherwise the options come from the command line. A case
with ``"kind": "compensation"`` runs the layer-by-layer refit instead (its Gram sums are all-reduced), one with
``"kind": "search"`` the width search (its fitness is measured on each rank's own windows).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import lightning as L
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import calibrate, tiny_model  # noqa: E402


def windows(count: int) -> torch.Tensor:
    return torch.randint(0, 101, (count, 16), generator=torch.Generator().manual_seed(7))


def model(arch: str) -> torch.nn.Module:
    return tiny_model(arch, gqa=2, num_kv=3, layers=2, seed=3)


class Kill(L.Callback):
    """Simulates preemption: exit the process right after batch ``after``."""

    def __init__(self, after: int) -> None:
        self.after = after

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        if batch_idx + 1 == self.after:
            os._exit(3)


def save_importance(importance: object, out: str) -> None:
    """Per-unit importance as safetensors, gradient statistics as JSON next to it."""
    tensors = {f"{kind}.{layer}": values.contiguous()
               for kind in ("attention", "mlp") for layer, values in getattr(importance, kind).items()}
    save_file(tensors, out)
    Path(out).with_suffix(".json").write_text(json.dumps(importance.gradient_statistics))


def compensation(rank: int = 0, world: int = 1) -> object:
    """The refit of tests/test_compensation.py's plan on 7 windows (this rank's shard of them)."""
    from test_compensation import WINDOWS, _plan

    from gp_lightning.compensation.config import CompensationConfig
    from gp_lightning.compensation.run import compensate
    from gp_lightning.model.layout import describe

    dense = tiny_model("qwen2", layers=4, gqa=2, num_kv=3)
    return compensate(dense, describe(dense), _plan(dense), WINDOWS[:7], CompensationConfig(), 2, rank, world)


def run_compensation(out: str) -> None:
    """:func:`compensation` over the ranks; rank 0 saves the weights and biases."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    result = compensation(dist.get_rank(), dist.get_world_size())
    if dist.get_rank() == 0:
        save_file({f"{layer}.{block}.{kind}": value.contiguous() for kind, values in (("w", result.weights),
                   ("b", result.biases)) for (layer, block), value in values.items()}, out)


def search(rank: int = 0, world: int = 1) -> dict:
    """``allocation: search`` of a tiny Qwen2 at 30% on 12 windows (each rank measures its own): the report."""
    from gp_lightning.calibration.baselines import magnitude_importance
    from gp_lightning.compensation.config import CompensationConfig
    from gp_lightning.model.layout import describe
    from gp_lightning.search.config import SearchConfig
    from gp_lightning.search.run import SearchInputs, search_allocation
    from gp_lightning.search.step import seeds
    from gp_lightning.selection.config import SelectionConfig
    from gp_lightning.selection.greedy import check_budget, select
    from gp_lightning.table.build import build_table

    net = tiny_model("qwen2", gqa=2, num_kv=3, layers=4, seed=5, intermediate_size=48)
    with torch.no_grad():  # peaked next-token distributions: KL figures far above float32 rounding
        net.lm_head.weight *= 30
    layout = describe(net)
    table = build_table(layout, magnitude_importance(net, layout))
    config = SelectionConfig(pruning_ratio=0.3, min_attention_groups=0, min_mlp_channels=0)
    target = check_budget(layout, config)
    starts = seeds(table, layout, config, select(table, layout, config).plan, target)
    inputs = SearchInputs(net, layout, table, starts, windows(12)[:6], windows(12)[6:], target, config,
                          CompensationConfig(),
                          SearchConfig(search_generations=4, search_stage_windows=[1]), 2, 3, rank=rank, world=world)
    result = search_allocation(inputs)
    return {"kept": result.kept.tolist(), **result.report}


def run_case(args: argparse.Namespace) -> None:
    if args.kind == "compensation":
        run_compensation(args.out)
        return
    if args.kind == "search":
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo")
        report = search(dist.get_rank(), dist.get_world_size())
        if dist.get_rank() == 0:
            Path(args.out).write_text(json.dumps(report))
        return
    if args.from_dir:
        from gp_lightning.model.sharded import meta_model

        net = meta_model(Path(args.from_dir), torch.float32)
    else:
        net = model(args.arch)
    importance = calibrate(net, windows(args.windows), args.batch_size, args.method, precision=args.precision,
                           strategy=args.strategy, run_dir=args.run_dir, fisher_batch_size=args.fisher_batch_size,
                           checkpoint_every=args.checkpoint_every, resume=args.resume,
                           extra_callbacks=[Kill(args.kill_after)] if args.kill_after else None)
    if int(os.environ.get("RANK", "0")) == 0:
        save_importance(importance, args.out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", default=None, help="JSON file: a list of option dicts, run in order")
    parser.add_argument("--kind", default="calibration", choices=["calibration", "compensation", "search"])
    parser.add_argument("--strategy", default="ddp")
    parser.add_argument("--method", default="taylor")
    parser.add_argument("--arch", default="qwen2")
    parser.add_argument("--windows", type=int, default=7)
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--fisher_batch_size", type=int, default=None)
    parser.add_argument("--out", default=None)
    parser.add_argument("--run_dir", default=None, help="statistics checkpoints go into RUN_DIR/calibration_state")
    parser.add_argument("--checkpoint_every", type=int, default=0)
    parser.add_argument("--kill_after", type=int, default=0)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--from_dir", default=None, help="build on the meta device and load each rank's shard")
    args = parser.parse_args()
    if args.cases is None:
        run_case(args)
        return
    for case in json.loads(Path(args.cases).read_text()):
        run_case(argparse.Namespace(**(vars(args) | case)))


if __name__ == "__main__":
    main()
