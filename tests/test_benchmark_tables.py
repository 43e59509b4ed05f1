"""BENCHMARKS.md's tables are what `benchmarks/results/*.json` give (`python -m benchmarks.tables`)."""

import os
import subprocess
import sys

import pytest

from benchmarks import tables

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_tables(*args):
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  return subprocess.run(
    [sys.executable, "-m", "benchmarks.tables", *args],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )


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
