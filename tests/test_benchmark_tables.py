"""BENCHMARKS.md's tables are what `benchmarks/results/*.json` give (`python -m benchmarks.tables`),
and the statistics behind their intervals (`benchmarks/_common.median_interval`)."""

from fractions import Fraction
from math import comb

import pytest

from benchmarks import _common
from benchmarks import tables
from tests import helpers


def _run_tables(*args):
  return helpers.run_python("-m", "benchmarks.tables", *args)


def test_benchmarks_md_is_up_to_date():
  """Run as a script (the `__main__` copy of tables.py), every marked table is known and current."""
  result = _run_tables("--check")
  assert result.returncode == 0, result.stdout + result.stderr


def test_check_fails_when_a_table_is_edited_by_hand(tmp_path):
  with open(tables.BENCHMARKS_MD) as f:
    text = f.read()
  assert "<!-- table: tpu_bytes_ops -->" in text and "<!-- table: op_batch_norm_summary -->" in text
  edited = tmp_path / "BENCHMARKS.md"
  edited.write_text(
    text.replace("<!-- table: tpu_bytes_ops -->\n", "<!-- table: tpu_bytes_ops -->\n| 1 |\n")
  )
  result = _run_tables("--check", "--path", str(edited))
  assert result.returncode == 1 and "not what benchmarks/results" in result.stdout


def test_an_unknown_table_name_is_an_error():
  with pytest.raises(KeyError, match="no_such_table"):
    tables.rewrite("<!-- table: no_such_table -->\nx\n<!-- end table -->\n")


def test_median_interval_of_a_small_sample():
  assert _common.median_interval([0.9, 1.0, 1.1, 1.2, 0.95, 1.05, 1.0, 0.98, 1.02, 1.01]) == (
    0.95,
    1.1,
  )


@pytest.mark.parametrize("n", [1000, 1024, 3000])
def test_median_interval_covers_95_percent_past_a_thousand_rounds(n):
  """Exact binomial coverage of the returned ranks, beyond n = 1023 where 2.0**n overflows."""
  lo, hi = _common.median_interval(list(range(n)))
  k = lo + 1  # the 1-based rank of the lower bound; the upper one mirrors it
  assert hi == n - k
  coverage = lambda k: 1 - 2 * Fraction(sum(comb(n, j) for j in range(k)), 2**n)
  assert coverage(k) >= Fraction(95, 100) > coverage(k + 1)
  assert abs(k - (n / 2 - 1.96 * n**0.5 / 2)) < 2  # the normal approximation's rank


_FAULTS_AFTER_PIN = """
import resource, sys
import numpy as np
from benchmarks import _common
print(_common.pin_allocator(sys.argv[1]))
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
np.ones(1 << 22)  # 32 MB written and freed
before = faults()
for _ in range(5):
  np.ones(1 << 21)  # 16 MB written and freed, five times
print(faults() - before)
"""


def _faults_after_pin(mode):
  out = helpers.run_python("-c", _FAULTS_AFTER_PIN, mode, check=True).stdout.split()
  return out[0], int(out[1])


@helpers.needs_glibc
def test_kept_host_memory_is_not_faulted_in_again():
  """`--allocator keep`: reusing freed blocks page-faults nothing; `fault`: every block is mapped
  afresh, so writing it faults its pages in again (5 × 16 MB: thousands of 4 KiB pages, or a few
  dozen huge pages at the least)."""
  assert _faults_after_pin("keep") == ("keep", 0)
  mode, faults = _faults_after_pin("fault")
  assert mode == "fault" and faults >= 40, faults


def test_an_unknown_allocator_mode_is_refused():
  with pytest.raises(ValueError, match=r"allocator mode='tcmalloc' must be one of \('keep'"):
    _common.pin_allocator("tcmalloc")
  p = _common.parser("x", "x")
  assert p.parse_args([]).allocator == "keep"
  assert _common.parse_args(p, ["--allocator", "glibc"]).allocator == "glibc"
