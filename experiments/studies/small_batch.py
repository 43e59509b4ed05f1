"""Study 5: small per-replica batches — BatchNorm, GroupNorm + weight standardization, Batch Renorm.

Wu & He 2018 (arXiv:1803.08494) train ResNets with per-GPU batch 32 … 2: BN's error grows as the batch
shrinks, GN's does not. Ioffe 2017 (arXiv:1702.03275): Batch Renormalization recovers much of BN's loss.

Per-replica batch b is emulated on one device: the global batch of B examples is split into B / b
consecutive groups and each group is normalized with its own moments — exactly what B / b data-parallel
replicas without synchronized BN compute (normjax's ghost batches; for renorm, `ghost_batch_size` with
`renorm=True`). The optimizer therefore sees the same global batch for every b, so only the normalization
changes; b = B is ordinary full-batch BN. GroupNorm's computation does not depend on b at all, so its runs
are made once and drawn at every b. Batch Renorm runs twice: with fixed r_max = 3, d_max = 5 from the
first step, and with Ioffe's schedule scaled to the run (plain BN for the first 10% of the steps, then
d_max ramps to 5 by 50% and r_max to 3 by 80%: the paper's 5k / 25k / 40k ratios). BN momentum 0.9.
"""

from experiments.configs import cifar10_resnet20
from experiments.studies import common
from experiments.studies import plots

TITLE = "Study 5: small per-replica batches on ResNet-20 (BN, Batch Renorm, GroupNorm + WS)"
CLAIM = (
  "BN degrades at small per-replica batches, GN does not (Wu & He 2018, arXiv:1803.08494); Batch "
  "Renormalization recovers much of the gap (Ioffe 2017, arXiv:1702.03275)."
)
REDUCED = (
  "CPU scale: ResNet-20 with widths 8/16/32 instead of 16/32/64; global batch 64 (per-replica "
  "batches 2, 4, 16, 64) for 150 steps (9,600 images, 0.19 epoch) instead of 128 / 180 epochs; "
  "evaluation on the first 5,000 test images."
)
PER_REPLICA = {"cpu": (2, 4, 16, 64), "smoke": (2, 16), "full": (2, 4, 8, 16, 32, 128)}


def base_config(scale: str):
  common.check_scale(scale)
  c = cifar10_resnet20.get_config()
  c.bn_momentum, c.num_groups = 0.9, 8
  if scale in ("cpu", "smoke"):
    c.model_kwargs.widths = (8, 16, 32)
    c.batch_size, c.num_steps, c.learning_rate, c.warmup_steps = 64, 150, 0.05, 15
    c.eval_every, c.eval_examples, c.log_every, c.checkpoint_every, c.num_groups = (
      50,
      5000,
      10,
      0,
      4,
    )
  else:
    c.batch_size, c.num_epochs, c.eval_every = 128, 60, 390 * 5
  return common.smoke(c) if scale == "smoke" else c


def runs(scale: str):
  c = base_config(scale)
  steps = c.num_steps or c.num_epochs * 50_000 // c.batch_size
  out = {}
  for b in PER_REPLICA[scale]:
    full = b >= c.batch_size
    out[f"r20_bn_b{b}"] = common.with_overrides(
      c, norm="batch_norm" if full else "ghost_batch_norm", ghost_batch_size=min(b, c.batch_size)
    )
    out[f"r20_renorm_b{b}"] = common.with_overrides(
      c, norm="batch_renorm", renorm_ghost_batch_size=0 if full else b
    )
    out[f"r20_renorm_sched_b{b}"] = common.with_overrides(
      c,
      norm="batch_renorm",
      renorm_ghost_batch_size=0 if full else b,
      renorm_warmup_steps=max(1, steps // 10),
    )
  out["r20_gn_ws"] = common.with_overrides(c, norm="group_norm", weight_standardization=True)
  return out


def _lines(study, results):
  bs = PER_REPLICA[study.scale]
  return bs, {
    "BatchNorm": [results[f"r20_bn_b{b}"] for b in bs],
    "Batch Renorm (fixed r_max 3, d_max 5)": [results[f"r20_renorm_b{b}"] for b in bs],
    "Batch Renorm (Ioffe's schedule)": [results[f"r20_renorm_sched_b{b}"] for b in bs],
    "GroupNorm + WS (independent of b)": [results["r20_gn_ws"] for _ in bs],
  }


def summarize(study, results):
  bs, lines = _lines(study, results)
  rows = [
    "Test error (%), mean ± std over seeds, against the per-replica batch b.",
    "",
    "| method | " + " | ".join(f"b = {b}" for b in bs) + " |",
    "|---|" + "---|" * len(bs),
  ]
  for label, per_b in lines.items():
    rows.append(
      f"| {label} | "
      + " | ".join(common.mean_std(1 - common.metric(rs, "eval_accuracy")) for rs in per_b)
      + " |"
    )
  return "\n".join(rows)


def plot(study, results, out_path):
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  bs, lines = _lines(study, results)
  fig, ax = plt.subplots(figsize=(6.5, 4.5))
  plots.against(
    ax,
    bs,
    lines,
    lambda rs: (1 - common.metric(rs, "eval_accuracy")) * 100,
    xlabel="per-replica batch b",
    ylabel="test error (%)",
  )
  plots.finish(fig, [ax], out_path, study.title)


def get_study(scale: str) -> common.Study:
  return common.Study(
    "small_batch",
    TITLE,
    CLAIM,
    REDUCED if scale == "cpu" else "",
    runs(scale),
    summarize,
    plot,
    seeds=common.seeds_for(scale),
    scale=scale,
  )
