"""The README's code must run as written."""

import re

import torch

from conftest import REPO


def test_readme_goldstone_example_runs_and_converges():
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no python example"
    torch.manual_seed(0)
    scope: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), scope)
    opt, U, V, coupling = scope["opt"], scope["U"], scope["V"], scope["coupling"]
    assert opt.num_gauge_steps == 300 // 50
    assert opt.last_gauge["psi_after"] <= opt.last_gauge["psi_before"]
    # the gauge steps removed the twist between time steps: psi is tiny compared with the data fit scale
    assert coupling.psi_value([U, V]).item() < 1e-2 * (U.detach() ** 2).sum().item()
