"""SpectralMoEModel: the tuner. Finds the ViT blocks and runs peft's lifecycle; everything a working model needs lives
in the model itself.

The modules the paper shares across blocks (W_t2f, W_delta, s, the depth projection), the attached depth model and
the per-forward machinery are held by ``SpectralMoEShared`` at ``model.spectralmoe`` (shared.py), inside the adapted
model: peft's ``inject_adapter_in_model`` (and so transformers' ``add_adapter`` / ``load_adapter``) keeps only the
model and drops this tuner, and the model must work without it. Shared tensors are named
``spectralmoe.spectralmoe_<name>.<adapter>[.weight]``, so peft saves, loads (under any adapter name) and deletes them
with the per-block ones, in every peft version this package supports.
"""

from __future__ import annotations

import re
from typing import Any, Optional, Union

import torch
from peft.tuners.tuners_utils import BaseTuner, _ExcludedModule
from torch import Tensor, nn

from .architectures import BlockStack, find_block_stack
from .bands import prepare_input_bands
from .config import SpectralMoEConfig
from .forward_state import RoutingStats
from .layer import MERGE_REFUSAL, SpectralMoELayer, check_adapter_name
from .registration import PREFIX
from .shared import HOLDER_NAME, SHARED_NAMES, SpectralMoEShared, find_holder


