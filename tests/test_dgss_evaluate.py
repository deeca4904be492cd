"""Metrics against a per-pixel reference, and sliding-window inference against whole-image inference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from spectralmoe_peft.dgss.evaluate import confusion_matrix, iou_per_class, segmentation_metrics, sliding_window_logits


def reference_confusion(prediction, labels, num_classes, ignore_index=255):
    matrix = [[0] * num_classes for _ in range(num_classes)]
    for p, t in zip(prediction.flatten().tolist(), labels.flatten().tolist()):
        if t != ignore_index:
            matrix[t][p] += 1
    return torch.tensor(matrix)


def reference_iou(matrix, c):
    tp = matrix[c][c]
    union = sum(matrix[c]) + sum(row[c] for row in matrix) - tp
    return tp / union if union else math.nan


def test_confusion_and_iou_match_a_per_pixel_reference():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (3, 17, 13), generator=g)
    labels[labels == 4] = 255  # class 4 never labelled...
    prediction = torch.randint(0, 4, (3, 17, 13), generator=g)  # ...nor predicted: absent, NaN, not in the mean
    matrix = confusion_matrix(prediction, labels, 5)
    expected = reference_confusion(prediction, labels, 5)
    assert torch.equal(matrix, expected)
    iou = iou_per_class(matrix)
    for c in range(5):
        ref = reference_iou(expected.tolist(), c)
        assert (math.isnan(ref) and math.isnan(iou[c])) or abs(ref - iou[c].item()) < 1e-12
    metrics = segmentation_metrics(matrix, ["a", "b", "c", "d", "e"])
    assert metrics["per_class_iou"]["e"] is None
    assert metrics["miou"] == pytest.approx(sum(reference_iou(expected.tolist(), c) for c in range(4)) / 4)
    assert metrics["labelled_pixels"] == int((labels != 255).sum())


def test_confusion_rejects_bad_labels_and_shapes():
    with pytest.raises(ValueError, match="differ in shape"):
        confusion_matrix(torch.zeros(2, 3), torch.zeros(3, 2), 2)
    with pytest.raises(ValueError, match="outside 0..1"):
        confusion_matrix(torch.zeros(4, dtype=torch.long), torch.tensor([0, 1, 2, 255]), 2)


def pixelwise(batch):  # a per-pixel "model": its logits at a pixel depend only on that pixel
    x = batch["pixel_values"]
    return torch.cat([x, -x, x * x], dim=1)


@pytest.mark.parametrize("height, width, window, stride", [(70, 45, 32, 16), (64, 64, 32, 32), (20, 25, 32, 8)])
def test_sliding_window_equals_whole_image_for_a_pixelwise_model(height, width, window, stride):
    image = torch.randn(1, height, width)
    logits = sliding_window_logits(pixelwise, image, num_classes=3, window=window, stride=stride, batch_size=5)
    assert logits.shape == (3, height, width)
    torch.testing.assert_close(logits, pixelwise({"pixel_values": image[None]})[0])


def test_sliding_window_averages_overlaps_and_passes_nodata():
    seen = []

    def constant(batch):  # each window predicts its own index: overlaps must average them
        seen.append(batch["nodata_mask"].clone())
        count = sum(len(s) for s in seen)
        values = torch.arange(count - len(batch["pixel_values"]), count, dtype=torch.float32)
        return values.view(-1, 1, 1, 1).expand(-1, 1, 8, 8)

    nodata = torch.zeros(8, 12, dtype=torch.bool)
    nodata[:, -1] = True
    logits = sliding_window_logits(constant, torch.zeros(2, 8, 12), 1, window=8, stride=4, nodata_mask=nodata)
    # windows start at columns 0 and 4: columns 4..7 are covered by both (mean of 0 and 1)
    assert torch.all(logits[0, :, :4] == 0) and torch.all(logits[0, :, 4:8] == 0.5) and torch.all(logits[0, :, 8:] == 1)
    assert seen[0][1, :, -1].all() and not seen[0][0].any()


def test_evaluation_takes_numpy_arrays_as_the_docs_snippet_passes_them():
    """docs/segmentation.md's evaluation: a numpy scene, `nodata_mask=~scene.valid` (numpy bool) and uint8 labels
    give the same result as tensors."""
    rng = np.random.default_rng(0)
    image = rng.standard_normal((1, 21, 30)).astype(np.float32)
    valid = rng.random((21, 30)) > 0.1
    labels = rng.integers(0, 3, (21, 30)).astype(np.uint8)
    labels[~valid] = 255
    seen = []

    def predict(batch):
        seen.append(batch["nodata_mask"])
        return pixelwise(batch)

    logits = sliding_window_logits(predict, image, num_classes=3, window=16, stride=8, nodata_mask=~valid)
    expected = sliding_window_logits(pixelwise, torch.from_numpy(image), 3, window=16, stride=8,
                                     nodata_mask=torch.from_numpy(~valid))
    torch.testing.assert_close(logits, expected)
    assert all(mask.dtype == torch.bool for mask in seen) and any(mask.any() for mask in seen)
    prediction = logits.argmax(0)
    numpy_metrics = segmentation_metrics(confusion_matrix(prediction.numpy(), labels, 3), ["a", "b", "c"])
    torch_metrics = segmentation_metrics(confusion_matrix(prediction, torch.from_numpy(labels).long(), 3),
                                         ["a", "b", "c"])
    assert numpy_metrics == torch_metrics and numpy_metrics["labelled_pixels"] == int(valid.sum())
    reference = reference_confusion(prediction, torch.from_numpy(labels).long(), 3)
    assert torch.equal(confusion_matrix(prediction, labels, 3), reference)


def test_evaluation_rejects_what_it_cannot_read():
    with pytest.raises(TypeError, match="labels: expected class ids"):
        confusion_matrix(torch.zeros(4, dtype=torch.long), np.zeros(4, np.float32), 2)
    with pytest.raises(TypeError, match="prediction: expected a torch.Tensor or numpy array, got list"):
        confusion_matrix([0, 1], torch.zeros(2, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="nodata_mask has shape"):
        sliding_window_logits(pixelwise, torch.zeros(1, 8, 8), 3, window=4, nodata_mask=np.zeros((8, 9), bool))
