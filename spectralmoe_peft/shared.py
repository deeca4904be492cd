"""SpectralMoEShared: the modules the paper shares across blocks, and a model's per-forward machinery, held INSIDE
the adapted model (at ``model.spectralmoe``), not on peft's tuner.

Why inside the model: peft's ``inject_adapter_in_model`` (what transformers' ``add_adapter`` / ``load_adapter``
call) builds a tuner, keeps only the mutated model and drops the tuner. Everything a working model needs must
therefore live in the model: W_t2f, W_delta, s, the depth projection and elevation encoder (one per adapter, one
copy for all blocks), the attached depth model, the entry hooks that open each forward's state, and the last
forward's routing statistics. The holder is a peft ``BaseTunerLayer`` wrapping nothing, so peft's and transformers'
generic adapter code (set / delete / enable / disable adapters, requires_grad, dtype casts, the state-dict selection
of peft >= 0.21) treats its per-adapter containers like any layer's. Blocks reach the containers through
``SharedModules`` (plain references, not registered: the state dict holds one copy).

Its attribute name is ``spectralmoe``, not ``spectralmoe_...``: peft skips modules whose name contains the method
prefix when it deletes adapters or unloads, and this one must be visited.
"""

from __future__ import annotations

import inspect
from typing import Any, Optional, Union

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import Tensor, nn

from .architectures import BlockStack, patch_size_of
from .config import SpectralMoEConfig
from .depth import (
    area_validity,
    check_elevation,
    depth_hidden_size,
    elevation_voids,
    load_depth_model,
    patch_validity,
)
from .depth_stream import DepthStream, depth_encoder, encoder_options, install_output_hooks
from .forward_state import (
    ForwardState,
    LastForward,
    Owner,
    RoutingStats,
    close_state,
    open_state,
    running_state,
    tag_inputs,
    tagged_state,
)
from .layer import MERGE_REFUSAL, SharedModules
from .registration import PREFIX

HOLDER_NAME = "spectralmoe"
FORWARD_KWARGS = ("depth_hidden_states", "depth_pixel_values", "elevation", "nodata_mask")
# per-adapter containers of the holder, in the order of the state dict
SHARED_NAMES = (
    "spectralmoe_token_to_feature",
    "spectralmoe_delta",
    "spectralmoe_scale",
    "spectralmoe_depth_projection",
    "spectralmoe_elevation_encoder",
)


def find_holder(model: nn.Module) -> Optional["SpectralMoEShared"]:
    """The holder of an adapted model (its root's ``spectralmoe`` child), or None."""
    holder = model._modules.get(HOLDER_NAME) if isinstance(model, nn.Module) else None
    return holder if isinstance(holder, SpectralMoEShared) else None


