"""Loss and classification metrics: accuracy, per-class accuracy, confusion matrix, macro-F1, and
calibration (expected calibration error, reliability bins, temperature scaling fit on val)."""

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
  return {
      f"{prefix}/loss": nll(probs, labels),
      f"{prefix}/accuracy": float((preds == labels).mean()),
      f"{prefix}/per_class_accuracy": [None if np.isnan(r) else float(r) for r in recall],
      f"{prefix}/macro_f1": float(f1[present].mean()),
      f"{prefix}/confusion_matrix": cm.tolist(),
      f"{prefix}/ece": expected_calibration_error(probs, labels),
  }


def copy_metrics(probs: np.ndarray, labels: np.ndarray, train_copy: np.ndarray,
                 prefix: str = "test") -> dict:
  """Accuracy on the faces with and without a near copy in train (bool `train_copy` [N], from
  fer.duplicates): `prefix/train_copies` (how many have one), `prefix/accuracy_train_copy` and
  `prefix/accuracy_no_train_copy` (None where no face is in the group)."""
  correct = np.asarray(probs).argmax(1) == np.asarray(labels)
  train_copy = np.asarray(train_copy, bool)
  mean = lambda x: float(x.mean()) if len(x) else None
  return {f"{prefix}/train_copies": int(train_copy.sum()),
          f"{prefix}/accuracy_train_copy": mean(correct[train_copy]),
          f"{prefix}/accuracy_no_train_copy": mean(correct[~train_copy])}


ECE_BINS = 15  # equal-width confidence bins, as in Guo et al. 2017 (On Calibration of Modern NNs)


def reliability_bins(probs: np.ndarray, labels: np.ndarray, num_bins: int = ECE_BINS):
  """Per equal-width bin of top-class confidence over [0, 1]: (mean confidence, accuracy, count),
  three arrays [num_bins]; an empty bin has confidence and accuracy NaN."""
  probs = np.asarray(probs, np.float64)
  confidence = probs.max(1)
  correct = probs.argmax(1) == np.asarray(labels)
  # Bin b holds confidences in (b/B, (b+1)/B]; a confidence of exactly 0 goes to bin 0, and so
  # does a NaN one (a diverged search trial's), which makes its bin and the ECE NaN.
  bins = np.clip(np.ceil(np.nan_to_num(confidence) * num_bins).astype(np.int64) - 1, 0,
                 num_bins - 1)
  count = np.bincount(bins, minlength=num_bins)
  with np.errstate(divide="ignore", invalid="ignore"):
    mean_conf = np.bincount(bins, confidence, num_bins) / count
    accuracy = np.bincount(bins, correct.astype(np.float64), num_bins) / count
  return mean_conf, accuracy, count


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray,
                               num_bins: int = ECE_BINS) -> float:
  """ECE: sum over confidence bins of |accuracy - mean confidence| weighted by the bin's share of
  the images (top-class confidence). 0 for a calibrated model; 0.1 means its confidence is off
  by 10 points on average."""
  mean_conf, accuracy, count = reliability_bins(probs, labels, num_bins)
  used = count > 0
  return float(np.sum(count[used] * np.abs(accuracy[used] - mean_conf[used])) / count.sum())


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
  """softmax(log(probs) / T): temperature scaling of probabilities (for one network without TTA,
  exactly scaling its logits; for TTA or ensemble averages, of the averages' log). Keeps every
  prediction (argmax) as it is; T > 1 softens overconfident probabilities."""
  logits = np.log(np.clip(np.asarray(probs, np.float64), 1e-12, 1.0)) / temperature
  logits -= logits.max(1, keepdims=True)
  scaled = np.exp(logits)
  return scaled / scaled.sum(1, keepdims=True)


def nll(probs, labels) -> float:
  """Mean negative log-likelihood of int labels [N] under probabilities [N, K]."""
  return float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, 1.0)).mean())


def fit_temperature(probs: np.ndarray, labels: np.ndarray) -> float:
  """The temperature T in [0.05, 20] minimising the negative log-likelihood of
  apply_temperature(probs, T) on (probs, labels): fit it on val, apply it to test.

  The NLL is convex in 1/T, so a golden-section search over 1/T finds the minimum.
  """
  probs = np.asarray(probs, np.float64)
  labels = np.asarray(labels)
  if len(labels) == 0:
    raise ValueError("fit_temperature: no images to fit a temperature on")
  loss = lambda beta: nll(apply_temperature(probs, 1.0 / beta), labels)
  lo, hi = 1.0 / 20, 1.0 / 0.05
  ratio = (np.sqrt(5.0) - 1) / 2
  a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
  fa, fb = loss(a), loss(b)
  while hi - lo > 1e-4:
    if fa < fb:
      hi, b, fb = b, a, fa
      a = hi - ratio * (hi - lo)
      fa = loss(a)
    else:
      lo, a, fa = a, b, fb
      b = lo + ratio * (hi - lo)
      fb = loss(b)
  return float(2.0 / (lo + hi))


def calibration(val_probs, val_labels, test_probs, test_labels) -> dict:
  """Temperature scaling fit on val, scored on test: `temperature`, and test's loss (NLL) and ECE
  after it, `test/loss_calibrated` and `test/ece_calibrated` (accuracy is unchanged)."""
  temperature = fit_temperature(val_probs, val_labels)
  scaled = apply_temperature(test_probs, temperature)
  return {
      "temperature": temperature,
      "test/loss_calibrated": nll(scaled, np.asarray(test_labels)),
      "test/ece_calibrated": expected_calibration_error(scaled, test_labels),
  }


def reliability_curves(probs, labels, temperature: float) -> dict:
  """{label: reliability_bins} of `probs` as they are and after `temperature` (fit on val), the
  labels naming each one's ECE: a panel of plots.reliability_diagram."""
  scaled = apply_temperature(probs, temperature)
  return {
      f"as trained (ECE {expected_calibration_error(probs, labels):.3f})":
          reliability_bins(probs, labels),
      f"T={temperature:.2f} fit on val (ECE {expected_calibration_error(scaled, labels):.3f})":
          reliability_bins(scaled, labels)}
