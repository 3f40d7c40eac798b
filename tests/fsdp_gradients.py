"""Run by torchrun with 2 processes (gloo): FSDP v2 sharding a converted SEA Llama as conversion/accelerate/fsdp.yaml
configures it (its layer class to wrap, its reshard_after_forward) gives the estimator, trained alone, the gradient
one process computes on the whole batch; each process prints one JSON line, with the error that backward raises
when FSDP reshards the parameters after the forward instead."""

import dataclasses
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import TrainingArguments

from conftest import dense_test_model
from conversion.convert import convert_to_sea
from training.sea_trainer import OUTPUT_LOSSES, SeaDistillationArguments, SeaDistillationTrainer, is_estimator_parameter

ESTIMATOR_LOSSES = dataclasses.replace(SeaDistillationArguments(), **dict.fromkeys(OUTPUT_LOSSES, 0.0))


def student(teacher):
    torch.manual_seed(1)
    model = convert_to_sea(teacher, sea_key_budget=8, sea_compressed_width=16).train()
    for name, param in model.named_parameters():
        param.requires_grad_(is_estimator_parameter(name))
    return model


def gradients(model, teacher, batch) -> dict:
    args = TrainingArguments(output_dir="unused", use_cpu=True, report_to="none")
    trainer = SeaDistillationTrainer(model=model, args=args, teacher=teacher, distillation=ESTIMATOR_LOSSES)
    trainer.compute_loss(model, batch).backward()
    return {name: param.grad for name, param in model.named_parameters() if param.grad is not None}


def sharded_gradients(teacher, batch, layer_class: str, reshard_after_forward: bool, mesh) -> dict:
    """The estimator's gradients, whole, with the student sharded as fsdp.yaml shards it (then its root)."""
    model = student(teacher)
    for module in [m for m in model.modules() if type(m).__name__ == layer_class] + [model]:
        fully_shard(module, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return {name: grad.full_tensor() for name, grad in gradients(model, teacher, batch).items()}


def main(config_path: str):
    fsdp = yaml.safe_load(Path(config_path).read_text())["fsdp_config"]
    layer_class = fsdp["fsdp_transformer_layer_cls_to_wrap"]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    teacher = dense_test_model("llama")
    ids = torch.randint(1, 100, (2 * world, 48), generator=torch.Generator().manual_seed(2))
    whole = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    mine = {name: tensor.chunk(world)[rank] for name, tensor in whole.items()}
    want = gradients(student(teacher), teacher, whole)
    got = sharded_gradients(teacher, mine, layer_class, fsdp["fsdp_reshard_after_forward"], mesh)
    try:
        sharded_gradients(teacher, mine, layer_class, True, mesh)
        resharded = "no error"
    except RuntimeError as error:
        resharded = str(error).splitlines()[0]
    line = json.dumps({"rank": rank, "wrapped": layer_class in {type(m).__name__ for m in student(teacher).modules()},
                       "same_parameters": sorted(got) == sorted(want),
                       "max_difference": max(float((got[k] - want[k]).abs().max()) for k in want),
                       "resharding_after_forward": resharded})
    os.write(1, (line + "\n").encode())  # one write call: the processes share the pipe (accelerate_probe.py)


if __name__ == "__main__":
    main(sys.argv[1])
