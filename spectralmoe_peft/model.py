"""SpectralMoEModel: the tuner. Finds the ViT blocks, owns the cross-block modules, runs the depth stream.

Shared modules live here, one entry per adapter, named ``spectralmoe_<name>.<adapter>[.weight]`` like every adapter
tensor, so peft saves, loads (under any adapter name) and deletes them with the per-block ones, in every peft
version this package supports. The depth model is held outside the module tree: it moves with ``.to()`` and stays
in eval mode, but is never part of ``state_dict()`` and so never written into the adapter.
"""

from __future__ import annotations

import inspect
import re
from typing import Any, Optional, Union

import torch
from peft.tuners.tuners_utils import BaseTuner, _ExcludedModule
from torch import Tensor, nn

from .architectures import BlockStack, find_block_stack, patch_size_of
from .bands import prepare_input_bands
from .config import SpectralMoEConfig
from .depth import (
    area_validity,
    check_elevation,
    depth_hidden_size,
    elevation_voids,
    load_depth_model,
    patch_validity,
)
from .depth_stream import DepthStream
from .forward_state import ForwardState, LastForward, Owner, RoutingStats, close_state, open_state, running_state
from .layer import SharedModules, SpectralMoELayer, check_adapter_name
from .registration import PREFIX

_FORWARD_KWARGS = ("depth_hidden_states", "depth_pixel_values", "elevation", "nodata_mask")


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
        for module in model.modules():
            if isinstance(module, SpectralMoELayer):
                raise ValueError(
                    "This base model already carries SpectralMoE adapters of another PeftModel (get_peft_model called "
                    "twice on the same model, e.g. by re-running a notebook cell, or PeftModel.from_pretrained onto a "
                    "model that get_peft_model already wrapped): build a fresh base model, or add another adapter to "
                    "the existing one with peft_model.add_adapter(name, config) / load_adapter(path, name)."
                )
        self.spectralmoe_token_to_feature = nn.ModuleDict()
        self.spectralmoe_delta = nn.ModuleDict()
        self.spectralmoe_scale = nn.ParameterDict()
        self.spectralmoe_depth_projection = nn.ModuleDict()
        self.spectralmoe_elevation_encoder = nn.ModuleDict()
        shared = SharedModules(
            token_to_feature=self.spectralmoe_token_to_feature,
            delta=self.spectralmoe_delta,
            scale=self.spectralmoe_scale,
            depth_projection=self.spectralmoe_depth_projection,
            elevation_encoder=self.spectralmoe_elevation_encoder,
            owner=Owner(),
        )
        # plain attributes: not submodules, not saved, not moved twice
        object.__setattr__(self, "_shared", shared)
        object.__setattr__(self, "_depth_stream", DepthStream())
        object.__setattr__(self, "_last_forward", None)
        object.__setattr__(self, "_adapters_enabled", True)
        object.__setattr__(self, "_block_stack", None)
        object.__setattr__(self, "_hook_handles", [])
        self._register_load_state_dict_pre_hook(self._convert_saved_layouts)  # first: the check sees new shapes
        self._register_load_state_dict_pre_hook(self._check_adapter_state_dict)

    def _hook_forward_entries(self, model: nn.Module, stack: BlockStack) -> None:
        """Open a forward's state at the model and at every module between it and the blocks that takes pixel_values
        (e.g. ``upernet.backbone``): a direct call of such a module computes its own depth stream."""
        if self._hook_handles:
            return
        parts = stack.path.split(".") if stack.path else []
        entries = [model]
        for depth in range(1, len(parts)):
            module = model.get_submodule(".".join(parts[:depth]))
            if "pixel_values" in inspect.signature(module.forward).parameters:
                entries.append(module)
        for module in entries:
            self._hook_handles.append(module.register_forward_pre_hook(self._begin_forward, with_kwargs=True))
            self._hook_handles.append(module.register_forward_hook(self._end_forward, always_call=True))

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
        # shape (1,), not a 0-d scalar: FSDP (1 and 2) refuse scalar parameters; 0.1.0 adapters are converted on load
        self.spectralmoe_scale[adapter_name] = nn.Parameter(torch.full((1,), float(config.scale_init), **factory))
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
        prepare_input_bands(model, config)  # records the bands, or widens the RGB base a multi-band adapter needs
        stack = find_block_stack(model, config.num_prefix_tokens)
        object.__setattr__(self, "_block_stack", stack)
        self._hook_forward_entries(model, stack)
        self._add_shared_modules(adapter_name, config, stack)
        try:
            super().inject_adapter(model, adapter_name, **kwargs)
        except Exception:
            self._remove_shared_modules(adapter_name)  # leave no half-made adapter behind
            raise
        adapted = [m for m in model.modules() if isinstance(m, SpectralMoELayer) and adapter_name in m.spectralmoe_A]
        for layer in adapted:  # the 'mean' reduction of the balance loss divides by this
            layer.spectralmoe_num_adapted_blocks[adapter_name] = len(adapted)
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
        for handle in getattr(self, "_hook_handles", []):
            handle.remove()
        self._hook_handles.clear()
        return model

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

    def _convert_saved_layouts(self, state_dict: dict, prefix: str, *args: Any) -> None:
        """Read adapters saved by 0.1.0: the update scale s was a 0-d tensor (it is (1,) since: FSDP needs >= 1-d), and
        routers without noise (noisy_gating=False) still stored unused noise weights (dropped: they stopped DDP)."""
        scale_key = f"{prefix}spectralmoe_scale."
        for key in [k for k in state_dict if k.startswith(scale_key)]:
            if state_dict[key].ndim == 0:
                state_dict[key] = state_dict[key].reshape(1)
        loading = [self.peft_config.get(key[len(scale_key) :]) for key in state_dict if key.startswith(scale_key)]
        for key in [k for k in state_dict if k.startswith(prefix) and "_noise" in k]:
            parts = key.split(".")
            position = next((i for i, p in enumerate(parts) if p.startswith(PREFIX) and p.endswith("_noise")), None)
            if position is None:
                continue
            if position + 1 < len(parts):  # named after its adapter
                configs = [self.peft_config.get(parts[position + 1])]
            else:  # peft could not place it (this model has no such tensor), so left the adapter name out
                configs = loading
            if configs and all(c is not None and not c.noisy_gating for c in configs):
                del state_dict[key]

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
        """Attach a frozen depth model (any HF model that returns ``hidden_states``); None detaches it (and keeps a
        ``depth_model_name_or_path`` in the config from being loaded again).

        A string is a Hub id or local path, loaded with ``from_pretrained`` (its image processor's mean/std, when it
        has one, become the adapters' depth normalization) and remembered in the adapters' configs. A depth model of
        another width than the ViT gets a trainable projection for each depth adapter that has none yet, recorded in
        its config (``depth_hidden_size``) so a reload rebuilds it: attach the depth model before building the
        optimizer. The model is frozen, kept in eval mode, moved to the adapter's device, moves with ``.to()``, and is
        never saved.
        """
        stream: DepthStream = self._depth_stream
        if depth_model is None:
            stream.model, stream.detached = None, True
            return
        normalization, name_or_path = None, None
        if isinstance(depth_model, str):
            name_or_path = depth_model
            depth_model, normalization = load_depth_model(name_or_path)
        if not isinstance(depth_model, nn.Module):
            raise ValueError(f"set_depth_model expects a torch nn.Module, got {type(depth_model).__name__}.")
        own_modules = {id(module) for module in self.model.modules()}
        if any(id(module) in own_modules for module in depth_model.modules()):
            raise ValueError(
                "set_depth_model got (part of) the adapted model itself: the depth stream needs a separate, frozen "
                "depth model (Depth Anything, DPT, a Dinov2Model, ...). Nothing was changed."
            )
        if patch_size_of(getattr(depth_model, "config", None)) is None:
            raise ValueError(
                f"The depth model {type(depth_model).__name__} has no config with a patch_size: expected a HF ViT-based "
                "model that returns hidden_states (Depth Anything, DPT, Dinov2Model, ...)."
            )
        width = depth_hidden_size(depth_model)
        stack: BlockStack = self._block_stack
        depth_adapters = {n: c for n, c in self.peft_config.items() if c.use_depth and c.depth_source == "model"}
        for name, config in depth_adapters.items():
            declared = config.depth_hidden_size
            if width is not None and declared is not None and declared != width and declared != stack.hidden_size:
                raise ValueError(
                    f"The depth model is {width} wide but adapter '{name}' was made for a depth model {declared} wide "
                    f"(depth_hidden_size={declared}; its projection's weights expect that width): attach a depth model "
                    f"of width {declared}, or create a new adapter for this one."
                )
        for name, config in depth_adapters.items():  # checked everything first: nothing changes on an error
            if width is not None and width != stack.hidden_size and name not in self.spectralmoe_depth_projection:
                self._add_depth_projection(name, width)
            if name_or_path is not None:
                config.depth_model_name_or_path = name_or_path
                if normalization is not None:
                    config.depth_image_mean, config.depth_image_std = normalization
        depth_model.requires_grad_(False)
        depth_model.eval()
        reference = next(self.model.parameters())
        depth_model.to(reference.device)
        stream.model, stream.detached = depth_model, False

    def _add_depth_projection(self, adapter_name: str, width: int) -> None:
        config = self.peft_config[adapter_name]
        reference = next(self.model.parameters())
        dtype = reference.dtype if reference.is_floating_point() else None
        projection = nn.Linear(width, self._block_stack.hidden_size, device=reference.device, dtype=dtype)
        if dtype in (torch.float16, torch.bfloat16):
            projection.float()  # adapters train in fp32 (peft's autocast_adapter_dtype)
        trainable = adapter_name in self.active_adapters and not config.inference_mode
        projection.requires_grad_(trainable)
        self.spectralmoe_depth_projection[adapter_name] = projection
        config.depth_hidden_size = width

    @property
    def depth_model(self) -> Optional[nn.Module]:
        return self._depth_stream.model

    def compute_depth_hidden_states(self, pixel_values: Tensor, adapter_name: Optional[str] = None) -> tuple:
        """Exactly the depth features an adapter computes on the fly (its bands, rescale, normalization, resize, the
        depth model's encoder), as (B, C, h, w) grids per depth layer: cache them per tile and pass them back as
        ``model(pixel_values=x, depth_hidden_states=cached)`` to skip the depth model. Needs an attached depth model.
        """
        name = adapter_name or self.active_adapters[0]
        if name not in self.peft_config:
            raise ValueError(f"No adapter named {name!r}; adapters: {sorted(self.peft_config)}.")
        self._load_named_depth_model({name: self.peft_config[name]})
        return self._depth_stream.hidden_state_grids(self.peft_config[name], pixel_values)

    def _load_named_depth_model(self, configs: dict) -> None:
        """Load the depth model an adapter config names, once, when none is attached and none was detached."""
        stream: DepthStream = self._depth_stream
        if stream.model is not None or stream.detached:
            return
        named = next((c.depth_model_name_or_path for c in configs.values() if c.depth_model_name_or_path), None)
        if named is None:
            return
        with stream.load_lock:
            if stream.model is None:
                self.set_depth_model(named)

    def _apply(self, fn, *args: Any, **kwargs: Any):
        super()._apply(fn, *args, **kwargs)
        stream = self.__dict__.get("_depth_stream")
        if stream is not None and stream.model is not None:
            stream.model._apply(fn, *args, **kwargs)
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        stream = self.__dict__.get("_depth_stream")
        if stream is not None and stream.model is not None:
            stream.model.eval()  # frozen: dropout and norm statistics never train
        return self

    # --- a forward's state: opened when the model (or an inner module taking pixel_values) is called ----------------

    def _begin_forward(self, module: nn.Module, args: tuple, kwargs: dict):
        inputs = {name: kwargs.pop(name, None) for name in _FORWARD_KWARGS}
        if torch.compiler.is_compiling():
            if self._shared.traced_state is None:
                self._shared.traced_state = self._new_state(module, args, kwargs, **inputs)
            return args, kwargs
        if running_state(self._shared.owner) is not None:
            return args, kwargs  # an inner module of a running forward: that forward's state applies
        open_state(self._new_state(module, args, kwargs, **inputs))  # last: a validation error leaves nothing open
        return args, kwargs

    def _end_forward(self, module: nn.Module, args: tuple, output: Any) -> None:
        if torch.compiler.is_compiling():
            state = self._shared.traced_state
            if state is not None and state.opened_by is module:
                self._shared.traced_state = None
                object.__setattr__(self, "_last_forward", state.finish(completed=True))
            return None
        state = close_state(self._shared.owner, module)
        if state is not None:  # output is None only when the forward raised (an always_call hook)
            object.__setattr__(self, "_last_forward", state.finish(completed=output is not None))
        return None

    def _new_state(
        self,
        module: nn.Module,
        args: tuple,
        kwargs: dict,
        depth_hidden_states=None,
        depth_pixel_values=None,
        elevation=None,
        nodata_mask=None,
    ) -> ForwardState:
        """Everything the blocks of this forward share, computed from this forward's inputs only."""
        pixel_values = kwargs.get("pixel_values")
        if pixel_values is None and args and isinstance(args[0], Tensor):
            pixel_values = args[0]
        stack: BlockStack = self._block_stack
        visual_grid = None
        if isinstance(pixel_values, Tensor) and pixel_values.ndim == 4:
            visual_grid = (pixel_values.shape[-2] // stack.patch_size[0], pixel_values.shape[-1] // stack.patch_size[1])
        active = {n: self.peft_config[n] for n in self.active_adapters if n in self.peft_config}
        depth_configs = {n: c for n, c in active.items() if c.use_depth and c.depth_source == "model"}
        uses_elevation = any(c.use_depth and c.depth_source == "elevation" for c in active.values())
        nodata_value = next((c.nodata_value for c in active.values() if c.nodata_value is not None), None)
        state = ForwardState(
            owner=self._shared.owner,
            opened_by=module,
            visual_grid=visual_grid,
            keep_routing_stats=all(c.keep_routing_stats for c in active.values()),
        )
        if not self._adapters_enabled:
            return state
        if depth_configs:
            self._load_named_depth_model(depth_configs)
            state.depth = self._depth_stream.features_for(
                depth_configs, pixel_values, depth_pixel_values, depth_hidden_states
            )
        voids = None
        if uses_elevation:
            state.elevation = check_elevation(elevation, pixel_values)
            voids = elevation_voids(state.elevation, nodata_value)
        if visual_grid is not None and (nodata_mask is not None or nodata_value is not None or voids is not None):
            state.token_mask = patch_validity(pixel_values, nodata_mask, nodata_value, stack.patch_size)
            if voids is not None:
                state.token_mask = state.token_mask & area_validity(~voids, visual_grid)
        return state

    # --- what users read after a forward -----------------------------------------------------------------------------

    def _last_completed_forward(self, caller: str) -> LastForward:
        last: Optional[LastForward] = self._last_forward
        if last is None:
            raise RuntimeError(f"{caller} reads the last forward's routing: run a forward pass first.")
        if not last.completed:
            raise RuntimeError(
                f"{caller} reads the last forward's routing, but that forward raised before it finished (its "
                "statistics are incomplete): run a successful forward first."
            )
        return last

    def get_aux_loss(self) -> Tensor:
        """Weighted sum over blocks and streams of the auxiliary (balance) losses of the last finished forward.

        With ``aux_loss_in_graph=True`` (the default) that loss already reaches the routers through any backward of
        the task loss, so the value returned here is detached (for logging: adding it to the loss changes nothing).
        Adapters created with ``aux_loss_in_graph=False`` get it with its graph, to add to the loss yourself.
        """
        last = self._last_completed_forward("get_aux_loss()")
        if last.aux_loss is None:
            reference = next(self.parameters())
            return reference.new_zeros((), dtype=torch.float32)
        return last.aux_loss

    def get_routing_stats(self, adapter_name: Optional[str] = None) -> dict[int, dict[str, RoutingStats]]:
        """Routing of the last finished forward: {block_index: {"visual" | "depth": RoutingStats}} for one adapter
        (empty when the adapter was inactive, or its config has ``keep_routing_stats=False``)."""
        last = self._last_completed_forward("get_routing_stats()")
        if not self.peft_config:
            raise ValueError("This model has no SpectralMoE adapter left (all were deleted): add one first.")
        name = adapter_name or self.active_adapters[0]
        if name not in self.peft_config:
            raise ValueError(f"No adapter named {name!r}; adapters: {sorted(self.peft_config)}.")
        return last.routing.get(name, {})
