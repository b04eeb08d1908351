"""The C extension's weight scan (stun_exp/analysis/_scan.c) against naive numpy computations."""
import shutil
import sysconfig

import numpy as np
import pytest
import torch

from stun_exp.analysis import weight_report as wr
from stun_exp.models.adapter import get_adapter
from tests.tiny_models import tiny_model

needs_native = pytest.mark.skipif(wr.native is None, reason="stun-exp was installed without its C extension")

BLOCK = 2048       # _scan.c's block: eight float32 lanes are added into float64 at its end


def _scan(x: torch.Tensor, chunk: int, bits: bool = True):
    n = x.numel()
    sums, zeros = np.full((-(-n // chunk), 4), np.nan), np.full(-(-n // chunk), -1, dtype=np.int64)
    out = np.zeros(-(-n // 8), dtype=np.uint8) if bits else None
    src = x.numpy() if x.dtype == torch.float32 else x.view(torch.int16).numpy()
    wr.native.scan(src, wr._NATIVE_KINDS[x.dtype], chunk, sums, zeros, out)
    return sums, zeros, out


def _lane_order_sums(x: np.ndarray) -> list[float]:
    """S1..S4 of one block in _scan.c's documented order: eight float32 lanes (entry i in lane
    i % 8), each summed in sequence; lanes added into float64 in lane order; then the entries past
    the last full group of eight, summed in float32 and added."""
    full = len(x) - len(x) % 8
    lanes, tail = x[:full].reshape(-1, 8), x[full:]
    out = []
    for p in range(1, 5):
        powers = [lanes ** 1, lanes * lanes, (lanes * lanes) * lanes, (lanes * lanes) * (lanes * lanes)][p - 1]
        per_lane = np.cumsum(powers, axis=0, dtype=np.float32)[-1] if full else np.zeros(8, np.float32)
        acc = 0.0
        for v in per_lane:
            acc += float(v)
        t = np.float32(0)
        for v in tail:
            t = np.float32(t + [v, v * v, (v * v) * v, (v * v) * (v * v)][p - 1])
        out.append(acc + float(t))
    return out


@needs_native
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 2047, 2048, 2049, 6000 + 3])
@pytest.mark.parametrize("chunk", [8, 16, 2048, 4096, 1 << 18])
def test_sums_counts_and_bits_equal_a_naive_computation(n, chunk):
    g = torch.Generator().manual_seed(n + chunk)
    x = torch.randn(n, generator=g) * 0.02 + 0.001
    x[torch.rand(n, generator=g) < 0.4] = 0.0
    x[:3:2] = -0.0                  # a negative zero counts as a zero (x == 0), as numpy counts it
    sums, zeros, bits = _scan(x, chunk)
    assert np.array_equal(bits, np.packbits(x.numpy() == 0))
    for c in range(len(zeros)):
        part = x[c * chunk:(c + 1) * chunk].double()
        assert zeros[c] == int((part == 0).sum())
        for p in range(1, 5):      # float32 rounding, bounded by the sum of |x|^p (odd sums cancel)
            assert abs(sums[c][p - 1] - float((part ** p).sum())) <= 1e-6 * float((part.abs() ** p).sum())


@needs_native
@pytest.mark.parametrize("n", [5, 2048 + 13, 3 * BLOCK])
def test_the_summation_order_is_the_documented_one(n):
    """Bit-for-bit equal to a numpy emulation of the lane order: no reassociation and no fused
    multiply-add by the compiler, so every machine gets the same sums."""
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g) * 3 + 1
    sums, _, _ = _scan(x, chunk=1 << 18, bits=False)
    expected = [0.0] * 4
    for b in range(0, n, BLOCK):
        expected = [e + s for e, s in zip(expected, _lane_order_sums(x.numpy()[b:b + BLOCK]))]
    assert sums[0].tolist() == expected


@needs_native
def test_bfloat16_is_read_as_its_float32_values():
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(5000 + 5, generator=g) * 0.02).to(torch.bfloat16)
    x[::7] = 0
    sums, zeros, bits = _scan(x, chunk=1024)
    wide, _, wide_bits = _scan(x.float(), chunk=1024)
    assert np.array_equal(sums, wide) and np.array_equal(bits, wide_bits)
    assert zeros.sum() == int((x == 0).sum())


@needs_native
def test_bad_arguments_are_refused():
    x = np.zeros(64, dtype=np.float32)
    sums, zeros, bits = np.empty((8, 4)), np.empty(8, dtype=np.int64), np.empty(8, dtype=np.uint8)
    with pytest.raises(ValueError, match="multiple of 8"):
        wr.native.scan(x, 0, 12, sums, zeros, bits)
    with pytest.raises(ValueError, match="kind"):
        wr.native.scan(x, 2, 8, sums, zeros, bits)
    with pytest.raises(ValueError, match="too small"):
        wr.native.scan(x, 0, 8, sums[:7], zeros, bits)
    with pytest.raises(ValueError, match="too small"):
        wr.native.scan(x, 0, 8, sums, zeros, bits[:7])


@needs_native
def test_the_engine_of_each_weight():
    assert wr.engine(torch.zeros(4)) == wr.engine(torch.zeros(4, dtype=torch.bfloat16)) == "native"
    assert wr.engine(torch.zeros(4, dtype=torch.float16)) == wr.engine(torch.zeros(4, dtype=torch.float64)) == "torch"
    assert wr.engines([torch.zeros(4), torch.zeros(4, dtype=torch.float16)]) == "native+torch"


@needs_native
def test_a_bfloat16_model_reads_the_same_with_both_engines(monkeypatch):
    model = tiny_model("mixtral").to(torch.bfloat16)
    ad = get_adapter(model)
    with torch.no_grad():
        for l in range(len(ad.layers)):
            for t in ad.linear_targets(l):
                t.weight[t.weight.abs() < t.weight.abs().median()] = 0
    native = wr.weight_report(model, ad, nonzero_only=True)
    monkeypatch.setattr(wr, "native", None)
    other = wr.weight_report(model, ad, nonzero_only=True)
    assert (native["kurtosis"]["sums"], other["kurtosis"]["sums"]) == ("native", "torch")
    assert native["census"] == other["census"] and native["mask_digest"] == other["mask_digest"]
    for a, b in zip(native["kurtosis"]["per_matrix"], other["kurtosis"]["per_matrix"]):
        assert a["n"] == b["n"] and a["kurtosis"] == pytest.approx(b["kurtosis"], rel=1e-5)


def test_the_extension_is_built_where_a_c_compiler_is():
    """An install with a C compiler builds the extension (a broken build would otherwise only show
    as a slower analysis)."""
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(cc) is None:
        pytest.skip(f"no C compiler ({cc}) on this machine")
    assert wr.native is not None


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [5, 8, 2049, 70001])
def test_the_simd_path_this_cpu_gets_equals_the_portable_one_bit_for_bit(dtype, n):
    """The AVX2 path and the SSE2 / plain C path: the same sums, counts and bits."""
    assert wr.native.simd in ("avx2", "portable")
    if wr.native.simd != "avx2":
        pytest.skip("this CPU has no AVX2: the portable path is the only one")
    g = torch.Generator().manual_seed(n)
    x = (torch.randn(n, generator=g) * torch.logspace(-8, 8, n)).to(dtype)
    x[torch.rand(n, generator=g) < 0.3] = 0.0
    x[1::97] = -0.0
    x[2::389] = float("nan")
    x[3::1009] = float("inf")
    src = x.numpy() if dtype == torch.float32 else x.view(torch.int16).numpy()
    out = {}
    for portable in (False, True):
        sums, zeros = np.zeros((-(-n // 4096), 4)), np.zeros(-(-n // 4096), dtype=np.int64)
        bits = np.zeros(-(-n // 8), dtype=np.uint8)
        wr.native.scan(src, wr._NATIVE_KINDS[dtype], 4096, sums, zeros, bits, portable)
        out[portable] = (sums.view(np.int64).copy(), zeros, bits)    # compare bits, NaN included
    for a, b in zip(out[False], out[True]):
        assert np.array_equal(a, b)
