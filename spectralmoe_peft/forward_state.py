"""The state of one forward: what the depth stream computed for it, and the routing it produced.

Every forward of a SpectralMoE model gets its own ``ForwardState``, made when the forward starts (by the outermost
hooked module that receives ``pixel_values``) and finished when it returns. Nothing of it is shared between forwards:

- **Threads / asyncio.** The running forward's state is found through a ``ContextVar`` (per thread, per task), so
  concurrent forwards never see each other's depth features.
- **Checkpoint recomputation.** A block recomputed in backward runs after its forward returned, possibly on another
  thread. Each adapted block tags the storage of its input hidden states with the state; a recomputation receives
  the same tensors (non-reentrant checkpoint) or detached aliases of the same storage (reentrant), and finds its own
  forward's state there. The tag lives exactly as long as the saved block inputs, i.e. until backward frees them.
- **Memory.** When the forward finishes, the raw depth hidden states are dropped; only the per-block depth tokens
  that a recomputation needs stay, owned by the graph (through the tags), not by the model.

Under ``torch.compile`` the hooks are traced once and no Python runs per call, so there the state is handed from the
start-of-forward hook to the blocks through an attribute the trace reads (dynamo cannot trace ContextVars).
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import torch
from torch import Tensor

from .depth import encode_elevation

_TAG = "_spectralmoe_forward_state"
# the forwards running in this thread / task, innermost last; immutable tuples, so a set never races a read
_RUNNING: contextvars.ContextVar[tuple] = contextvars.ContextVar("spectralmoe_running_forwards", default=())


@dataclass
class RoutingStats:
    """Routing of one stream in one block, from the last forward (detached; for logging and routing maps)."""

    expert_load: Tensor  # E: fraction of token slots routed to each expert
    topk_indices: Tensor  # B, N, k: chosen experts per patch token (row-major over the patch grid)
    gate_entropy: Tensor  # scalar: mean entropy of the gate distribution over experts
    grid: Optional[tuple[int, int]]  # (H, W) patch grid, to draw topk_indices as a map

    def __repr__(self) -> str:  # the token map can be millions of entries: show its shape, not its values
        load = ", ".join(f"{v:.3f}" for v in self.expert_load.float().tolist())
        return (
            f"RoutingStats(expert_load=[{load}], gate_entropy={float(self.gate_entropy):.4f}, "
            f"topk_indices=<{tuple(self.topk_indices.shape)}>, grid={self.grid})"
        )


@dataclass
class LastForward:
    """What the model keeps of its last finished forward: small, detached routing statistics and the aux loss."""

    completed: bool  # False when that forward raised: its statistics are incomplete
    aux_loss: Optional[Tensor]  # scalar; attached to the graph only for adapters that opted out of aux_loss_in_graph
    routing: dict  # adapter -> block -> stream -> RoutingStats


@dataclass(eq=False)
class ForwardState:
    """Inputs the blocks of one forward share (depth features, patch grid, nodata mask) and what they report."""

    owner: "Owner"  # the tuner whose forward this is
    opened_by: Any  # the module whose forward started it (only it closes it)
    visual_grid: Optional[tuple[int, int]]
    token_mask: Optional[Tensor] = None  # B, N bool: valid patch tokens (nodata masked out)
    depth: dict = field(default_factory=dict)  # adapter -> DepthFeatures (adapters with the same inputs share one)
    elevation: Optional[Tensor] = None  # B, 1, H, W raster for depth_source="elevation"
    elevation_voids: Optional[Tensor] = None  # B, 1, H, W bool: NaN/Inf or nodata_value pixels of that raster
    aux_losses: dict = field(default_factory=dict)  # (adapter, block, stream) -> weighted scalar loss
    routing: dict = field(default_factory=dict)  # adapter -> block -> stream -> RoutingStats
    selection_biases: dict = field(default_factory=dict)  # (adapter, block) -> {stream: aux-free bias it routed with}
    finished: bool = False

    def grid_for(self, num_patches: int) -> Optional[tuple[int, int]]:
        grid = self.visual_grid
        if grid is not None and grid[0] * grid[1] == num_patches:
            return grid
        side = int(round(num_patches**0.5))
        return (side, side) if side * side == num_patches else None

    def record(
        self, adapter_name: str, block_index: int, stream: str, aux_loss: Tensor, stats: RoutingStats, keep: bool = True
    ) -> None:
        """A block's routing outcome (its statistics only if its adapter keeps them); ignored in a checkpoint
        recomputation (its forward already recorded it)."""
        if self.finished:
            return
        self.aux_losses[(adapter_name, block_index, stream)] = aux_loss
        if keep:
            self.routing.setdefault(adapter_name, {}).setdefault(block_index, {})[stream] = stats

    def elevation_tokens(self, adapter_name: str, encoder, grid_hw: tuple[int, int]) -> Tensor:
        """The elevation raster patch-embedded by an adapter's encoder: (B, H*W, D). Not cached: it is trainable."""
        if self.elevation is None:
            raise ValueError("This SpectralMoE adapter uses depth_source='elevation' but no elevation= was passed.")
        return encode_elevation(self.elevation, encoder, grid_hw, voids=self.elevation_voids)

    def finish(self, completed: bool) -> LastForward:
        """Close the forward: drop the raw depth hidden states, keep what a recomputation needs, report."""
        self.finished = True
        for features in self.depth.values():
            features.release_raw()
        losses = [loss.float() for loss in self.aux_losses.values()]
        aux = torch.stack(losses).sum() if losses else None
        return LastForward(completed=completed, aux_loss=aux, routing=self.routing)


