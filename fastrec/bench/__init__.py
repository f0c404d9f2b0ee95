"""``fastrec bench``: fastrec against the baselines a user would otherwise run, as ratios.

- ``harness``: cases and rows, interleaved timing, the record of what ran on each side (from
  ``fastrec.stats()``), the machine and versions, JSON and Markdown output.
- ``cases/<op>.py``: each op's rows; ``cases.CASES`` maps each ``--family`` to them.
- ``tables``: the per-card tuning tables (conv dispatch, attention block configs).
- ``cli``: the command itself; ``suite``: the pytest-benchmark suites' glue.
"""
