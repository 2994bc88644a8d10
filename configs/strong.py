r"""A strong from-scratch network beyond the original study: a VGG-style CNN (Khaireddin & Chen
2021 style: 4 stages of two 3x3 conv + batch norm layers with 64-512 filters, max pooling, a
dense head), heavy augmentation, SGD with Nesterov momentum and a cosine schedule, and ten-crop
test-time averaging. Trained on FER2013's Training split only; val (PublicTest) picks the best
epoch; test (PrivateTest) is read once at the end.

  python -m fer.main --config=configs/strong.py --workdir=runs/strong
  python -m fer.main --config=configs/strong.py:runlocal --workdir=/tmp/strong   # seconds

Ensemble of several finished runs (each with its own --config.seed):
  python -m fer.ensemble --workdirs=runs/strong_s0,runs/strong_s1,runs/strong_s2 --out=runs/strong_ens

Accuracy and time of each run, with its command and machine: the README's results table
(experiments/results/strong*/): 71.9% +- 0.4% PrivateTest over 4 seeds, 72.8% for their
ensemble; 30 and 50 epochs (--config.train.num_epochs) give 62.5% and 68.0%.
Expected time for the default 100 epochs:
- one GPU (H100): 39,147 training images/s (experiments/results/benchmark_train_gpu.md), so
  about 75 s of training steps plus about a minute of compiling; the measured runs took 5 min
  each while sharing the GPU with up to 8 other runs.
- the 2-core CPU (quiet AMD EPYC with AVX-512 BF16): 185-195 training images/s with the CPU
  defaults (model.conv_impl=auto: fer.native's Winograd and direct bf16 convolutions, and
  fer.models.layers.BatchNorm); before that batch norm, 175-184, and 122 without Winograd
  (conv_impl=gemm_bf16), 41 with exact fp32 convolutions (conv_impl=xla)
  (`python experiments/benchmark_train.py --config=configs/strong.py --max_images=3840
  --epochs=2` with each): about 2.5 min per epoch, 4.2 hours for 100 epochs; a killed run
  resumes from its last epoch.
- half the filters, for a laptop CPU: configs/strong_half.py (this config with
  --config.model.conv_features="(32,64,128,256)"; 4.6 M parameters) trains at 513 images/s
  there (2.9x), 100 epochs in 1.5-1.85 hours, and reached 70.9% +- 0.6% PrivateTest with
  ten-crop TTA (rows strong_half_s0, _s1 and _s2: 71.5%, 70.9% and 70.3%).
"""

from configs import common


def get_config(arg=None):
  common.check_arg(arg, "configs/strong.py")
  c = common.base()
  c.model.conv_features = (64, 128, 256, 512)
  c.model.convs_per_block = 2
  c.model.batch_norm = True
  c.model.dense_features = (1024, 1024)
  c.model.dropout = 0.5
  c.model.conv_dropout = 0.0

  common.apply_study_augmentation(c)
  c.augment.shift_fraction = 0.15
  c.augment.zoom_fraction = 0.15
  c.augment.erase_prob = 0.5

  c.input.batch_size = 128
  c.optim.name = "sgd"
  c.optim.learning_rate = 0.02
  c.optim.momentum = 0.9
  c.optim.nesterov = True
  c.optim.schedule = "cosine"
  c.optim.warmup_epochs = 2.0
  c.optim.weight_decay = 5e-4
  c.optim.label_smoothing = 0.1

  c.train.num_epochs = 100
  c.train.early_stopping_epochs = 0  # the cosine schedule decides the end; best by val
  c.eval.tta = "tencrop"
  if arg == "runlocal":
    common.apply_runlocal(c)
    c.model.conv_features = (8, 16, 16, 32)
    c.model.dense_features = (64, 64)
  return c
