"""Every kernel at the checkpoint's real shapes (N = 577, hidden 768, the BiT stages at 384 px) for batch
1, 8 and 64, in float32/float16/bfloat16, against float64 — the checks `vithybrid-fast doctor --check` runs,
asserted. GPU only: at these sizes the interpreter would take hours, and the point is native code
(autotuned tiles, the split GroupNorm path, many attention blocks) that the CPU tests never reach.
"""

from __future__ import annotations

import pytest
import torch
from vithybrid_fast.bench.e2e import base_config

from vithybrid_fast import diagnostics

pytestmark = pytest.mark.gpu

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("batch", [1, 8, 64])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_every_kernel_at_the_checkpoint_shapes(batch, dtype, device):
    shapes = diagnostics.model_shapes(base_config(), batch)
    assert shapes.tokens == (batch, 577, 768)
    checks = diagnostics.kernel_checks(shapes, torch.device(device), seed=batch)
    rows = diagnostics.run_kernel_checks(checks, [dtype], log=lambda _line: None)
    assert {r.what for r in rows} == {"flash_attention", "weight_standardize", "group_norm_act",
                                      "layer_norm_mlp", "fused_linear", "add_layer_norm"}  # fmt: skip
    failed = [diagnostics.format_row(r) for r in rows if not r.ok]
    assert not failed, "\n" + diagnostics.ROW_HEADER + "\n" + "\n".join(failed)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_patched_base_model_logits(dtype, device):
    torch.manual_seed(0)
    from vithybrid_fast.modeling import ViTHybridForImageClassification

    model = ViTHybridForImageClassification(base_config()).to(device).eval()
    pixels = torch.randn(2, 3, 384, 384, generator=torch.Generator().manual_seed(1234)).to(device)
    ref = diagnostics.reference_logits(model, pixels)
    row = diagnostics.model_check(model, pixels, ref, dtype)
    assert row.ok, diagnostics.format_row(row)