class SpectralMoEShared(nn.Module, BaseTunerLayer):
    """W_t2f, W_delta, s (and the depth projection / elevation encoder) of every adapter, one copy for all blocks."""

    adapter_layer_names = SHARED_NAMES
    other_param_names = ()

    def __init__(self, root: nn.Module, stack: BlockStack) -> None:
        super().__init__()
        self.spectralmoe_token_to_feature = nn.ModuleDict()  # adapter -> Linear(D, D): W_t2f
        self.spectralmoe_delta = nn.ModuleDict()  # adapter -> Linear(D, D): W_delta
        self.spectralmoe_scale = nn.ParameterDict()  # adapter -> (1,): s
        self.spectralmoe_depth_projection = nn.ModuleDict()  # adapter -> Linear(D_depth, D), when widths differ
        self.spectralmoe_elevation_encoder = nn.ModuleDict()  # adapter -> Conv2d(1, D, patch)
        self.spectralmoe_configs: dict[str, SpectralMoEConfig] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self._active_adapter = []
        # plain attributes (object.__setattr__): not submodules, never saved, not moved twice
        object.__setattr__(self, "_root", root)  # the adapted model (the depth model must not be part of it)
        object.__setattr__(self, "stack", stack)
        object.__setattr__(
            self,
            "shared",
            SharedModules(
                token_to_feature=self.spectralmoe_token_to_feature,
                delta=self.spectralmoe_delta,
                scale=self.spectralmoe_scale,
                depth_projection=self.spectralmoe_depth_projection,
                elevation_encoder=self.spectralmoe_elevation_encoder,
                owner=Owner(),
            ),
        )
        object.__setattr__(self, "_depth_stream", DepthStream())
        object.__setattr__(self, "_last_forward", None)
        object.__setattr__(self, "_hook_handles", [])

    # --- attaching to / detaching from a model --------------------------------------------------------------------

    def attach(self) -> None:
        """Become ``root.spectralmoe``; hook the forward entries and the loading of saved layouts into the model."""
        root, stack = self._root, self.stack
        root.add_module(HOLDER_NAME, self)
        handles = self._hook_handles
        # first: the check sees converted keys and shapes
        handles.append(root._register_load_state_dict_pre_hook(self._convert_saved_layouts))
        handles.append(root._register_load_state_dict_pre_hook(self._check_adapter_state_dict))
        # the forward's state opens at the model and at every module between it and the blocks that takes
        # pixel_values (e.g. ``upernet.backbone``): a direct call of such a module computes its own depth stream
        parts = stack.path.split(".") if stack.path else []
        entries = [root]
        for depth in range(1, len(parts)):
            module = root.get_submodule(".".join(parts[:depth]))
            if "pixel_values" in inspect.signature(module.forward).parameters:
                entries.append(module)
        for module in entries:
            handles.append(module.register_forward_pre_hook(self._begin_forward, with_kwargs=True))
            handles.append(module.register_forward_hook(self._end_forward, always_call=True))

    def detach(self) -> None:
        """Undo ``attach``: the model is the untouched original again (used by unload)."""
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles.clear()
        if self._root._modules.get(HOLDER_NAME) is self:
            del self._root._modules[HOLDER_NAME]

    # --- adapters ----------------------------------------------------------------------------------------------------

    def add(self, adapter_name: str, config: SpectralMoEConfig) -> None:
        """Create the shared modules of ``adapter_name`` (on the device and in the dtype of the model)."""
        reference = next(self._root.parameters())
        factory = {"device": reference.device, "dtype": reference.dtype if reference.is_floating_point() else None}
        dim = self.stack.hidden_size
        token_to_feature = nn.Linear(dim, dim, **factory)
        delta = nn.Linear(dim, dim, **factory)
        if config.init_weights is True:  # exact identity: the update W_delta(.) is zero until trained
            nn.init.zeros_(delta.weight)
            nn.init.zeros_(delta.bias)
        self.spectralmoe_token_to_feature[adapter_name] = token_to_feature
        self.spectralmoe_delta[adapter_name] = delta
        # shape (1,), not a 0-d scalar: FSDP (1 and 2) refuse scalar parameters; 0.1.0 adapters are converted on load
        self.spectralmoe_scale[adapter_name] = nn.Parameter(torch.full((1,), float(config.scale_init), **factory))
        if config.use_depth and config.depth_source == "elevation":  # a patch embedding of the elevation raster
            patch = self.stack.patch_size
            self.spectralmoe_elevation_encoder[adapter_name] = nn.Conv2d(1, dim, patch, stride=patch, **factory)
        elif config.use_depth and config.depth_hidden_size is not None and config.depth_hidden_size != dim:
            self.spectralmoe_depth_projection[adapter_name] = nn.Linear(config.depth_hidden_size, dim, **factory)
        self.spectralmoe_configs[adapter_name] = config
        # like a block's update_layer: the first adapter becomes active, later ones wait for set_adapter
        self.set_adapter(self.active_adapters or [adapter_name])
        if config.inference_mode:  # loaded with is_trainable=False: frozen like its per-block tensors
            for container in self._containers():
                if adapter_name in container:
                    container[adapter_name].requires_grad_(False)

    def delete_adapter(self, adapter_name: str) -> None:
        self.spectralmoe_configs.pop(adapter_name, None)
        super().delete_adapter(adapter_name)

    def _containers(self) -> list:
        return [getattr(self, name) for name in SHARED_NAMES]

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        raise ValueError(MERGE_REFUSAL)

    def unmerge(self) -> None:
        return None

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: Optional[torch.device] = None) -> None:
        return None  # created on the model's device; peft's version reads a base layer this holder does not have

    def forward(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("model.spectralmoe holds the shared SpectralMoE modules; it is not called itself.")

    # --- loading saved layouts (runs on every load_state_dict of the model: peft's loading, in every version) --------

    def _adapters_in(self, state_dict: dict, prefix: str) -> set:
        """Adapter names that the block tensors of an incoming state dict carry (peft inserted them)."""
        names = set()
        for key in state_dict:
            if not key.startswith(prefix):
                continue
            parts = key[len(prefix) :].split(".")
            for at, part in enumerate(parts[:-1]):
                if part.startswith(PREFIX) and part not in SHARED_NAMES:
                    names.add(parts[at + 1])
                    break
        return names

    def _convert_saved_layouts(self, state_dict: dict, prefix: str, *args: Any) -> None:
        """Read adapters saved by 0.1.0, in every peft version:

        - the shared tensors lived on the tuner (``base_model.spectralmoe_delta.weight``); they live in the model now
          (``base_model.model.spectralmoe.spectralmoe_delta.weight``). The tuner's own hook moves PeftModel keys here;
          keys of ``set_peft_model_state_dict`` on a bare model arrive as ``base_model.spectralmoe_...``. peft >= 0.21
          leaves such keys without the adapter name (it places keys by the model's own names): it is then the one
          the block tensors of the same state dict carry;
        - the update scale s was a 0-d tensor (it is (1,) since: FSDP needs >= 1-d);
        - routers without noise (noisy_gating=False) still stored unused noise weights (dropped: they stopped DDP).
        """
        holder = f"{prefix}{HOLDER_NAME}."
        for old in (f"{prefix}base_model.", f"{prefix}"):  # a bare model's set_peft_model_state_dict; the tuner hook
            for key in [k for k in state_dict if k.startswith(old) and k[len(old) :].split(".")[0] in SHARED_NAMES]:
                state_dict[holder + key[len(old) :]] = state_dict.pop(key)
        unnamed = []  # no adapter name: [scale] or [module, weight|bias] (named: [scale, adapter], [module, adapter, p])
        for key in state_dict:
            parts = key[len(holder) :].split(".") if key.startswith(holder) else []
            if parts and parts[0] in SHARED_NAMES and len(parts) == (1 if parts[0] == "spectralmoe_scale" else 2):
                unnamed.append(key)
        if unnamed:
            names = self._adapters_in(state_dict, prefix)
            if len(names) != 1:
                raise ValueError(
                    f"Cannot tell which adapter the shared SpectralMoE tensors {unnamed[:3]} belong to (the block "
                    f"tensors name {sorted(names) or 'none'}): load one adapter at a time."
                )
            (name,) = names
            for key in unnamed:
                head, _, tail = key[len(holder) :].partition(".")
                state_dict[f"{holder}{head}.{name}" + (f".{tail}" if tail else "")] = state_dict.pop(key)
        scale_key = f"{holder}spectralmoe_scale."
        for key in [k for k in state_dict if k.startswith(scale_key)]:
            if state_dict[key].ndim == 0:
                state_dict[key] = state_dict[key].reshape(1)
        loading = [self.spectralmoe_configs.get(key[len(scale_key) :]) for key in state_dict if key.startswith(scale_key)]
        for key in [k for k in state_dict if k.startswith(prefix) and "_noise" in k]:
            parts = key.split(".")
            position = next((i for i, p in enumerate(parts) if p.startswith(PREFIX) and p.endswith("_noise")), None)
            if position is None:
                continue
            if position + 1 < len(parts):  # named after its adapter
                configs = [self.spectralmoe_configs.get(parts[position + 1])]
            else:  # peft could not place it (this model has no such tensor), so left the adapter name out
                configs = loading
            if configs and all(c is not None and not c.noisy_gating for c in configs):
                del state_dict[key]

    def _check_adapter_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        """Refuse incomplete or mismatched adapter weights (the released code only warned).

        Checks the adapters whose weights the incoming state dict carries (those with an update scale s): each of
        their tensors must be present, with its shape.
        """
        scale_key = f"{prefix}{HOLDER_NAME}.spectralmoe_scale."
        loading = {key[len(scale_key) :] for key in state_dict if key.startswith(scale_key)}
        if not loading:
            return
        own = {f"{prefix}{key}": value for key, value in self._root.state_dict().items() if PREFIX in key}

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
        own_modules = {id(module) for module in self._root.modules()}
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
        stack = self.stack
        depth_adapters = {
            n: c for n, c in self.spectralmoe_configs.items() if c.use_depth and c.depth_source == "model"
        }
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
        encoder_options(depth_encoder(depth_model))  # read its forward's signature now, outside any compiled region
        install_output_hooks(depth_encoder(depth_model))  # and install transformers' hidden-state hooks (a lock)
        reference = next(self._root.parameters())
        depth_model.to(reference.device)
        stream.model, stream.detached = depth_model, False

    def _add_depth_projection(self, adapter_name: str, width: int) -> None:
        config = self.spectralmoe_configs[adapter_name]
        reference = next(self._root.parameters())
        dtype = reference.dtype if reference.is_floating_point() else None
        projection = nn.Linear(width, self.stack.hidden_size, device=reference.device, dtype=dtype)
        if dtype in (torch.float16, torch.bfloat16):
            projection.float()  # adapters train in fp32 (peft's autocast_adapter_dtype)
        trainable = adapter_name in self.active_adapters and not config.inference_mode and not self.disable_adapters
        projection.requires_grad_(trainable)
        self.spectralmoe_depth_projection[adapter_name] = projection
        config.depth_hidden_size = width

    @property
    def depth_model(self) -> Optional[nn.Module]:
        return self._depth_stream.model

    def compute_depth_hidden_states(self, pixel_values: Tensor, adapter_name: Optional[str] = None) -> tuple:
        """Exactly the depth features an adapter computes on the fly (its bands, rescale, normalization, input scale or
        size, resize, the depth model's encoder), as (B, C, h, w) grids per depth layer: cache them per tile and pass
        them back as ``model(pixel_values=x, depth_hidden_states=cached)`` to skip the depth model. Needs an attached
        depth model.
        """
        name = adapter_name or self.active_adapters[0]
        if name not in self.spectralmoe_configs:
            raise ValueError(f"No adapter named {name!r}; adapters: {sorted(self.spectralmoe_configs)}.")
        self._load_named_depth_model({name: self.spectralmoe_configs[name]})
        return self._depth_stream.hidden_state_grids(self.spectralmoe_configs[name], pixel_values)

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
        inputs = {name: kwargs.pop(name, None) for name in FORWARD_KWARGS}
        if torch.compiler.is_compiling():
            if self.shared.traced_state is None:
                self.shared.traced_state = self._new_state(module, args, kwargs, **inputs)
            return args, kwargs
        if running_state(self.shared.owner) is not None:
            return args, kwargs  # an inner module of a running forward: that forward's state applies
        replayed = tagged_state(self.shared.owner, args, kwargs) if torch._C._current_graph_task_id() != -1 else None
        if replayed is not None and replayed.finished and replayed.opened_by is module:
            # a checkpoint around the whole model call, recomputed in backward: replay that forward's own state (its
            # depth tokens and the routing biases it used; nothing is recorded again)
            open_state(replayed)
            return args, kwargs
        state = self._new_state(module, args, kwargs, **inputs)
        if torch.is_grad_enabled() or module.training:  # a graph, or a reentrant checkpoint, may recompute it
            tag_inputs(state, args, kwargs)
        open_state(state)  # last: a validation error leaves nothing open
        return args, kwargs

    def _end_forward(self, module: nn.Module, args: tuple, output: Any) -> None:
        if torch.compiler.is_compiling():
            state = self.shared.traced_state
            if state is not None and state.opened_by is module:
                self.shared.traced_state = None
                object.__setattr__(self, "_last_forward", state.finish(completed=True))
            return None
        state = close_state(self.shared.owner, module)
        if state is not None and not state.finished:  # finished: a replayed recomputation, reported already
            # output is None only when the forward raised (an always_call hook)
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
        stack = self.stack
        visual_grid = None
        if isinstance(pixel_values, Tensor) and pixel_values.ndim == 4:
            visual_grid = (pixel_values.shape[-2] // stack.patch_size[0], pixel_values.shape[-1] // stack.patch_size[1])
        active = {n: self.spectralmoe_configs[n] for n in self.active_adapters if n in self.spectralmoe_configs}
        depth_configs = {n: c for n, c in active.items() if c.use_depth and c.depth_source == "model"}
        uses_elevation = any(c.use_depth and c.depth_source == "elevation" for c in active.values())
        nodata_value = next((c.nodata_value for c in active.values() if c.nodata_value is not None), None)
        state = ForwardState(
            owner=self.shared.owner,
            opened_by=module,
            visual_grid=visual_grid,
        )
        if self.disable_adapters:
            return state
        if depth_configs:
            self._load_named_depth_model(depth_configs)
            state.depth = self._depth_stream.features_for(
                depth_configs, pixel_values, depth_pixel_values, depth_hidden_states
            )
        voids = None
        if uses_elevation:
            state.elevation = check_elevation(elevation, pixel_values)
            voids = state.elevation_voids = elevation_voids(state.elevation, nodata_value)
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
            reference = next(self._root.parameters())
            return reference.new_zeros((), dtype=torch.float32)
        return last.aux_loss

    def get_routing_stats(self, adapter_name: Optional[str] = None) -> dict[int, dict[str, RoutingStats]]:
        """Routing of the last finished forward: {block_index: {"visual" | "depth": RoutingStats}} for one adapter
        (empty when the adapter was inactive, or its config has ``keep_routing_stats=False``)."""
        last = self._last_completed_forward("get_routing_stats()")
        if not self.spectralmoe_configs:
            raise ValueError("This model has no SpectralMoE adapter left (all were deleted): add one first.")
        name = adapter_name or (self.active_adapters[0] if self.active_adapters else None)
        if name not in self.spectralmoe_configs:
            raise ValueError(f"No adapter named {name!r}; adapters: {sorted(self.spectralmoe_configs)}.")
        return last.routing.get(name, {})

    def __repr__(self) -> str:
        return "spectralmoe." + super().__repr__()