# --- finding the state of the forward a block belongs to ---------------------------------------------------------


class Owner:
    """Identifies one tuner's forwards. A deep copy of the model (an EMA teacher) gets its own: copy.deepcopy makes
    a new instance, where an id() would still name the original."""

    __slots__ = ()


def running_state(owner: "Owner") -> Optional[ForwardState]:
    """The innermost forward of tuner ``owner`` running in this thread / task, if any."""
    for state in reversed(_RUNNING.get()):
        if state.owner is owner:
            return state
    return None


def open_state(state: ForwardState) -> None:
    _RUNNING.set(_RUNNING.get() + (state,))


def close_state(owner: "Owner", module: Any) -> Optional[ForwardState]:
    """Pop the state that ``module`` opened (None when ``module`` opened none, e.g. an inner module of a forward)."""
    stack = _RUNNING.get()
    if stack and stack[-1].owner is owner and stack[-1].opened_by is module:
        _RUNNING.set(stack[:-1])
        return stack[-1]
    return None


def _tensors(values: Iterable[Any]) -> Iterable[Tensor]:
    for value in values:
        if isinstance(value, Tensor):
            yield value
        elif isinstance(value, (tuple, list)):
            yield from _tensors(value)


def tag_inputs(state: ForwardState, args: tuple, kwargs: dict) -> None:
    """Mark the storage of a block's input tensors as belonging to ``state`` (see the module docstring)."""
    for tensor in _tensors((*args, *kwargs.values())):
        try:
            setattr(tensor.untyped_storage(), _TAG, state)
        except (RuntimeError, AttributeError, NotImplementedError):  # tensor subclasses without a plain storage
            continue


def tagged_state(owner: "Owner", args: tuple, kwargs: dict) -> Optional[ForwardState]:
    """The state a block's inputs were tagged with by their own forward (a checkpoint recomputation)."""
    for tensor in _tensors((*args, *kwargs.values())):
        try:
            state = getattr(tensor.untyped_storage(), _TAG, None)
        except (RuntimeError, AttributeError, NotImplementedError):
            continue
        if state is not None and state.owner is owner:
            return state
    return None
