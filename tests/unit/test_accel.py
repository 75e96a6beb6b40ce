"""The accelerator choice: decision logic with injected probes, and the real probe here."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from thinvisor.errors import InvalidArgument
from thinvisor.host.engine import accel
from thinvisor.host.engine.accel import AccelChoice, choose_accel


def works() -> str | None:
    return None


def broken() -> str | None:
    return "kvm: /dev/kvm is missing"


def never() -> str | None:
    raise AssertionError("the probe must not run for tcg")


def test_tcg_is_configured_without_probing() -> None:
    assert choose_accel("tcg", probe=never) == AccelChoice("tcg", "configured")


def test_auto_picks_kvm_when_the_probe_passes() -> None:
    choice = choose_accel("auto", probe=works)
    assert choice.name == "kvm"
    assert "test guest" in choice.reason


def test_auto_falls_back_to_tcg_with_the_failure() -> None:
    assert choose_accel("auto", probe=broken) == AccelChoice("tcg", "kvm: /dev/kvm is missing")


def test_kvm_configured_and_working() -> None:
    assert choose_accel("kvm", probe=works).name == "kvm"


def test_kvm_configured_but_broken_is_invalid_argument() -> None:
    with pytest.raises(InvalidArgument) as info:
        choose_accel("kvm", probe=broken)
    assert info.value.field == "accel"
    assert info.value.reason == "kvm: /dev/kvm is missing"


def test_choice_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="thinvisor.host.engine.accel"):
        choose_accel("auto", probe=broken)
    assert "accelerator tcg (kvm: /dev/kvm is missing)" in caplog.text


def test_choice_is_frozen() -> None:
    choice = AccelChoice("tcg", "configured")
    with pytest.raises(AttributeError):
        choice.name = "kvm"  # type: ignore[misc]


def test_missing_device(tmp_path: Path) -> None:
    assert accel.probe_kvm_here(tmp_path / "kvm") == f"{tmp_path / 'kvm'} is missing"


def test_device_that_is_not_kvm() -> None:
    failure = accel.probe_kvm_here(Path("/dev/null"))
    assert failure is not None
    assert "does not answer KVM_GET_API_VERSION" in failure


def test_hints_name_pvm_and_missing_cpu_flags(tmp_path: Path) -> None:
    (tmp_path / "kvm_pvm").mkdir()
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 hypervisor\n")
    assert accel._hints(tmp_path, cpuinfo) == [
        "nested PVM backend? kvm_pvm is loaded",
        "/proc/cpuinfo has no vmx or svm flag",
    ]


def test_no_hints_on_a_plain_vmx_host(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("flags\t\t: fpu vmx sse2\n")
    assert accel._hints(tmp_path, cpuinfo) == []


def test_a_hung_probe_is_bounded() -> None:
    failure = accel._probe_in_child(timeout_s=0.001)
    assert failure == "the test guest did not finish within 0.001 s"


def test_guest_code_ends_with_out_and_hlt() -> None:
    # mov al, 0x42; out 0x10, al; hlt
    assert accel._GUEST_CODE.endswith(bytes([0xB0, 0x42, 0xE6, 0x10, 0xF4]))


_KVM_UNUSABLE_HERE = Path("/sys/module/kvm_pvm").exists() or not Path("/dev/kvm").exists()


@pytest.mark.skipif(not _KVM_UNUSABLE_HERE, reason="a host whose KVM may work")
def test_real_probe_chooses_tcg_here() -> None:
    choice = choose_accel("auto")
    assert choice.name == "tcg"
    assert choice.reason.startswith("kvm: ")
    if Path("/sys/module/kvm_pvm").exists():
        assert "kvm_pvm is loaded" in choice.reason
    with pytest.raises(InvalidArgument, match=r"^accel: kvm: "):
        choose_accel("kvm")


def test_real_probe_runs_once_per_process() -> None:
    first = choose_accel("auto")
    hits = accel.probe_kvm.cache_info().hits
    assert choose_accel("auto") == first
    assert accel.probe_kvm.cache_info().hits == hits + 1
