"""Loss and classification metrics: accuracy, per-class accuracy, confusion matrix, macro-F1."""

import jax
import jax.numpy as jnp
import numpy as np
import optax


def cross_entropy(logits, targets, label_smoothing: float = 0.0):
  """Mean softmax cross-entropy. `targets`: int labels [N] or probabilities [N, K] (mixup)."""
  num_classes = logits.shape[-1]
  if targets.ndim == 1:
    targets = jax.nn.one_hot(targets, num_classes)
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets).mean()


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
  """Counts [true, predicted]."""
  cm = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(cm, (np.asarray(labels), np.asarray(predictions)), 1)
  return cm


def classification_metrics(probs: np.ndarray, labels: np.ndarray, prefix: str) -> dict:
  """Metrics of predicted probabilities [N, K] against int labels [N], keyed `prefix/name`."""
  probs = np.asarray(probs, np.float64)
  labels = np.asarray(labels)
  num_classes = probs.shape[1]
  preds = probs.argmax(1)
  cm = confusion_matrix(labels, preds, num_classes)
  support = cm.sum(1)
  predicted = cm.sum(0)
  tp = np.diag(cm).astype(np.float64)
  with np.errstate(divide="ignore", invalid="ignore"):
    recall = np.where(support > 0, tp / np.maximum(support, 1), np.nan)
    precision = np.where(predicted > 0, tp / np.maximum(predicted, 1), 0.0)
    f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
  present = support > 0
  nll = -np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, 1.0)).mean()
  return {
      f"{prefix}/loss": float(nll),
      f"{prefix}/accuracy": float((preds == labels).mean()),
      f"{prefix}/per_class_accuracy": [None if np.isnan(r) else float(r) for r in recall],
      f"{prefix}/macro_f1": float(f1[present].mean()),
      f"{prefix}/confusion_matrix": cm.tolist(),
  }
