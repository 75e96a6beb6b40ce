"""NIC shaping without the kernel: IFB names, units, and the htb class a Bandwidth becomes."""

from __future__ import annotations

import pytest

from thinvisor.errors import InvalidArgument
from thinvisor.model.vm import Bandwidth
from thinvisor.network import shaping
from thinvisor.network.shaping import ifb_name

# Rates a user might type, kbit/s: the model's bounds, round numbers and odd ones.
RATES = [8, 9, 56, 64, 100, 1000, 1024, 3584, 12_345, 100_000, 1_000_000, 2_500_000]
RATES += [10_000_000, 25_000_000, 40_000_000, 64_000_000, 99_999_999, 100_000_000]
BURSTS = [1, 2, 3, 8, 63, 64, 100, 128, 1000, 1024, 4096, 65_536, 1_048_576]


def test_ifb_name() -> None:
    assert ifb_name("tv0123456789ab") == "tvf0123456789ab"
    assert ifb_name("tvx") == "tvfx"
    assert len(ifb_name("tv" + "f" * 12)) == 15


@pytest.mark.parametrize("tap", ["", "tv", "eth0", "tv0123456789abc", "tv01/3", "TV0123"])
def test_ifb_name_refuses_what_is_no_tap_name(tap: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        ifb_name(tap)
    assert info.value.field == "tap"


def test_stale_ifb_maps_back_to_its_tap() -> None:
    assert shaping._tap_of(ifb_name("tv0123456789ab")) == "tv0123456789ab"


def test_units() -> None:
    assert shaping._rate(1000) == 125_000  # 1 Mbit/s in bytes/s
    assert shaping._kbps(125_000) == 1000
    assert shaping._kbps(12_500_000_000) == 100_000_000
    assert shaping._kbps(1_062) == 8  # someone else's rate: the nearest kbit/s
    # 64 KiB at 1 Mbit/s take 524288 us, 8192000 ticks of 64 ns: what tc computes too.
    assert shaping._ticks(65_536, 125_000) == 8_192_000
    assert shaping._kib(8_192_000, 125_000) == 64


def test_class_for_average_peak_and_burst() -> None:
    cls = shaping._htb_class(Bandwidth(average_kbps=1000, peak_kbps=2000, burst_kib=64))
    assert (cls.rate, cls.ceil, cls.buffer) == (125_000, 250_000, 8_192_000)
    # With a peak, the ceil bucket stays small: the burst leaves no faster than the peak.
    assert cls.cbuffer == shaping._ticks(shaping._default_burst(250_000), 250_000)
    assert cls.cbuffer < cls.buffer // 10


def test_class_for_average_and_burst() -> None:
    # Without a peak both buckets are as large: a plain token bucket.
    cls = shaping._htb_class(Bandwidth(average_kbps=1000, burst_kib=64))
    assert (cls.rate, cls.ceil, cls.buffer, cls.cbuffer) == (125_000, 125_000, 8_192_000, 8_192_000)


def test_default_burst() -> None:
    # 1 ms of traffic and an MTU (tc's rule), set half a KiB off the whole KiB.
    assert shaping._default_burst(125_000) == 1536
    assert shaping._default_burst(125_000_000) == 126_464  # 1 Gbit/s: 123.5 KiB
    for kbps in RATES:
        assert shaping._default_burst(shaping._rate(kbps)) % 1024 == 512
    cls = shaping._htb_class(Bandwidth(average_kbps=1000))
    assert cls.buffer == cls.cbuffer == shaping._ticks(1536, 125_000)


@pytest.mark.parametrize("kbps", RATES)
def test_every_typed_value_reads_back(kbps: int) -> None:
    limit = min(shaping._max_burst_kib(shaping._rate(kbps)), 1_048_576)  # kernel, model
    peaks = [None, min(2 * kbps, 100_000_000), 100_000_000]
    bursts = [None, *(b for b in BURSTS if b <= limit), limit]
    for peak in peaks:
        for burst in bursts:
            bw = Bandwidth(average_kbps=kbps, peak_kbps=peak, burst_kib=burst)
            expected = bw if peak != kbps else bw.model_copy(update={"peak_kbps": None})
            assert shaping._bandwidth_of(shaping._htb_class(bw)) == expected


def test_peak_equal_to_average_reads_back_as_none() -> None:
    bw = Bandwidth(average_kbps=1000, peak_kbps=1000, burst_kib=64)
    assert shaping._bandwidth_of(shaping._htb_class(bw)) == Bandwidth(
        average_kbps=1000, burst_kib=64
    )


def test_largest_bucket() -> None:
    # htb keeps a bucket as u32 ticks of 64 ns: about 274.9 s of traffic.
    assert shaping._max_burst_kib(shaping._rate(8)) == 268
    assert shaping._max_burst_kib(shaping._rate(1000)) == 33_554
    shaping._check_bandwidth("shaping.inbound", Bandwidth(average_kbps=8, burst_kib=268))
    with pytest.raises(InvalidArgument) as info:
        shaping._check_bandwidth("shaping.outbound", Bandwidth(average_kbps=8, burst_kib=269))
    assert info.value.field == "shaping.outbound.burst_kib"
    assert "at most 268 KiB" in info.value.reason
    cls = shaping._htb_class(Bandwidth(average_kbps=8, burst_kib=268))
    assert cls.buffer <= 2**32 - 1
