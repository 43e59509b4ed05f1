"""Study 3: BatchNorm before vs after the ReLU, on the seeds' CIFAR-10 CNN (study 1's recipe and scale).

Ioffe & Szegedy (2015, §3.2) put BN before the nonlinearity (on Wx + b); many practitioners report BN
after the ReLU works as well or better. Study 1's "BN" run is the "before" arm.
"""

from experiments.studies import bn_cifar_cnn
from experiments.studies import common
from experiments.studies import plots

TITLE = "Study 3: BatchNorm before vs after the activation (seeds' CIFAR-10 CNN)"
CLAIM = (
  "Ioffe & Szegedy (arXiv:1502.03167) normalize the pre-activation x = Wu (BN before the ReLU); "
  "the alternative normalizes the ReLU output. No large difference is generally expected."
)
LABELS = {"cifar_cnn_bn": "BN before ReLU", "cifar_cnn_bn_after": "BN after ReLU"}


def runs(scale: str):
  c = bn_cifar_cnn.base_config(scale)
  return {"cifar_cnn_bn": c, "cifar_cnn_bn_after": common.with_overrides(c, norm_position="after")}


def summarize(study, results):
  return common.accuracy_table(study, results, LABELS)


def plot(study, results, out_path):
  plots.eval_curves(results, LABELS, out_path, title=study.title)


def get_study(scale: str) -> common.Study:
  return common.Study(
    "bn_position",
    TITLE,
    CLAIM,
    bn_cifar_cnn.REDUCED if scale == "cpu" else "",
    runs(scale),
    summarize,
    plot,
    seeds=common.seeds_for(scale),
    scale=scale,
  )
