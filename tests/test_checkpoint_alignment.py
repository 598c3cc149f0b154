"""One-byte tensors (int8 quantized weights) are read aligned to a 64-byte line: torch's
`_weight_int8pack_mm` crashed (segfault) on an int8 checkpoint of the tiled trained MoE whose
qweights the file order had left off a 16-byte boundary."""

from __future__ import annotations

import torch

from cpmctl.checkpoint import ONE_BYTE_ALIGN, SafetensorsFile, write_safetensors, zero_copy_readable
from cpmctl.offload.plan import part_alignment


def test_zero_copy_rule():
    assert zero_copy_readable(torch.float32, 64 + 4) and not zero_copy_readable(torch.float32, 66)
    assert zero_copy_readable(torch.int8, 128) and not zero_copy_readable(torch.int8, 130)
    assert not zero_copy_readable(torch.uint8, 64 + 16)


def test_misaligned_int8_weight_is_read_aligned_and_multiplies(tmp_path):
    g = torch.Generator().manual_seed(0)
    w = torch.randint(-100, 100, (4, 64, 32), dtype=torch.int8, generator=g)
    scales = torch.rand(4, 64, generator=g).to(torch.bfloat16) + 0.5
    # bf16 first (wider elements first): 3 bf16 values put the int8 tensor 6 bytes past the data start
    tensors = {"a.scales": scales, "b.odd": torch.ones(3, dtype=torch.bfloat16), "c.qweight": w}
    write_safetensors(tmp_path / "model.safetensors", tensors)
    ckpt = SafetensorsFile(tmp_path / "model.safetensors")
    info = ckpt.info("c.qweight")
    assert info.byte_offset % ONE_BYTE_ALIGN  # the file leaves it misaligned
    got = ckpt.get("c.qweight")
    assert torch.equal(got, w) and got.data_ptr() % ONE_BYTE_ALIGN == 0
    x = torch.randn(5, 32, generator=g).to(torch.bfloat16)
    for e in range(4):
        want = x.float() @ (w[e].float() * scales[e].float()[:, None]).T
        out = torch._weight_int8pack_mm(x, got[e], ckpt.get("a.scales")[e])
        assert torch.allclose(out.float(), want, rtol=2e-2, atol=2e-1)


def test_offload_slots_mirror_the_copied_tensor():
    """A copied tensor starts on a line, so expert e's piece sits at e * expert bytes within it."""
    cpu = torch.device("cpu")
    kw = dict(device=cpu, stored_dtype=torch.int8, dtype=torch.int8)
    assert part_alignment(byte_offset=130 + 3 * 96, tensor_offset=130, **kw) == (3 * 96) % 64
    assert part_alignment(byte_offset=128 + 3 * 96, tensor_offset=128, **kw) == (128 + 3 * 96) % 64
    assert part_alignment(device=cpu, stored_dtype=torch.float32, dtype=torch.float32, byte_offset=68, tensor_offset=68) == 1

