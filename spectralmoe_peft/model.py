"""SpectralMoEModel: the tuner. Finds the ViT blocks, owns the cross-block modules, runs the depth stream.

Shared modules live here, one entry per adapter, named ``spectralmoe_<name>.<adapter>[.weight]`` like every adapter
tensor, so peft saves, loads (under any adapter name) and deletes them with the per-block ones, in every peft
version this package supports. The depth model is held outside the module tree: it moves with ``.to()`` and stays
in eval mode, but is never part of ``state_dict()`` and so never written into the adapter.
"""

from __future__ import annotations

import re
from typing import Any, Optional, Sequence, Union

import torch
from peft.tuners.tuners_utils import BaseTuner, _ExcludedModule
from torch import Tensor, nn

from .architectures import BlockStack, find_block_stack, patch_size_of, prefix_tokens_of
from .config import SpectralMoEConfig
from .context import DepthInput, ForwardContext, RoutingStats
from .depth import (
    depth_hidden_size,
    check_elevation,
    load_depth_model,
    normalize_for_depth,
    patch_validity,
    resize_to_patch_multiple,
    select_rgb,
)
from .layer import SharedModules, SpectralMoELayer, check_adapter_name
from .registration import PREFIX

def _depth_encoder(depth_model: nn.Module) -> nn.Module:
    """The part of the depth model whose hidden_states the adapters read. A depth-estimation model (Depth Anything,
    DPT with a backbone) computes them in its ViT backbone: run only that, not the neck and head it would discard."""
    backbone = getattr(depth_model, "backbone", None)
    if isinstance(backbone, nn.Module) and patch_size_of(getattr(backbone, "config", None)) is not None:
        return backbone
    return depth_model


