"""Domain-generalized semantic segmentation with SpectralMoE: real cross-sensor data, models, training,
evaluation and the demo. Needs the optional extras: ``pip install 'spectralmoe-peft[demo]'``."""

from .evaluate import confusion_matrix, iou_per_class, segmentation_metrics, sliding_window_logits
from .models import build_depth_model, build_upernet, segmentation_logits
from .scenes import CLASSES, IGNORE_INDEX, Scene, load_landsat7_nc, load_sentinel2_brandenburg
from .tiles import BandStats, RandomCrops, normalize
from .train import TrainConfig, TrainHistory, routing_health, train_segmentation

__all__ = [
    "CLASSES", "IGNORE_INDEX", "BandStats", "RandomCrops", "Scene", "TrainConfig", "TrainHistory",
    "build_depth_model", "build_upernet", "confusion_matrix", "iou_per_class", "load_landsat7_nc",
    "load_sentinel2_brandenburg", "normalize", "routing_health", "segmentation_logits", "segmentation_metrics",
    "sliding_window_logits", "train_segmentation",
]
