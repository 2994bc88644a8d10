"""Loss and classification metrics: accuracy, per-class accuracy, confusion matrix, macro-F1."""

import jax
import jax.numpy as jnp
import numpy as np
import optax


CLASS_WEIGHTS = ("none", "balanced", "sqrt")


def class_weights(labels: np.ndarray, num_classes: int, mode: str) -> np.ndarray | None:
  """Per-class loss weights [K] float32 from the training labels, or None for mode 'none'.

  'balanced': N / (K * n_c), so every class's examples weigh the same in total (scikit-learn's
  'balanced'); 'sqrt': its square root, a milder push toward rare classes. A class absent from
  `labels` gets weight 0 (no example of it can be weighted).
  """
  if mode not in CLASS_WEIGHTS:
    raise ValueError(f"optim.class_weights={mode!r}: expected one of {', '.join(CLASS_WEIGHTS)}")
  if mode == "none":
    return None
  counts = np.bincount(np.asarray(labels).reshape(-1), minlength=num_classes)[:num_classes]
  weights = np.where(counts > 0, counts.sum() / (num_classes * np.maximum(counts, 1)), 0.0)
  return (np.sqrt(weights) if mode == "sqrt" else weights).astype(np.float32)


def cross_entropy(logits, targets, label_smoothing: float = 0.0, class_weights=None):
  """Mean softmax cross-entropy. `targets`: int labels [N] or probabilities [N, K] (mixup).

  With `class_weights` [K], example i weighs w_i = targets_i . class_weights (its class's weight;
  for mixed targets the mix of the two), before label smoothing, and the loss is
  sum_i w_i ce_i / sum_i w_i (PyTorch's weighted CrossEntropyLoss).
  """
  num_classes = logits.shape[-1]
  if targets.ndim == 1:
    targets = jax.nn.one_hot(targets, num_classes)
  weights = None if class_weights is None else targets @ jnp.asarray(class_weights, jnp.float32)
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  losses = optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)
  if weights is None:
    return losses.mean()
  return jnp.sum(weights * losses) / jnp.sum(weights)


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
