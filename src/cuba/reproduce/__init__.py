"""``cuba reproduce``: run a grid of attacks x data sets x seeds (+ defenses) and aggregate the paper's tables."""

from .grid import Cell, expand, load_grid
from .runner import cell_state, is_done, run_cell, run_grid
from .report import write_report, write_table3
from .tables import write_table2

__all__ = ["Cell", "cell_state", "expand", "is_done", "load_grid", "run_cell", "run_grid", "write_report", "write_table2", "write_table3"]
