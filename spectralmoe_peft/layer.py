"""SpectralMoELayer: wraps one ViT block and refines its patch tokens after it runs.

Per adapter and block it owns the experts' low-rank tokens (A, B) and the gates of both streams; the modules the
paper shares across blocks (W_t2f, W_delta, the scale s, the depth projection) live in the model's holder
(``model.spectralmoe``, shared.py) and are reached through ``SharedModules``, so they are stored once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import Tensor, nn

from .config import SpectralMoEConfig
from .forward_state import ForwardState, Owner, RoutingStats, running_state, tag_inputs, tagged_state
from .experts import (
    chosen_coefficients_of_projections,
    coefficients_of_projections,
    expert_basis,
    expert_projections,
    expert_mixture,
    expert_tokens,
    expert_value_factors,
    expert_values,
    use_chosen_experts,
    use_low_rank,
)
from .fusion import fuse, fused_coefficients
from .routing import RouterOutput, attach_aux_loss, route, update_selection_bias


MERGE_REFUSAL = (
    "SpectralMoE adapters cannot be merged into the base weights: their routing depends on each input token. "
    "Use unload() to get the base model back, or keep the adapter."
)


def check_adapter_name(adapter_name: str) -> None:
    """Adapter names key torch ModuleDicts/ParameterDicts: refuse those they cannot hold, with a clear message."""
    # checked on instances: 'training' and the like are instance attributes, and a dict key must not shadow any
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name or any(
        hasattr(container, adapter_name) for container in (nn.ParameterDict(), nn.ModuleDict())
    ):
        raise ValueError(
            f"Adapter name {adapter_name!r} cannot be used: it must be a non-empty string without '.' that is not "
            "an attribute of torch's ParameterDict/ModuleDict (such as 'copy', 'keys', 'update', 'training'). "
            "Pick another name."
        )


@dataclass
class SharedModules:
    """References to the holder's cross-block modules (plain object: not registered as submodules of each layer, so
    the state dict holds one copy; a deepcopy of the model copies it once, with the holder)."""

    token_to_feature: nn.ModuleDict  # adapter -> Linear(D, D): W_t2f
    delta: nn.ModuleDict  # adapter -> Linear(D, D): W_delta
    scale: nn.ParameterDict  # adapter -> scalar s
    depth_projection: nn.ModuleDict  # adapter -> Linear(D_depth, D), only when widths differ
    elevation_encoder: nn.ModuleDict  # adapter -> Conv2d(1, D, patch): depth_source="elevation"
    owner: Owner  # which forwards' states are this model's
    # only while torch.compile traces a forward (dynamo cannot trace ContextVars; no Python runs per compiled call)
    traced_state: Optional[ForwardState] = None


class Refinement(NamedTuple):
    """What refining one block's patch tokens for one adapter gives: the new tokens and each stream's routing."""

    tokens: Tensor  # B, N, D
    routing: dict  # "visual" | "depth" -> RouterOutput


def recomputed_in_backward(recompute: bool, function, *args):
    """``function(*args)``; with ``recompute``, in a graph, its intermediates (the expert attention,
    B x N x (k or E) x M) are not kept for backward but recomputed there: cheap to redo, the largest thing the adapter
    would otherwise store. Not under torch.compile, whose own memory planning decides what to keep."""
    if recompute and torch.is_grad_enabled() and not torch.compiler.is_compiling():
        return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False)
    return function(*args)


def weighted_aux_loss(config: SpectralMoEConfig, routed: RouterOutput) -> Tensor:
    """The auxiliary loss of one stream in one block, with the config's weights (no balance term when balancing is
    aux-free)."""
    balance_weight = 0.0 if config.balancing == "aux_free" else config.balance_loss_weight
    terms = [
        weight * loss
        for weight, loss in (
            (balance_weight, routed.balance_loss),
            (config.switch_loss_weight, routed.switch_loss),
            (config.router_z_loss_weight, routed.z_loss),
        )
        if weight != 0.0  # a term with weight 0 stays out of the graph: no backward through it, no 0 * inf = NaN
    ]
    if terms:
        return sum(terms[1:], terms[0])
    # nothing weighted: a zero, still connected to the router's graph when the user adds it to the loss themselves
    # (aux_loss_in_graph=False), so get_aux_loss().backward() works as it did
    return routed.balance_loss.new_zeros(()) if config.aux_loss_in_graph else (routed.probs * 0.0).sum()


def routing_stats(routed: RouterOutput, valid: Optional[Tensor], grid: Optional[tuple[int, int]]) -> RoutingStats:
    """Small, detached statistics of one stream's routing (nodata patches left out, as in the expert load)."""
    probs = routed.probs.detach()
    token_entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1)  # B, N
    if valid is None:
        entropy = token_entropy.mean()
    else:
        weight = valid.to(token_entropy.dtype)
        entropy = (token_entropy * weight).sum() / weight.sum().clamp_min(1.0)
    return RoutingStats(
        expert_load=routed.expert_load, topk_indices=routed.topk_indices.detach(), gate_entropy=entropy, grid=grid
    )