class SpectralMoEModel(BaseTuner):
    """Creates a SpectralMoE model from a HF ViT (or a HF model that wraps one).

    Example:
        ```py
        >>> import spectralmoe_peft
        >>> from peft import get_peft_model
        >>> model = get_peft_model(vit, spectralmoe_peft.SpectralMoEConfig(num_experts=6, top_k=1))
        >>> model.set_depth_model(depth_model)
        >>> out = model(pixel_values=x)
        >>> loss = task_loss + model.get_aux_loss()
        ```
    """

    prefix: str = PREFIX
    tuner_layer_cls = SpectralMoELayer
    target_module_mapping: dict = {}
    uses_shared_state: bool = True

    # --- setup -------------------------------------------------------------------------------------------------------

    def _setup_shared_state(self, model: nn.Module) -> None:
        if "spectralmoe_token_to_feature" in self._modules:
            return
        self.spectralmoe_token_to_feature = nn.ModuleDict()
        self.spectralmoe_delta = nn.ModuleDict()
        self.spectralmoe_scale = nn.ParameterDict()
        self.spectralmoe_depth_projection = nn.ModuleDict()
        self.spectralmoe_elevation_encoder = nn.ModuleDict()
        context = ForwardContext()
        shared = SharedModules(
            token_to_feature=self.spectralmoe_token_to_feature,
            delta=self.spectralmoe_delta,
            scale=self.spectralmoe_scale,
            depth_projection=self.spectralmoe_depth_projection,
            elevation_encoder=self.spectralmoe_elevation_encoder,
            context=context,
        )
        # plain attributes: not submodules, not saved, not moved twice
        object.__setattr__(self, "_context", context)
        object.__setattr__(self, "_shared", shared)
        object.__setattr__(self, "_depth_model", None)
        object.__setattr__(self, "_adapters_enabled", True)
        object.__setattr__(self, "_block_stack", None)
        handle = model.register_forward_pre_hook(self._before_forward, with_kwargs=True)
        object.__setattr__(self, "_hook_handle", handle)
        done = model.register_forward_hook(self._after_forward)
        object.__setattr__(self, "_done_hook_handle", done)
        self._register_load_state_dict_pre_hook(self._check_adapter_state_dict)

    def _add_shared_modules(self, adapter_name: str, config: SpectralMoEConfig, stack: BlockStack) -> None:
        reference = next(self.model.parameters())
        factory = {"device": reference.device, "dtype": reference.dtype if reference.is_floating_point() else None}
        dim = stack.hidden_size
        token_to_feature = nn.Linear(dim, dim, **factory)
        delta = nn.Linear(dim, dim, **factory)
        if config.init_weights is True:  # exact identity: the update W_delta(.) is zero until trained
            nn.init.zeros_(delta.weight)
            nn.init.zeros_(delta.bias)
        self.spectralmoe_token_to_feature[adapter_name] = token_to_feature
        self.spectralmoe_delta[adapter_name] = delta
        self.spectralmoe_scale[adapter_name] = nn.Parameter(torch.tensor(float(config.scale_init), **factory))
        if not config.use_depth:
            return
        if config.depth_source == "elevation":  # a patch embedding of the elevation raster, on the ViT's grid
            patch = stack.patch_size
            self.spectralmoe_elevation_encoder[adapter_name] = nn.Conv2d(1, dim, patch, stride=patch, **factory)
        elif config.depth_hidden_size is not None and config.depth_hidden_size != dim:
            self.spectralmoe_depth_projection[adapter_name] = nn.Linear(config.depth_hidden_size, dim, **factory)

    def _remove_shared_modules(self, adapter_name: str) -> None:
        for container in self._shared_containers():
            if adapter_name in container:
                del container[adapter_name]

    def _shared_containers(self) -> list:
        if "spectralmoe_token_to_feature" not in self._modules:
            return []
        return [
            self.spectralmoe_token_to_feature,
            self.spectralmoe_delta,
            self.spectralmoe_scale,
            self.spectralmoe_depth_projection,
            self.spectralmoe_elevation_encoder,
        ]

    def inject_adapter(self, model: nn.Module, adapter_name: str, **kwargs: Any) -> None:
        check_adapter_name(adapter_name)
        config = self.peft_config[adapter_name]
        self._setup_shared_state(model)
        stack = find_block_stack(model, config.num_prefix_tokens)
        object.__setattr__(self, "_block_stack", stack)
        self._add_shared_modules(adapter_name, config, stack)
        try:
            super().inject_adapter(model, adapter_name, **kwargs)
        except Exception:
            self._remove_shared_modules(adapter_name)  # leave no half-made adapter behind
            raise
        self._set_shared_requires_grad()
        if config.inference_mode:  # loaded with is_trainable=False: frozen like its per-block tensors
            for container in self._shared_containers():
                if adapter_name in container:
                    container[adapter_name].requires_grad_(False)

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

    def _set_shared_requires_grad(self, inference_mode: bool = False) -> None:
        active = set(self.active_adapters)
        for container in self._shared_containers():
            for name, item in container.items():
                item.requires_grad_(name in active and not inference_mode)

    def set_adapter(self, adapter_name, inference_mode: bool = False) -> None:
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        self._set_shared_requires_grad(inference_mode)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._remove_shared_modules(adapter_name)
        self._set_shared_requires_grad()

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        super()._enable_adapter_layers(enabled)
        object.__setattr__(self, "_adapters_enabled", enabled)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
        if not autocast_adapter_dtype:
            return
        for container in self._shared_containers():
            if adapter_name in container:
                item = container[adapter_name]
                if isinstance(item, nn.Module):
                    item.float()
                elif item.dtype in (torch.float16, torch.bfloat16):
                    container[adapter_name] = item.float()

    def _check_merge_allowed(self) -> None:
        raise ValueError(
            "SpectralMoE adapters cannot be merged into the base weights: their routing depends on each input token. "
            "Use unload() to get the base model back, or keep the adapter."
        )

    def merge_adapter(self, *args: Any, **kwargs: Any) -> None:
        self._check_merge_allowed()

    def _unload_and_optionally_merge(self, merge: bool = True, *args: Any, **kwargs: Any):
        if merge:
            self._check_merge_allowed()
        for module in self.model.modules():
            if isinstance(module, SpectralMoELayer):
                module.remove_refine_hook()
        model = super()._unload_and_optionally_merge(merge, *args, **kwargs)
        for attribute in ("_hook_handle", "_done_hook_handle"):
            handle = getattr(self, attribute, None)
            if handle is not None:
                handle.remove()
        return model

    def _check_adapter_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        """Refuse incomplete or mismatched adapter weights (the released code only warned).

        Runs on every load_state_dict that reaches the tuner (peft's loading does, in every version), and checks the
        adapters whose weights the incoming state dict carries: each of their tensors must be present, with its shape.
        """
        scale_key = f"{prefix}spectralmoe_scale."
        loading = {key[len(scale_key) :] for key in state_dict if key.startswith(scale_key)}
        if not loading:
            return
        own = {f"{prefix}{key}": value for key, value in self.state_dict().items() if PREFIX in key}

        def adapter_of(key: str) -> Optional[str]:
            # parsed by structure, not by substring: the adapter name is the component right after the first
            # spectralmoe_<param> one (names like "1", "model" or "layer" also occur elsewhere in the key)
            parts = key[len(prefix) :].split(".")
            at = next((i for i, part in enumerate(parts) if part.startswith(PREFIX)), None)
            name = parts[at + 1] if at is not None and at + 1 < len(parts) else None
            return name if name in loading else None

        expected = {key: value for key, value in own.items() if adapter_of(key) is not None}
        incoming = {key: value for key, value in state_dict.items() if key.startswith(prefix) and PREFIX in key}
        missing = sorted(set(expected) - set(incoming))
        unexpected = sorted(set(incoming) - set(own))  # peft leaves keys it could not place un-renamed
        mismatched = [
            f"{key}: checkpoint {tuple(incoming[key].shape)} vs model {tuple(own[key].shape)}"
            for key in sorted(set(own) & set(incoming))
            if tuple(incoming[key].shape) != tuple(own[key].shape)
        ]
        problems = []
        if missing:
            problems.append(f"{len(missing)} adapter tensors missing from the checkpoint, e.g. {missing[:3]}")
        if unexpected:
            problems.append(
                f"{len(unexpected)} checkpoint tensors this model has no place for (was it trained on a deeper ViT or "
                f"other blocks?), e.g. {unexpected[:3]}"
            )
        if mismatched:
            problems.append(
                f"{len(mismatched)} shape mismatches (was it trained on a ViT of another width, or with other "
                f"num_experts/num_tokens/expert_rank?), e.g. {mismatched[:3]}"
            )
        if problems:
            raise ValueError(
                f"SpectralMoE adapter {sorted(loading)} does not fit this model: " + "; ".join(problems) + "."
            )

    # --- depth model --------------------------------------------------------------------------------------------

    def set_depth_model(self, depth_model: Union[nn.Module, str, None]) -> None:
        """Attach a frozen depth model (any HF model that returns ``hidden_states``); None detaches it.

        A string is a Hub id or local path, loaded with ``from_pretrained`` (its image processor's mean/std, when it
        has one, become the adapters' depth normalization) and remembered in the adapters' configs. The model is
        frozen, kept in eval mode, moved to the adapter's device, moves with ``.to()``, and is never saved.
        """
        if depth_model is None:
            object.__setattr__(self, "_depth_model", None)
            return
        name_or_path = None
        if isinstance(depth_model, str):
            name_or_path = depth_model
            depth_model, normalization = load_depth_model(name_or_path)
            for config in self.peft_config.values():
                if config.use_depth and config.depth_source == "model":
                    config.depth_model_name_or_path = name_or_path
                    if normalization is not None:
                        config.depth_image_mean, config.depth_image_std = normalization
        if not isinstance(depth_model, nn.Module):
            raise ValueError(f"set_depth_model expects a torch nn.Module, got {type(depth_model).__name__}.")
        if patch_size_of(getattr(depth_model, "config", None)) is None:
            raise ValueError(
                f"The depth model {type(depth_model).__name__} has no config with a patch_size: expected a HF ViT-based "
                "model that returns hidden_states (Depth Anything, DPT, Dinov2Model, ...)."
            )
        width = depth_hidden_size(depth_model)
        stack: BlockStack = self._block_stack
        for name, config in self.peft_config.items():
            if not config.use_depth or config.depth_source != "model" or width is None or width == stack.hidden_size:
                continue
            if config.depth_hidden_size != width:
                raise ValueError(
                    f"The depth model is {width} wide but the ViT is {stack.hidden_size} wide and adapter '{name}' "
                    f"has depth_hidden_size={config.depth_hidden_size}: create the adapter with "
                    f"SpectralMoEConfig(depth_hidden_size={width}) so a projection is trained."
                )
        depth_model.requires_grad_(False)
        depth_model.eval()
        reference = next(self.model.parameters())
        depth_model.to(reference.device)
        object.__setattr__(self, "_depth_model", depth_model)

    @property
    def depth_model(self) -> Optional[nn.Module]:
        return self._depth_model

    def _apply(self, fn, *args: Any, **kwargs: Any):
        super()._apply(fn, *args, **kwargs)
        depth_model = self.__dict__.get("_depth_model")
        if depth_model is not None:
            depth_model._apply(fn, *args, **kwargs)
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        depth_model = self.__dict__.get("_depth_model")
        if depth_model is not None:
            depth_model.eval()  # frozen: dropout and norm statistics never train
        return self

    # --- the forward pre-hook: depth stream and per-forward state ----------------------------------------------------

    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict):
        depth_hidden_states = kwargs.pop("depth_hidden_states", None)
        depth_pixel_values = kwargs.pop("depth_pixel_values", None)
        elevation = kwargs.pop("elevation", None)
        nodata_mask = kwargs.pop("nodata_mask", None)
        pixel_values = kwargs.get("pixel_values")
        if pixel_values is None and args and isinstance(args[0], Tensor):
            pixel_values = args[0]
        stack: BlockStack = self._block_stack
        visual_grid = None
        if isinstance(pixel_values, Tensor) and pixel_values.ndim == 4:
            visual_grid = (pixel_values.shape[-2] // stack.patch_size[0], pixel_values.shape[-1] // stack.patch_size[1])
        depth, elevation_input = None, None
        if self._adapters_enabled:
            sources = {self.peft_config[n].depth_source for n in self.active_adapters if self._uses_depth(n)}
            if "model" in sources:
                config = next(self.peft_config[n] for n in self.active_adapters if self._uses_depth(n, "model"))
                depth = self._depth_input(config, pixel_values, depth_pixel_values, depth_hidden_states)
            if "elevation" in sources:
                elevation_input = check_elevation(elevation, pixel_values)
        token_mask = None
        if visual_grid is not None and (nodata_mask is not None or self._nodata_value() is not None):
            token_mask = patch_validity(pixel_values, nodata_mask, self._nodata_value(), stack.patch_size)
        self._context.start_forward(depth, visual_grid, elevation=elevation_input, token_mask=token_mask)
        return args, kwargs

    def _after_forward(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._context.completed = True  # only reached when the forward did not raise

    def _uses_depth(self, adapter_name: str, source: Optional[str] = None) -> bool:
        config = self.peft_config.get(adapter_name)
        return config is not None and config.use_depth and (source is None or config.depth_source == source)

    def _nodata_value(self):
        for name in self.active_adapters:
            config = self.peft_config.get(name)
            if config is not None and config.nodata_value is not None:
                return config.nodata_value
        return None

    def _depth_input(
        self,
        config: SpectralMoEConfig,
        pixel_values: Optional[Tensor],
        depth_pixel_values: Optional[Tensor],
        depth_hidden_states: Optional[Sequence[Tensor]],
    ) -> DepthInput:
        if depth_hidden_states is not None:
            return self._explicit_depth(config, depth_hidden_states)
        if self._depth_model is None and config.depth_model_name_or_path:
            self.set_depth_model(config.depth_model_name_or_path)
        depth_model = self._depth_model
        if depth_model is None:
            raise ValueError(
                "This SpectralMoE adapter uses depth (use_depth=True) but no depth source was given: attach a depth "
                "model with model.set_depth_model(...), pass depth_hidden_states= or depth_pixel_values=, or create "
                "the adapter with use_depth=False."
            )
        if depth_pixel_values is not None:
            if depth_pixel_values.ndim != 4 or depth_pixel_values.shape[1] != 3:
                raise ValueError(
                    f"depth_pixel_values must be RGB images (batch, 3, height, width) in [0, 1]; got shape "
                    f"{tuple(depth_pixel_values.shape)}."
                )
            rgb = normalize_for_depth(depth_pixel_values, 1.0, 0.0, config.depth_image_mean, config.depth_image_std)
        elif pixel_values is not None:
            rgb = select_rgb(pixel_values, config.resolved_rgb_band_indices())
            rgb = normalize_for_depth(
                rgb, config.depth_input_rescale, config.depth_input_offset, config.depth_image_mean,
                config.depth_image_std,
            )
        else:
            raise ValueError("SpectralMoE needs pixel_values (or depth_pixel_values) to run the depth model on.")
        encoder = _depth_encoder(depth_model)
        patch = patch_size_of(encoder.config)  # _depth_encoder only returns models that have one
        rgb = resize_to_patch_multiple(rgb, patch)
        reference = next(depth_model.parameters(), rgb)
        with torch.no_grad():
            outputs = encoder(pixel_values=rgb.to(reference.device, reference.dtype), output_hidden_states=True)
        hidden_states = getattr(outputs, "hidden_states", None)
        if hidden_states is None:
            raise ValueError(f"The depth model {type(depth_model).__name__} returned no hidden_states.")
        grid = (rgb.shape[-2] // patch[0], rgb.shape[-1] // patch[1])
        num_prefix = hidden_states[-1].shape[1] - grid[0] * grid[1]
        if num_prefix < 0:
            raise ValueError(
                f"The depth model returned {hidden_states[-1].shape[1]} tokens for a {grid[0]}x{grid[1]} patch grid."
            )
        return DepthInput(hidden_states=list(hidden_states), num_prefix_tokens=num_prefix, grid=grid)

    def _explicit_depth(self, config: SpectralMoEConfig, depth_hidden_states: Sequence[Tensor]) -> DepthInput:
        if isinstance(depth_hidden_states, Tensor) or not isinstance(depth_hidden_states, (list, tuple)):
            raise ValueError(
                "depth_hidden_states must be a tuple/list of per-layer tensors, as a HF model's hidden_states "
                "(embedding output first), each (B, tokens, C) or (B, C, h, w)."
            )
        if len(depth_hidden_states) < 2:
            raise ValueError(f"depth_hidden_states needs at least 2 entries; got {len(depth_hidden_states)}.")
        num_prefix = config.depth_num_prefix_tokens
        if num_prefix is None and self._depth_model is not None:
            num_prefix = prefix_tokens_of(getattr(self._depth_model, "config", None))
        if num_prefix is None and any(h.ndim == 3 for h in depth_hidden_states):
            raise ValueError(
                "depth_hidden_states given as (B, tokens, C) need SpectralMoEConfig.depth_num_prefix_tokens (how many "
                "CLS/register tokens precede the patches); or pass (B, C, h, w) grids."
            )
        return DepthInput(hidden_states=list(depth_hidden_states), num_prefix_tokens=num_prefix or 0, grid=None)

    # --- what users read after a forward -----------------------------------------------------------------------------

    def _check_last_forward_completed(self, caller: str) -> None:
        if not self._context.completed:
            raise RuntimeError(
                f"{caller} reads the last forward's routing, but that forward raised before it finished (its "
                "statistics are incomplete): run a successful forward first."
            )

    def get_aux_loss(self) -> Tensor:
        """Weighted sum over blocks and streams of the auxiliary (balance) losses of the last forward."""
        context: ForwardContext = self._context
        if context.num_forwards == 0:
            raise RuntimeError("get_aux_loss() reads the last forward's routing: run a forward pass first.")
        self._check_last_forward_completed("get_aux_loss()")
        losses = list(context.aux_losses.values())
        if not losses:
            reference = next(self.parameters())
            return reference.new_zeros(())
        return torch.stack([loss.float() for loss in losses]).sum()

    def get_routing_stats(self, adapter_name: Optional[str] = None) -> dict[int, dict[str, RoutingStats]]:
        """Routing of the last forward: {block_index: {"visual" | "depth": RoutingStats}} for one adapter."""
        context: ForwardContext = self._context
        if context.num_forwards == 0:
            raise RuntimeError("get_routing_stats() reads the last forward's routing: run a forward pass first.")
        self._check_last_forward_completed("get_routing_stats()")
        name = adapter_name or self.active_adapters[0]
        if name not in self.peft_config:
            raise ValueError(f"No adapter named {name!r}; adapters: {sorted(self.peft_config)}.")
        return context.routing.get(name, {})
