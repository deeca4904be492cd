"""Single-process FSDP (gloo, CPU) with SpectralMoE; run by tests/test_distributed.py in a fresh process.

Usage: python tests/fsdp_worker.py OUT_DIR. Wraps a SpectralMoE-adapted ViT (with a depth model) in FSDP1 with every
ViT block in its own unit and activation checkpointing around the blocks; runs two forwards before one backward and
writes the adapter gradients, plus those of the same model without FSDP, to OUT_DIR/grads.pt; then saves the adapter
from the FSDP model (full state dict) and writes the outputs of a fresh model loaded from it to OUT_DIR/reload.pt.
Then the same training step under FSDP2 (fully_shard per adapted block and on the model): OUT_DIR/grads_fsdp2.pt.
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # this checkout, as for the tests run from its root

from ddp_worker import free_port  # noqa: E402


def two_forwards(model, images) -> None:
    torch.manual_seed(7)
    first = model(pixel_values=images[0]).last_hidden_state
    second = model(pixel_values=images[1]).last_hidden_state
    (first.pow(2).mean() + second.sin().mean()).backward()


def main(out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    torch.set_num_threads(1)
    import transformers as tf
    from peft import PeftModel, get_peft_model
    from tiny_models import make_depth_model, make_model
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
    from torch.distributed.fsdp import FullStateDictConfig, FullyShardedDataParallel as FSDP, StateDictType
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    import spectralmoe_peft
    from spectralmoe_peft import SpectralMoELayer

    config = spectralmoe_peft.SpectralMoEConfig(num_experts=3, num_tokens=4, expert_rank=2, init_weights=False,
                                                scale_init=0.5)
    model = get_peft_model(make_model("dinov2"), config)
    model.set_depth_model(make_depth_model())
    model.train()
    reference = copy.deepcopy(model)
    reference.set_depth_model(make_depth_model())
    images = [torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    two_forwards(reference, images)
    expected = {n: p.grad.clone() for n, p in reference.named_parameters() if p.grad is not None}

    # the recipe of docs/reliability.md: one FSDP unit per adapted block (SpectralMoELayer holds the block and its
    # experts and gates), checkpointing around the ViT blocks, use_orig_params for peft's frozen/trainable mix
    sharded = FSDP(model, auto_wrap_policy=ModuleWrapPolicy({SpectralMoELayer}), use_orig_params=True,
                   device_id=torch.device("cpu"))
    apply_activation_checkpointing(sharded, check_fn=lambda m: isinstance(m, tf.models.dinov2.modeling_dinov2.Dinov2Layer))
    two_forwards(sharded, images)
    clean = lambda n: n.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")
    got = {clean(n): p.grad.clone() for n, p in sharded.named_parameters() if p.grad is not None}
    torch.save({"expected": expected, "got": got}, Path(out) / "grads.pt")

    with FSDP.state_dict_type(sharded, StateDictType.FULL_STATE_DICT, FullStateDictConfig(rank0_only=True)):
        full = sharded.state_dict()
    # peft picks the adapter tensors out of the full state dict (FSDP and the checkpoint wrapper strip their prefixes)
    sharded.module.save_pretrained(Path(out) / "adapter", state_dict=full)
    loaded = PeftModel.from_pretrained(make_model("dinov2"), Path(out) / "adapter")
    loaded.set_depth_model(make_depth_model())
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reloaded = loaded.eval()(pixel_values=x).last_hidden_state
        original = reference.eval()(pixel_values=x).last_hidden_state  # same weights: no optimizer step was taken
    torch.save({"reloaded": reloaded, "original": original}, Path(out) / "reload.pt")
    # FSDP2: fully_shard each adapted block, then the model (the update scale s is (1,): FSDP refuses 0-d parameters)
    from torch.distributed.fsdp import fully_shard

    model2 = get_peft_model(make_model("dinov2"), config)
    model2.set_depth_model(make_depth_model())
    model2.load_state_dict(reference.state_dict())
    model2.train()
    apply_activation_checkpointing(model2, check_fn=lambda m: isinstance(m, tf.models.dinov2.modeling_dinov2.Dinov2Layer))
    for layer in [m for m in model2.modules() if isinstance(m, SpectralMoELayer)]:
        fully_shard(layer)
    fully_shard(model2)
    two_forwards(model2, images)
    got2 = {clean(n): (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
            for n, p in model2.named_parameters() if p.grad is not None}
    torch.save({"expected": expected, "got": got2}, Path(out) / "grads_fsdp2.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