class SpectralMoELayer(nn.Module, BaseTunerLayer):
    adapter_layer_names = (
        "spectralmoe_A",
        "spectralmoe_B",
        "spectralmoe_gate_visual",
        "spectralmoe_gate_visual_noise",
        "spectralmoe_gate_depth",
        "spectralmoe_gate_depth_noise",
    )
    # buffers, not trained (peft's set_adapter would switch requires_grad on for adapter_layer_names)
    other_param_names = ("spectralmoe_gate_visual_bias", "spectralmoe_gate_depth_bias")

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: SpectralMoEConfig,
        *,
        block_index: int,
        num_blocks: int,
        hidden_size: int,
        num_prefix_tokens: int,
        shared: SharedModules,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.block_index = block_index
        self.num_blocks = num_blocks
        self.hidden_size = hidden_size
        self.num_prefix_tokens = num_prefix_tokens
        self.spectralmoe_A = nn.ParameterDict({})  # adapter -> (E, M, r)
        self.spectralmoe_B = nn.ParameterDict({})  # adapter -> (E, r, D)
        self.spectralmoe_gate_visual = nn.ParameterDict({})  # adapter -> (E, D)
        self.spectralmoe_gate_visual_noise = nn.ParameterDict({})  # adapter -> (D, E)
        self.spectralmoe_gate_depth = nn.ParameterDict({})  # adapter -> (E, D), absent if gates are shared
        self.spectralmoe_gate_depth_noise = nn.ParameterDict({})
        # aux-free balancing (balancing="aux_free" | "both"): per-expert routing biases, buffers moved outside the
        # optimizer, saved with the adapter
        self.spectralmoe_gate_visual_bias = BufferDict({}, persistent=True)  # adapter -> (E,)
        self.spectralmoe_gate_depth_bias = BufferDict({}, persistent=True)
        self.spectralmoe_num_adapted_blocks: dict[str, int] = {}  # adapter -> blocks it adapts (the 'mean' reduction)
        self.spectralmoe_configs: dict[str, SpectralMoEConfig] = {}
        self._shared = shared
        self._disable_adapters = False
        self.merged_adapters = []
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)
        self._refine_hook = base_layer.register_forward_hook(self._refine_block_output, prepend=True, with_kwargs=True)

    def update_layer(self, adapter_name: str, config: SpectralMoEConfig) -> None:
        """Create (and initialize) the parameters of ``adapter_name`` in this block (its name was checked by the
        tuner's ``inject_adapter``)."""
        num_experts, rank, num_tokens, dim = config.num_experts, config.expert_rank, config.num_tokens, self.hidden_size
        self.spectralmoe_A[adapter_name] = nn.Parameter(torch.empty(num_experts, num_tokens, rank))
        self.spectralmoe_B[adapter_name] = nn.Parameter(torch.empty(num_experts, rank, dim))
        self.spectralmoe_gate_visual[adapter_name] = nn.Parameter(torch.empty(num_experts, dim))
        # noise weights only when the router is noisy: a created-but-unused parameter stops plain DDP at step 2
        if config.noisy_gating:
            self.spectralmoe_gate_visual_noise[adapter_name] = nn.Parameter(torch.empty(dim, num_experts))
        if config.use_depth and not config.share_gates:
            self.spectralmoe_gate_depth[adapter_name] = nn.Parameter(torch.empty(num_experts, dim))
            if config.noisy_gating:
                self.spectralmoe_gate_depth_noise[adapter_name] = nn.Parameter(torch.empty(dim, num_experts))
        if config.balancing != "aux_loss":
            reference = next(self.base_layer.parameters(), None)
            device = reference.device if reference is not None and not reference.is_meta else None
            self.spectralmoe_gate_visual_bias[adapter_name] = torch.zeros(num_experts, device=device)
            if config.use_depth and not config.share_gates:
                self.spectralmoe_gate_depth_bias[adapter_name] = torch.zeros(num_experts, device=device)
        self.spectralmoe_configs[adapter_name] = config
        self.reset_parameters(adapter_name, config.init_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    @torch.no_grad()
    def reset_parameters(self, adapter_name: str, init_weights) -> None:
        if self.spectralmoe_A[adapter_name].is_meta:
            return
        rank = self.spectralmoe_A[adapter_name].shape[-1]
        bound = 1.0 / math.sqrt(rank)  # kaiming-uniform (a=sqrt(5)) of each A_e, as for LoRA's A
        nn.init.uniform_(self.spectralmoe_A[adapter_name], -bound, bound)
        if init_weights is False:
            nn.init.normal_(self.spectralmoe_B[adapter_name], std=1.0)
        else:
            nn.init.zeros_(self.spectralmoe_B[adapter_name])
        for gate, noise in (
            (self.spectralmoe_gate_visual, self.spectralmoe_gate_visual_noise),
            (self.spectralmoe_gate_depth, self.spectralmoe_gate_depth_noise),
        ):
            if adapter_name in gate:
                if init_weights == "paper":  # the released code's zeros: every expert ties until noise or training
                    nn.init.zeros_(gate[adapter_name])  # breaks it (docs/method.md, Initialization)
                else:
                    nn.init.normal_(gate[adapter_name], std=1.0 / math.sqrt(self.hidden_size))
                if adapter_name not in noise:
                    continue
                if init_weights is False:
                    nn.init.normal_(noise[adapter_name], std=1.0 / math.sqrt(self.hidden_size))
                else:
                    nn.init.zeros_(noise[adapter_name])  # noise starts at softplus(0) + 1e-2 for every expert

    # --- the refinement --------------------------------------------------------------------------------------------

    def _gates(self, adapter_name: str, stream: str) -> tuple[Tensor, Optional[Tensor]]:
        """(gate weight, noise weight or None) of one stream."""
        if stream == "depth" and adapter_name in self.spectralmoe_gate_depth:
            gate, noise = self.spectralmoe_gate_depth, self.spectralmoe_gate_depth_noise
        else:
            gate, noise = self.spectralmoe_gate_visual, self.spectralmoe_gate_visual_noise
        return gate[adapter_name], noise[adapter_name] if adapter_name in noise else None

    def _selection_bias(self, adapter_name: str, stream: str) -> Optional[Tensor]:
        """The live aux-free routing bias of a stream (the visual one when gates are shared), or None."""
        if stream == "depth" and adapter_name in self.spectralmoe_gate_depth_bias:
            return self.spectralmoe_gate_depth_bias[adapter_name]
        visual = self.spectralmoe_gate_visual_bias
        return visual[adapter_name] if adapter_name in visual else None

    def _route(
        self, tokens_in: Tensor, stream: str, adapter_name: str, valid: Optional[Tensor], bias: Optional[Tensor]
    ) -> RouterOutput:
        config = self.spectralmoe_configs[adapter_name]
        gate, noise = self._gates(adapter_name, stream)
        return route(
            tokens_in,
            gate,
            noise,
            top_k=config.top_k,
            gating=config.gating,
            noisy=config.noisy_gating and self.training,
            valid=valid,
            selection_bias=bias,
        )

    def refine(
        self,
        feats: Tensor,
        depth: Optional[Tensor],
        adapter_name: str,
        valid: Optional[Tensor] = None,
        selection_bias: Optional[dict] = None,
    ) -> Refinement:
        """F <- F + s * W_delta(Phi + F). feats: (B, N, D) patch tokens; depth: (B, N, D) depth tokens or None;
        valid: (B, N) bool, patches kept in the balance statistics (nodata masked out) or None; selection_bias:
        {stream: (E,)} aux-free routing biases to use (default: the adapter's current ones).

        A pure function of its arguments and the adapter's weights. Computed in the adapter's dtype (fp32 by default,
        even on a bf16 backbone); the update is cast back.
        """
        config = self.spectralmoe_configs[adapter_name]
        shared = self._shared
        a, b = self.spectralmoe_A[adapter_name], self.spectralmoe_B[adapter_name]  # E, M, r / E, r, D
        token_to_feature, delta = shared.token_to_feature[adapter_name], shared.delta[adapter_name]
        scale = shared.scale[adapter_name]
        dtype = b.dtype
        x = feats.to(dtype).contiguous()  # one copy of the patch slice, shared by gate and experts
        if use_low_rank(a.shape[1], a.shape[2], b.shape[2]):
            # adjustments kept as coefficients over the experts' value rows: both streams share the basis
            basis = expert_basis(expert_value_factors(b, token_to_feature), token_to_feature.bias)  # E*r+1, D
            chosen_only = use_chosen_experts(a.shape[0], config.top_k, a.shape[1], a.shape[2])

            def mix(inputs: Tensor, routed: RouterOutput) -> Tensor:
                # x B_e^T computed once, outside the recomputed part: backward keeps it (E*r wide) and redoes only
                # the expert attention
                projected = expert_projections(inputs, b)  # B, N, E, r
                mix_projections = chosen_coefficients_of_projections if chosen_only else coefficients_of_projections
                extra = (routed.topk_indices,) if chosen_only else ()
                return recomputed_in_backward(
                    config.recompute_expert_attention, mix_projections, projected, a, token_to_feature.bias,
                    routed.combine_weights, *extra, inputs.shape[-1], dtype,
                )

            def combine(visual: Tensor, depth_delta: Optional[Tensor]) -> Tensor:
                if depth_delta is not None and config.fusion == "cross_attention" and basis.shape[0] > basis.shape[1]:
                    # E*r + 1 > D (many experts): attending in the D-wide feature space is the cheaper
                    phi = fuse(visual @ basis, depth_delta @ basis, config.fusion)  # B, N, D
                    return scale * delta(phi + x)
                coefficients = fused_coefficients(visual, depth_delta, basis, config.fusion)  # Phi = coeffs @ basis
                # s W_delta(Phi + x) = x (s W)^T + s b + coefficients (s basis W^T): no (B, N, D) Phi or Phi + x is
                # formed, so backward keeps the K-wide coefficients instead of two D-wide tensors
                value_rows = basis @ delta.weight.t()  # K, D
                return F.linear(x, scale * delta.weight, None if delta.bias is None else scale * delta.bias) + (
                    coefficients @ (scale * value_rows)
                )
        else:
            tokens = expert_tokens(a, b)  # E, M, D
            values = expert_values(tokens, token_to_feature)  # E, M, D: shared by both streams

            def mix(inputs: Tensor, routed: RouterOutput) -> Tensor:
                return recomputed_in_backward(
                    config.recompute_expert_attention, expert_mixture, inputs, tokens, values, routed.combine_weights
                )

            def combine(visual: Tensor, depth_delta: Optional[Tensor]) -> Tensor:
                phi = fuse(visual, depth_delta, config.fusion)  # B, N, D
                return scale * delta(phi + x)

        if valid is not None and tuple(valid.shape) != tuple(feats.shape[:2]):
            valid = None
        if selection_bias is None:
            selection_bias = {stream: self._selection_bias(adapter_name, stream) for stream in ("visual", "depth")}
        routing = {"visual": self._route(x, "visual", adapter_name, valid, selection_bias.get("visual"))}
        delta_visual = mix(x, routing["visual"])
        delta_depth = None
        if config.use_depth and depth is not None:
            depth_in = depth.to(dtype).contiguous()
            routing["depth"] = self._route(depth_in, "depth", adapter_name, valid, selection_bias.get("depth"))
            delta_depth = mix(depth_in, routing["depth"])
        update = combine(delta_visual, delta_depth)  # B, N, D: s * W_delta(Phi + F)
        return Refinement(tokens=feats + update.to(feats.dtype), routing=routing)

    def refine_patch_tokens(
        self, feats: Tensor, depth: Optional[Tensor], adapter_name: str, valid: Optional[Tensor] = None
    ) -> Tensor:
        """The refined patch tokens alone (B, N, D): ``refine(...).tokens``."""
        return self.refine(feats, depth, adapter_name, valid).tokens

    def _fp32_bias(self, adapter_name: str, stream: str, bias: Tensor) -> Tensor:
        """The live bias in fp32 (a model cast with .half() / .to(bfloat16) would make steps of 1e-3 vanish)."""
        if bias.dtype == torch.float32:
            return bias
        container = self.spectralmoe_gate_depth_bias if (
            stream == "depth" and adapter_name in self.spectralmoe_gate_depth_bias
        ) else self.spectralmoe_gate_visual_bias
        container[adapter_name] = bias.float()
        return container[adapter_name]

    def _biases_of_this_forward(self, adapter_name: str, state: Optional[ForwardState]) -> dict:
        """The aux-free biases a forward routes with, kept in its state: a checkpoint recomputation (after the bias
        moved) must choose the experts its forward chose."""
        live = {stream: self._selection_bias(adapter_name, stream) for stream in ("visual", "depth")}
        if state is None or all(bias is None for bias in live.values()):
            return live
        key = (adapter_name, self.block_index)
        if key not in state.selection_biases:
            state.selection_biases[key] = {s: None if b is None else b.clone() for s, b in live.items()}
        return state.selection_biases[key]

    def _depth_for(self, adapter_name: str, feats: Tensor, state: Optional[ForwardState]) -> Optional[Tensor]:
        """This forward's depth tokens for this block, projected to the ViT's width: (B, N, D); None if unused."""
        config = self.spectralmoe_configs[adapter_name]
        if not config.use_depth:
            return None
        if state is None:
            raise ValueError(
                "A SpectralMoE block with depth (use_depth=True) ran outside a forward of its model, so it has no depth "
                "features of its own: call the model (or the module that takes pixel_values, e.g. model.backbone) "
                "with pixel_values, not a block or the encoder directly. If you checkpoint blocks yourself, wrap the "
                "block call (torch.utils.checkpoint / checkpoint_wrapper) so its hidden states are passed as inputs."
            )
        grid = state.grid_for(feats.shape[1])
        if grid is None and state.visual_grid is not None:
            height, width = state.visual_grid
            raise ValueError(
                f"The block has {feats.shape[1]} patch tokens after num_prefix_tokens={self.num_prefix_tokens}, but "
                f"pixel_values give a {height}x{width} grid of {height * width} patches: check "
                "SpectralMoEConfig.num_prefix_tokens (CLS + register tokens; None reads it from the model config)."
            )
        if grid is None:
            raise ValueError(
                f"Cannot tell the patch grid of {feats.shape[1]} visual tokens to align depth features with: pass "
                "pixel_values to the model (its height and width give the grid)."
            )
        if config.depth_source == "elevation":
            return state.elevation_tokens(adapter_name, self._shared.elevation_encoder[adapter_name], grid)
        features = state.depth.get(adapter_name)
        if features is None:  # the adapter was not active when this forward started
            raise ValueError(
                f"Adapter {adapter_name!r} became active during a forward: activate adapters between forwards."
            )
        depth = features.tokens(self.block_index, self.num_blocks, grid)  # B, N, C
        if depth.shape[0] != feats.shape[0]:
            raise ValueError(
                f"Depth features have batch size {depth.shape[0]} but the images have {feats.shape[0]}."
            )
        projection = self._shared.depth_projection
        if adapter_name in projection:
            expected = projection[adapter_name].in_features
            if depth.shape[-1] != expected:
                raise ValueError(
                    f"Depth features are {depth.shape[-1]} wide but adapter {adapter_name!r} was made for a depth model "
                    f"{expected} wide (depth_hidden_size={expected}): pass the hidden states of that depth model."
                )
            depth = projection[adapter_name](depth.to(projection[adapter_name].weight.dtype))  # B, N, D
        elif depth.shape[-1] != self.hidden_size:
            raise ValueError(
                f"Depth features are {depth.shape[-1]} wide but the ViT is {self.hidden_size} wide: attach the depth "
                "model with model.set_depth_model(...) (it adds the projection), or create the adapter with "
                f"SpectralMoEConfig(depth_hidden_size={depth.shape[-1]}) so a projection is trained."
            )
        return depth

    def _refine_all(self, feats: Tensor, state: Optional[ForwardState], active: list[str]) -> Tensor:
        """Every active adapter's refinement of this block's patch tokens (B, N, D), routing reported to ``state``
        and, unless an adapter opted out, its balance loss attached to the tokens' graph."""
        valid = state.token_mask if state is not None else None
        if valid is not None and tuple(valid.shape) != tuple(feats.shape[:2]):
            valid = None
        grid = state.grid_for(feats.shape[1]) if state is not None else None
        in_graph = []
        recomputing = state is not None and state.finished
        for adapter_name in active:
            config = self.spectralmoe_configs[adapter_name]
            biases = self._biases_of_this_forward(adapter_name, state)
            refined = self.refine(feats, self._depth_for(adapter_name, feats, state), adapter_name, valid=valid,
                                  selection_bias=biases)
            feats = refined.tokens
            blocks = self.spectralmoe_num_adapted_blocks.get(adapter_name, 1)
            for stream, routed in refined.routing.items():
                aux = weighted_aux_loss(config, routed)
                if config.balance_loss_reduction == "mean":
                    aux = aux / blocks
                live = self._selection_bias(adapter_name, stream)
                if live is not None and self.training and not recomputing:  # once per training forward
                    update_selection_bias(self._fp32_bias(adapter_name, stream, live), routed.expert_load,
                                          config.bias_update_rate)
                if config.aux_loss_in_graph:
                    in_graph.append(aux)
                if state is not None:  # logged detached unless the user adds it to the loss (opted out)
                    logged = aux.detach() if config.aux_loss_in_graph else aux
                    state.record(adapter_name, self.block_index, stream, logged, routing_stats(routed, valid, grid),
                                 keep=config.keep_routing_stats)
        if in_graph and self.training:  # training only: eval-mode input gradients (saliency, attacks) stay the task's
            feats = attach_aux_loss(feats, torch.stack([loss.float() for loss in in_graph]).sum())
        return feats

    def _forward_state(self, args: tuple, kwargs: dict) -> Optional[ForwardState]:
        """The state of the forward this block call belongs to: the running one, else (a checkpoint recomputation,
        after its forward returned) the one its inputs were tagged with. None for a bare call of a block."""
        if torch.compiler.is_compiling():
            return self._shared.traced_state
        state = running_state(self._shared.owner)
        if state is not None:
            if torch.is_grad_enabled() or self.training:  # only a graph (or a reentrant checkpoint) recomputes
                tag_inputs(state, args, kwargs)
            return state
        return tagged_state(self._shared.owner, args, kwargs)

    def _refine_block_output(self, block: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        """Forward hook on the wrapped block (registered first): refine its patch tokens.

        A hook rather than code after ``base_layer(...)``: transformers 5 records ``hidden_states`` (and Backbone
        feature maps) with forward hooks on the block class, i.e. on the wrapped block. Running first among the
        block's hooks, the refinement is what they record. Under transformers' gradient checkpointing (which
        checkpoints the block's ``forward``, not its hooks) the refinement is checkpointed too, as its own segment.
        """
        active = [name for name in self.active_adapters if name in self.spectralmoe_A]
        if self.disable_adapters or not active:
            return None
        state = self._forward_state(args, kwargs)
        hidden = output[0] if isinstance(output, tuple) else output  # B, P + N, D
        if hidden.shape[1] <= self.num_prefix_tokens:
            raise ValueError(
                f"This block outputs {hidden.shape[1]} tokens, but num_prefix_tokens={self.num_prefix_tokens} "
                "(CLS/registers) would leave no patch tokens to refine: set SpectralMoEConfig.num_prefix_tokens to the "
                "model's CLS + register count, or leave it None to read it from the model config."
            )
        prefix, feats = hidden[:, : self.num_prefix_tokens], hidden[:, self.num_prefix_tokens :]
        if getattr(block, "gradient_checkpointing", False) and self.training and torch.is_grad_enabled():
            feats = torch.utils.checkpoint.checkpoint(self._refine_all, feats, state, active, use_reentrant=False)
        else:
            feats = self._refine_all(feats, state, active)
        hidden = torch.cat([prefix, feats], dim=1)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_layer(*args, **kwargs)  # extra arguments (RoPE embeddings, resolution, ...) pass through

    def remove_refine_hook(self) -> None:
        """Detach the refinement from the block, so an unloaded block is the untouched original."""
        self._refine_hook.remove()

    # --- PEFT lifecycle ----------------------------------------------------------------------------------------------

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        raise ValueError(MERGE_REFUSAL)

    def unmerge(self) -> None:
        return None

    def delete_adapter(self, adapter_name: str) -> None:
        self.spectralmoe_configs.pop(adapter_name, None)
        super().delete_adapter(adapter_name)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: Optional[torch.device] = None) -> None:
        """Put this adapter on its block's device, in the block's float dtype (peft's version reads a .weight that
        blocks do not have). Meta tensors (low_cpu_mem_usage) stay until weights are loaded."""
        reference = next(self.base_layer.parameters(), None)
        if reference is None:
            return
        device = device or reference.device
        dtype = reference.dtype if reference.dtype.is_floating_point else None
        for name in self.adapter_layer_names:
            container = getattr(self, name)
            if adapter_name not in container or container[adapter_name].is_meta:
                continue
            container[adapter_name] = container[adapter_name].to(device=device, dtype=dtype)

    def __repr__(self) -> str:
        return "spectralmoe." + super().__repr__()