class SpectralMoEModel(BaseTuner):
    """Creates a SpectralMoE model from a HF ViT (or a HF model that wraps one).

    Example:
        ```py
        >>> import spectralmoe_peft
        >>> from peft import get_peft_model
        >>> model = get_peft_model(vit, spectralmoe_peft.SpectralMoEConfig(num_experts=6, top_k=1))
        >>> model.set_depth_model(depth_model)
        >>> out = model(pixel_values=x)
        >>> task_loss(out).backward()  # the balance loss rides along in the graph
        ```
    """

    prefix: str = PREFIX
    tuner_layer_cls = SpectralMoELayer
    target_module_mapping: dict = {}
    # the shared modules live in the model (model.spectralmoe), not on this tuner: inject_adapter_in_model works
    uses_shared_state: bool = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # 0.1.0 saved the shared tensors as base_model.spectralmoe_*: move them to the model, whose hook converts them
        self._register_load_state_dict_pre_hook(self._move_tuner_level_keys)

    # --- setup -------------------------------------------------------------------------------------------------------

    @property
    def _holder(self) -> SpectralMoEShared:
        holder = self.__dict__.get("_injecting") or find_holder(self.model)
        if holder is None:
            raise RuntimeError("This model carries no SpectralMoE adapter any more (it was unloaded).")
        return holder

    def inject_adapter(self, model: nn.Module, adapter_name: str, **kwargs: Any) -> None:
        check_adapter_name(adapter_name)
        config = self.peft_config[adapter_name]
        holder = find_holder(model)
        if holder is not None and adapter_name in holder.spectralmoe_configs:
            raise ValueError(
                f"This base model already carries SpectralMoE adapters ({sorted(holder.spectralmoe_configs)}), one "
                f"named {adapter_name!r} among them (get_peft_model called twice on the same model, e.g. by re-running "
                "a notebook cell, or PeftModel.from_pretrained onto a model that get_peft_model already wrapped): build "
                "a fresh base model, or add another adapter under another name with peft_model.add_adapter(name, "
                "config) / load_adapter(path, name) (transformers: model.load_adapter(path, adapter_name=name))."
            )
        prepare_input_bands(model, config)  # records the bands, or widens the RGB base a multi-band adapter needs
        stack = find_block_stack(model, config.num_prefix_tokens)
        created = holder is None
        if created:  # the first adapter of this model, through get_peft_model or inject_adapter_in_model
            holder = SpectralMoEShared(model, stack)
        object.__setattr__(holder, "stack", stack)
        holder.add(adapter_name, config)  # before the blocks' tensors: the same seed gives the same adapter as 0.1.0
        # a new holder joins the model only after peft's injection: peft >= 0.21 takes a model that already holds a
        # tuner layer for one adapted before, and would then restore the base weights' trainability
        self.__dict__["_injecting"] = holder
        try:
            super().inject_adapter(model, adapter_name, **kwargs)
        except Exception:  # leave no half-made adapter behind
            holder.delete_adapter(adapter_name)
            raise
        finally:
            del self.__dict__["_injecting"]
        if created:
            holder.attach()
        adapted = [m for m in model.modules() if isinstance(m, SpectralMoELayer) and adapter_name in m.spectralmoe_A]
        for layer in adapted:  # the 'mean' reduction of the balance loss divides by this
            layer.spectralmoe_num_adapted_blocks[adapter_name] = len(adapted)

    def _prepare_adapter_config(self, peft_config: SpectralMoEConfig, model_config: dict) -> SpectralMoEConfig:
        return peft_config  # target_modules=None means "the ViT blocks", resolved by structure below

    def _check_target_module_exists(self, peft_config: SpectralMoEConfig, key: str):
        stack: BlockStack = self._block_stack
        layers = peft_config.layers_to_transform
        if layers is not None:
            beyond = [i for i in ([layers] if isinstance(layers, int) else layers) if i >= stack.num_blocks]
            if beyond:
                raise ValueError(
                    f"SpectralMoEConfig.layers_to_transform: {beyond} out of range; this ViT has {stack.num_blocks} "
                    f"blocks, so valid indices are 0 .. {stack.num_blocks - 1}."
                )
        if key == HOLDER_NAME or key.startswith(f"{HOLDER_NAME}."):
            return False  # the holder of the shared modules (shared.py), never a target
        index = stack.block_index(key)
        excluded = peft_config.exclude_modules
        if excluded:
            if isinstance(excluded, str) and re.fullmatch(excluded, key):
                return _ExcludedModule()
            if not isinstance(excluded, str) and (key in excluded or any(key.endswith(f".{e}") for e in excluded)):
                return _ExcludedModule()
        # a module to save (or anything inside it) is trained in full, not adapted; names are matched literally,
        # as dotted components ("head(" is a name, not a broken regex)
        if peft_config.modules_to_save and any(f".{m}." in f".{key}." for m in peft_config.modules_to_save):
            return _ExcludedModule()
        targets = peft_config.target_modules
        if targets is None:
            matched = index is not None
        elif isinstance(targets, str):
            matched = re.fullmatch(targets, key) is not None
        else:
            matched = key in targets or any(key.endswith(f".{t}") for t in targets)
        if not matched:
            return False
        if index is None:
            raise ValueError(
                f"SpectralMoE refines the output of ViT blocks, but target_modules matched '{key}', which is not one "
                f"of the blocks '{stack.block_name(0)}' .. '{stack.block_name(stack.num_blocks - 1)}'."
            )
        layers = peft_config.layers_to_transform
        if layers is not None:
            layers = [layers] if isinstance(layers, int) else layers
            return index in layers
        return True

    def _create_and_replace(
        self,
        peft_config: SpectralMoEConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        stack: BlockStack = self._block_stack
        if isinstance(target, SpectralMoEShared):
            return  # named by an adapter state dict (inject_adapter_in_model(state_dict=...)): not a block
        if isinstance(target, SpectralMoELayer):
            target.update_layer(adapter_name, peft_config)
            return
        new_module = SpectralMoELayer(
            target,
            adapter_name,
            peft_config,
            block_index=stack.block_index(current_key),
            num_blocks=stack.num_blocks,
            hidden_size=stack.hidden_size,
            num_prefix_tokens=stack.num_prefix_tokens,
            shared=self._shared,
        )
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added adapter is not trainable until made active
        self._replace_module(parent, target_name, new_module, target)

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        # blocks have no .weight for peft's generic version to copy; device and dtype are set in update_layer
        setattr(parent, child_name, new_module)

    # --- adapter management -----------------------------------------------------------------------------------------

    # peft < 0.21 visits only SpectralMoELayer modules here (layer_cls=tuner_layer_cls): the holder is told explicitly

    def set_adapter(self, adapter_name, inference_mode: bool = False) -> None:
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        self._holder.set_adapter(adapter_name, inference_mode=inference_mode)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._holder.delete_adapter(adapter_name)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
        if not autocast_adapter_dtype:
            return
        for container in self._holder._containers():
            if adapter_name in container:
                item = container[adapter_name]
                if isinstance(item, nn.Module):
                    item.float()
                elif item.dtype in (torch.float16, torch.bfloat16):
                    container[adapter_name] = item.float()

    def _check_merge_allowed(self) -> None:
        raise ValueError(MERGE_REFUSAL)

    def merge_adapter(self, *args: Any, **kwargs: Any) -> None:
        self._check_merge_allowed()

    def _unload_and_optionally_merge(self, merge: bool = True, *args: Any, **kwargs: Any):
        if merge:
            self._check_merge_allowed()
        for module in self.model.modules():
            if isinstance(module, SpectralMoELayer):
                module.remove_refine_hook()
        holder = find_holder(self.model)
        if holder is not None:
            holder.detach()  # its hooks and the model.spectralmoe child go: the base model is the original again
        return super()._unload_and_optionally_merge(merge, *args, **kwargs)

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names) -> dict:
        """peft >= 0.21 picks adapter tensors by the names of the tuner's modules; under FSDP or activation
        checkpointing those names carry wrapper parts (``_fsdp_wrapped_module.``) that a full state dict's keys do not.
        Every tensor of this method has a ``spectralmoe_*`` name component: take those too."""
        selected = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        for key, value in state_dict.items():
            if key not in selected and any(part.startswith(PREFIX) for part in key.split(".")):
                selected[key] = value
        return selected

    def _move_tuner_level_keys(self, state_dict: dict, prefix: str, *args: Any) -> None:
        """0.1.0 kept the shared tensors on the tuner (``base_model.spectralmoe_delta[.<adapter>].weight``): hand them
        to the model (``base_model.model.spectralmoe_delta...``), whose load hook (shared.py) converts them."""
        for key in [k for k in state_dict if k.startswith(prefix) and k[len(prefix) :].split(".")[0] in SHARED_NAMES]:
            state_dict[f"{prefix}model.{key[len(prefix):]}"] = state_dict.pop(key)

    # --- the model-resident state, read through the tuner (the PeftModel API) ----------------------------------------

    def set_depth_model(self, depth_model: Union[nn.Module, str, None]) -> None:
        self._holder.set_depth_model(depth_model)

    set_depth_model.__doc__ = SpectralMoEShared.set_depth_model.__doc__

    @property
    def depth_model(self) -> Optional[nn.Module]:
        return self._holder.depth_model

    def compute_depth_hidden_states(self, pixel_values: Tensor, adapter_name: Optional[str] = None) -> tuple:
        return self._holder.compute_depth_hidden_states(pixel_values, adapter_name)

    compute_depth_hidden_states.__doc__ = SpectralMoEShared.compute_depth_hidden_states.__doc__

    def get_aux_loss(self) -> Tensor:
        return self._holder.get_aux_loss()

    get_aux_loss.__doc__ = SpectralMoEShared.get_aux_loss.__doc__

    def get_routing_stats(self, adapter_name: Optional[str] = None) -> dict[int, dict[str, RoutingStats]]:
        return self._holder.get_routing_stats(adapter_name)

    get_routing_stats.__doc__ = SpectralMoEShared.get_routing_stats.__doc__

    # where earlier versions kept these (tests, benchmarks and user code read them through the tuner)
    _shared = property(lambda self: self._holder.shared)
    _block_stack = property(lambda self: self._holder.stack)
    _depth_stream = property(lambda self: self._holder._depth_stream)
    _last_forward = property(lambda self: self._holder._last_forward)
    spectralmoe_token_to_feature = property(lambda self: self._holder.spectralmoe_token_to_feature)
    spectralmoe_delta = property(lambda self: self._holder.spectralmoe_delta)
    spectralmoe_scale = property(lambda self: self._holder.spectralmoe_scale)
    spectralmoe_depth_projection = property(lambda self: self._holder.spectralmoe_depth_projection)
    spectralmoe_elevation_encoder = property(lambda self: self._holder.spectralmoe_elevation_encoder)
