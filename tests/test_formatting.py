"""cuba.formatting.first_line: what every one-line error quotes of a library's failure."""

from __future__ import annotations

import pytest
import torch

from cuba.formatting import first_line


@pytest.mark.parametrize("text, want", [
    ("plain message", "plain message"),
    ("\n  first real line  \nsecond line\n", "first real line"),
    ("Error(s) in loading state_dict for Net:\n\tsize mismatch for w: [3] vs [4].", "Error(s) in loading state_dict for Net: size mismatch for w: [3] vs [4]."),
    ("ends in a colon:", "ends in a colon:"),  # nothing follows: the line itself
])
def test_first_line_by_hand(text: str, want: str) -> None:
    assert first_line(ValueError(text)) == want


def test_an_exception_without_text_is_named_by_its_type() -> None:
    assert first_line(KeyError()) == "KeyError" and first_line(RuntimeError("   \n ")) == "RuntimeError"


def test_torchs_load_state_dict_error_keeps_what_is_wrong() -> None:
    with pytest.raises(RuntimeError) as e:
        torch.nn.Linear(3, 2).load_state_dict(torch.nn.Linear(4, 2).state_dict())
    line = first_line(e.value)
    assert "\n" not in line and line.startswith("Error(s) in loading state_dict for Linear:") and "size mismatch" in line
