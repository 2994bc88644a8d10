"""The full key set shared by every config, and the `runlocal` smoke-test switch.

Experiment configs start from `base()` and override a few keys. Every key is documented here.
"""

import ml_collections


def base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.job = "train"  # train | data_report | search
  c.seed = 0

  c.input = ml_collections.ConfigDict()
  c.input.source = "fer2013"  # fer2013 | synthetic
  c.input.archive = ""  # archive.zip, extracted folder or fer2013.csv; else $FER2013_ARCHIVE
  c.input.data_dir = ""  # TFDS data dir; else $FER_DATA_DIR, else ~/tensorflow_datasets
  c.input.protocol = "standard"  # standard | seed | val_fraction
  c.input.val_fraction = 0.5  # for protocol val_fraction (seed always halves Training)
  c.input.split_seed = 0
  # Train without the Training images that have a near copy in val or test (24% of PrivateTest
  # has one: README, "Near copies across the splits"); found by fer.duplicates, cached in the
  # data dir.
  c.input.drop_train_copies = False
  c.input.synthetic_train_size = 2800  # for source synthetic: train size; val/test get a quarter
  c.input.batch_size = 64  # global, over all devices
  c.input.eval_batch_size = 500

  c.model = ml_collections.ConfigDict()
  c.model.name = "cnn"
  c.model.conv_features = (32, 64, 128, 256)  # one conv layer each
  c.model.convs_per_block = 1  # conv layers before each pooling
  c.model.blocks_per_stage = 2  # resnet only: residual blocks per stage (conv_features)
  c.model.kernel_size = 3
  c.model.pool = "max"  # max | avg | none
  c.model.batch_norm = False
  c.model.conv_dropout = 0.0
  c.model.dense_features = (512, 256, 128)
  c.model.dropout = 0.0
  c.model.dtype = "float32"  # compute dtype: float32 | bfloat16 (params stay float32)
  # Conv lowering (fer/models/layers.py): auto = winograd_bf16 on CPU (bf16 operands, fp32 sums;
  # 3x3 layers as Winograd F(2x2, 3x3) where fer.native's AVX-512 BF16 kernels run), xla
  # elsewhere. gemm_bf16 = the same without Winograd; xla = exact fp32 on CPU.
  c.model.conv_impl = "auto"
  c.model.pool_impl = "reshape"  # xla | reshape: max pool with a cheap gradient, same results
  # Your own flax module: model.name = "package.module:ClassName" (importable), built with these
  # keyword arguments (and model.dtype where it has a `dtype` field); configs/mini_xception.py.
  c.model.kwargs = ml_collections.ConfigDict()

  c.augment = ml_collections.ConfigDict()
  c.augment.flip = False
  c.augment.rotate_degrees = 0.0
  c.augment.shift_fraction = 0.0
  c.augment.zoom_fraction = 0.0
  c.augment.crop_padding = 0
  c.augment.erase_prob = 0.0
  c.augment.mixup_alpha = 0.0
  c.augment.cutmix_alpha = 0.0

  c.optim = ml_collections.ConfigDict()
  c.optim.name = "adam"  # adam | adamw | sgd
  c.optim.learning_rate = 1e-3
  c.optim.momentum = 0.9  # sgd only
  c.optim.nesterov = True  # sgd only
  c.optim.schedule = "constant"  # constant | cosine | step
  c.optim.warmup_epochs = 0.0
  c.optim.step_decay_epochs = 10  # step schedule: multiply by step_decay_factor every N epochs
  c.optim.step_decay_factor = 0.1
  c.optim.weight_decay = 0.0  # on kernels only
  c.optim.label_smoothing = 0.0
  # none | balanced | sqrt: cross-entropy weighted per class by N / (K * n_c) of the train split
  # (balanced), or its square root (sqrt); see fer.metrics.class_weights.
  c.optim.class_weights = "none"
  c.optim.grad_clip_norm = 0.0  # 0 = off
  # Exponential moving average of the weights and batch statistics (e.g. 0.999): where > 0, the
  # average is what is evaluated each epoch, selected by val, tested and saved as the model.
  c.optim.ema_decay = 0.0
  # Sharpness-aware minimisation (Foret et al. 2021): > 0 steps with the gradient taken at the
  # weights moved by this radius up their gradient (twice the compute per step); 0 = off.
  c.optim.sam_rho = 0.0
  c.optim.freeze = ""  # regex over parameter paths ("a/b/kernel") that get no updates
  c.optim.lr_scales = ()  # ((regex, factor), ...): learning-rate factors, e.g. (("^block", 0.1),)

  c.train = ml_collections.ConfigDict()
  c.train.num_epochs = 30
  c.train.early_stopping_epochs = 0  # stop after N epochs without a new best val accuracy; 0 = off
  c.train.steps_per_dispatch = 8  # train steps fused into one jitted lax.scan
  c.train.log_every_steps = 50

  c.eval = ml_collections.ConfigDict()
  c.eval.tta = "none"  # none | flip | tencrop

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.max_to_keep = 2
  # Save last/ (and a new best/) every N epochs and at the end; a kill loses at most N-1
  # epochs, which the rerun trains again bit for bit. >1 pays where an epoch takes seconds (GPU).
  c.checkpoint.every_epochs = 1

  # Knowledge distillation (fer/distill.py): train on (1 - weight) * label + weight * the
  # teachers' probabilities (softened: p ** (1 / temperature)) from a `python -m fer.distill` file.
  c.distill = ml_collections.ConfigDict()
  c.distill.targets = ""  # the .npz of teacher probabilities; "" = no teacher
  c.distill.weight = 0.5
  c.distill.temperature = 1.0

  c.init_from = ""  # a workdir or checkpoint to start from when the workdir has none
  c.pretrained = ml_collections.ConfigDict()  # VGG16 conv base; see fer/pretrained.py
  c.pretrained.weights = "none"  # none | keras | torchvision (model.preprocess keras | torch)
  c.pretrained.path = ""  # a local weights file (offline); else found in / downloaded to cache_dir
  c.pretrained.cache_dir = ""  # else $FER_WEIGHTS_DIR, else ~/.cache/fer/weights
  c.pretrained.sha256 = ""  # pins the file (e.g. your own torchvision export); else the table's
  return c


def apply_study_augmentation(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The original study's Keras ImageDataGenerator: flip, rotation 10 deg, shift and zoom 10%."""
  c.augment.flip = True
  c.augment.rotate_degrees = 10.0
  c.augment.shift_fraction = 0.1
  c.augment.zoom_fraction = 0.1
  return c


def check_arg(arg, config_file: str):
  """The `:arg` after a config's file name: only `runlocal` (or nothing) is known; a typo such as
  `:runlcoal` would otherwise start the full run on the real data."""
  if arg not in (None, "", "runlocal"):
    raise ValueError(f"{config_file}:{arg}: unknown config argument {arg!r}; expected "
                     f"{config_file}:runlocal (a smoke test on synthetic faces) or {config_file}")


def apply_runlocal(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks a config to a CPU smoke test of seconds (big_vision's `:runlocal`)."""
  c.input.source = "synthetic"
  c.input.synthetic_train_size = 700
  c.input.batch_size = 32
  c.input.eval_batch_size = 128
  c.train.num_epochs = 2
  c.train.steps_per_dispatch = 4
  c.train.log_every_steps = 10
  return c
