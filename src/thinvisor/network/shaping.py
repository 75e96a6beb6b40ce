"""Traffic shaping of VM NICs with tc over netlink (pyroute2): NicShaping as the kernel sees it.

Traffic *to* the guest leaves the host through the TAP's egress: an htb root qdisc ``1:``
whose default class ``1:1`` carries the limit, as libvirt does. Traffic *from* the guest
arrives on the TAP's ingress, where nothing can be queued. Kernels without act_police
cannot police it there, so the ingress qdisc redirects every packet (u32 match-all, mirred)
to an IFB device, ``ifb_name(tap)``, whose egress carries the same htb shaping. That one
way is used on every kernel.

A ``Bandwidth`` becomes one htb class: the average is its rate, the peak its ceil, the
burst the size of its rate bucket. A lone htb class sends only while both of its buckets
hold tokens, so:

- with a peak, the ceil bucket is kept small (``_default_burst`` of the peak): a burst of
  ``burst_kib`` above the average leaves at the peak rate, no faster;
- without one, the ceil bucket is as large as the rate bucket: ``burst_kib`` leaves at
  wire speed, then the average holds (a plain token bucket).

Reading back is exact for every value the model allows: rates are whole bytes per second
(1 kbit/s = 125 B/s) and the kernel keeps bucket sizes as time in 64 ns ticks, less than a
KiB of traffic even at 100 Gbit/s. Without a burst the bucket gets a default that no whole
number of KiB equals, which reads back as None. Two cases read back otherwise, shaping
the same: a peak equal to the average reads back as None, and above 64 Gbit/s a burst
within 512 bytes of the default reads back as None.

Every function opens its own netlink socket in the calling process's network namespace;
``NetlinkError`` becomes a thinvisor error. A call that fails clears the TAP's shaping and
deletes its IFB, so that no half-built shaping remains.
"""

from __future__ import annotations

from contextlib import suppress
from dataclasses import dataclass
from socket import htons
from typing import Any

from pydantic import ValidationError
from pyroute2.netlink import NLM_F_ACK, NLM_F_CREATE, NLM_F_REPLACE, NLM_F_REQUEST
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import RTM_NEWTCLASS, TC_H_INGRESS, TC_H_ROOT
from pyroute2.netlink.rtnl.tcmsg import tcmsg

from thinvisor.errors import AlreadyExists, BackendError, InvalidArgument, NotFound
from thinvisor.model.vm import Bandwidth, NicShaping
from thinvisor.network.model import IFNAMSIZ, check_ifname
from thinvisor.network.netlink import TAP_PREFIX, _kind, _link, _netlink

IFB_PREFIX = "tvf"  # "tvf" + the TAP's 12 hex characters: 15, IFNAMSIZ exactly
_IFB_TXQLEN = 1000  # an IFB's own default (32) would make a short queue under htb

_HTB_ROOT = 0x10000  # 1:
_HTB_CLASS = 0x10001  # 1:1, also the default class (minor 1)
_INGRESS = 0xFFFF0000  # ffff:
_ETH_P_ALL = 0x0003
_MIRRED_EGRESS_REDIRECT = 1  # tc_mirred.h TCA_EGRESS_REDIR

_BYTES_PER_S_PER_KBPS = 125  # 1000 bits / 8
_TICKS_PER_S = 15_625_000  # the kernel's psched tick is 64 ns (PSCHED_SHIFT = 6)
_TICKS_MAX = (1 << 32) - 1  # htb keeps a bucket's size as u32 ticks: about 274 s
_DEFAULT_MTU = 1600  # tc's and pyroute2's mtu for a bucket size nobody gave
_RATE32_MAX = (1 << 32) - 1  # above this the rate travels in TCA_HTB_RATE64


@dataclass(frozen=True)
class _HtbClass:
    """One htb class as the kernel keeps it: rates in bytes/s, bucket sizes in ticks."""

    rate: int
    ceil: int
    buffer: int
    cbuffer: int


# -- pure: names and units --------------------------------------------------------------


def ifb_name(tap: str) -> str:
    """The IFB device that shapes the traffic a TAP receives from its guest."""
    rest = IFNAMSIZ - len(IFB_PREFIX)
    if not tap.startswith(TAP_PREFIX) or not 0 < len(tap) - len(TAP_PREFIX) <= rest:
        reason = f"not a TAP name: {TAP_PREFIX!r} and 1 to {rest} more characters"
        raise InvalidArgument("tap", reason)
    try:
        return check_ifname(IFB_PREFIX + tap[len(TAP_PREFIX) :])
    except ValueError as exc:
        raise InvalidArgument("tap", str(exc)) from None


def _tap_of(ifb: str) -> str:
    return TAP_PREFIX + ifb[len(IFB_PREFIX) :]


def _rate(kbps: int) -> int:
    return kbps * _BYTES_PER_S_PER_KBPS


def _kbps(rate: int) -> int:
    return (rate + _BYTES_PER_S_PER_KBPS // 2) // _BYTES_PER_S_PER_KBPS


def _ticks(size: int, rate: int) -> int:
    """The time ``size`` bytes take at ``rate`` bytes/s, in ticks, rounded down."""
    return size * _TICKS_PER_S // rate


def _kib(ticks: int, rate: int) -> int:
    # ticks were rounded down by less than one, so the bytes lie just below a whole KiB:
    # round up. Exact while one tick carries under a KiB, i.e. below 128 Gbit/s.
    return -(-ticks * rate // (_TICKS_PER_S * 1024))


def _default_burst(rate: int) -> int:
    """A bucket size for when none is given: tc's rule (1 ms of traffic and an MTU).

    Put half a KiB off every whole KiB, so that reading back tells it from any burst that
    was given in KiB: one tick apart at least, up to 64 Gbit/s.
    """
    return (rate // 1000 + _DEFAULT_MTU) // 1024 * 1024 + 512


def _max_burst_kib(rate: int) -> int:
    return _TICKS_MAX * rate // (_TICKS_PER_S * 1024)


def _check_bandwidth(field: str, bw: Bandwidth) -> None:
    """Refuse a burst larger than the kernel can hold at this rate (about 274 s of it)."""
    if bw.burst_kib is None:
        return
    limit = _max_burst_kib(_rate(bw.average_kbps))
    if bw.burst_kib > limit:
        reason = f"at most {limit} KiB at {bw.average_kbps} kbit/s"
        raise InvalidArgument(f"{field}.burst_kib", reason)


def _htb_class(bw: Bandwidth) -> _HtbClass:
    """The htb class that carries ``bw`` (see the module docstring for the mapping)."""
    rate = _rate(bw.average_kbps)
    ceil = _rate(bw.peak_kbps) if bw.peak_kbps is not None else rate
    burst = bw.burst_kib * 1024 if bw.burst_kib is not None else _default_burst(rate)
    buffer = _ticks(burst, rate)
    cbuffer = _ticks(_default_burst(ceil), ceil) if bw.peak_kbps is not None else buffer
    return _HtbClass(rate=rate, ceil=ceil, buffer=buffer, cbuffer=cbuffer)


def _bandwidth_of(cls: _HtbClass) -> Bandwidth:
    """The ``Bandwidth`` an htb class carries; the inverse of ``_htb_class``."""
    peak = _kbps(cls.ceil) if cls.ceil != cls.rate else None
    default = cls.buffer == _ticks(_default_burst(cls.rate), cls.rate)
    burst = None if default else max(1, _kib(cls.buffer, cls.rate))
    return Bandwidth(average_kbps=_kbps(cls.rate), peak_kbps=peak, burst_kib=burst)


# -- the kernel -----------------------------------------------------------------------


def apply_shaping(tap: str, shaping: NicShaping | None) -> None:
    """Make the TAP's traffic shaping exactly ``shaping``, replacing what is there.

    None, or a ``NicShaping`` with neither direction, removes all shaping and the IFB; so
    does any shaping on a TAP that no longer exists. Idempotent. On any failure the TAP's
    shaping is cleared and its IFB deleted before the error is raised.
    """
    inbound = shaping.inbound if shaping is not None else None
    outbound = shaping.outbound if shaping is not None else None
    for field, bw in (("inbound", inbound), ("outbound", outbound)):
        if bw is not None:
            _check_bandwidth(f"shaping.{field}", bw)
    ifb = ifb_name(tap)
    with _netlink(f"shaping of {tap!r}") as ip:
        link = _tap_link(ip, tap, required=inbound is not None or outbound is not None)
        if link is None:
            _remove_ifb(ip, ifb)
            return
        index = int(link["index"])
        try:
            _shape_egress(ip, index, inbound)
            _shape_ingress(ip, index, ifb, outbound, int(link.get("mtu")))
        except BaseException:
            _clear_quietly(ip, index, ifb)
            raise


def _tap_link(ip: Any, tap: str, required: bool) -> Any:
    """The TAP's link message, None when it is missing and not ``required``."""
    link = _link(ip, tap)
    if link is None:
        if required:
            raise NotFound(f"interface {tap!r} not found")
        return None
    if _kind(link) != "tun":
        raise InvalidArgument("tap", f"{tap!r} is not a TAP device")
    return link


def _shape_egress(ip: Any, index: int, bw: Bandwidth | None) -> None:
    if bw is None:
        _clear_root(ip, index)
    else:
        _put_htb(ip, index, _htb_class(bw))


def _shape_ingress(ip: Any, index: int, ifb: str, bw: Bandwidth | None, mtu: int) -> None:
    if bw is None:
        _clear_ingress(ip, index)
        _remove_ifb(ip, ifb)
        return
    ifb_index = _ensure_ifb(ip, ifb, mtu)
    _put_htb(ip, ifb_index, _htb_class(bw))
    if _redirect_target(ip, index) != ifb_index:
        _clear_ingress(ip, index)
        _redirect(ip, index, ifb_index)


def _qdisc(ip: Any, index: int, parent: int) -> Any | None:
    """The qdisc attached at ``parent`` (root or ingress); None for the kernel's default."""
    for qdisc in ip.get_qdiscs(index):
        if qdisc["parent"] == parent and qdisc["handle"] != 0:
            return qdisc
    return None


def _is_our_htb(qdisc: Any | None) -> bool:
    if qdisc is None or qdisc.get("TCA_KIND") != "htb" or qdisc["handle"] != _HTB_ROOT:
        return False
    init = qdisc.get(("TCA_OPTIONS", "TCA_HTB_INIT"))
    return init is not None and init["defcls"] == _HTB_CLASS & 0xFFFF


def _put_htb(ip: Any, index: int, cls: _HtbClass) -> None:
    if not _is_our_htb(_qdisc(ip, index, TC_H_ROOT)):
        _clear_root(ip, index)
        ip.tc("add", "htb", index, handle=_HTB_ROOT, default=_HTB_CLASS & 0xFFFF)
    _replace_class(ip, index, cls)


def _replace_class(ip: Any, index: int, cls: _HtbClass) -> None:
    """Create or change class 1:1.

    Built by hand: ``ip.tc("replace-class", ...)`` rounds bucket sizes to whole
    microseconds, more than a KiB of traffic above 8 Gbit/s, where the kernel keeps 64 ns.
    """
    parms = {
        "rate": min(cls.rate, _RATE32_MAX),
        "ceil": min(cls.ceil, _RATE32_MAX),
        "buffer": cls.buffer,
        "cbuffer": cls.cbuffer,
        "quantum": min(max(cls.rate // 10, 1000), 200_000),  # the kernel's own choice
        "rate___reserved": 1,  # linklayer: ethernet
        "ceil___reserved": 1,
    }
    attrs: list[list[Any]] = [
        ["TCA_HTB_PARMS", parms],
        ["TCA_HTB_RTAB", True],  # computed from parms by pyroute2
        ["TCA_HTB_CTAB", True],
    ]
    if cls.rate > _RATE32_MAX:
        attrs.append(["TCA_HTB_RATE64", cls.rate])
    if cls.ceil > _RATE32_MAX:
        attrs.append(["TCA_HTB_CEIL64", cls.ceil])
    msg = tcmsg()
    msg["index"] = index
    msg["handle"] = _HTB_CLASS
    msg["parent"] = _HTB_ROOT
    msg["attrs"] = [["TCA_KIND", "htb"], ["TCA_OPTIONS", {"attrs": attrs}]]
    flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE
    request = ip.put(msg, RTM_NEWTCLASS, flags)
    ip.get(msg_seq=request.msg["header"]["sequence_number"])  # the ack; raises NetlinkError


def _clear_root(ip: Any, index: int) -> None:
    if _qdisc(ip, index, TC_H_ROOT) is not None:
        ip.tc("del", index=index, parent=TC_H_ROOT)


def _clear_ingress(ip: Any, index: int) -> None:
    if _qdisc(ip, index, TC_H_INGRESS) is not None:  # ingress, or clsact
        ip.tc("del", index=index, parent=TC_H_INGRESS, handle=_INGRESS)


def _ensure_ifb(ip: Any, name: str, mtu: int) -> int:
    link = _link(ip, name)
    if link is None:
        ip.link("add", ifname=name, kind="ifb", txqlen=_IFB_TXQLEN)
        index = int(ip.link_lookup(ifname=name)[0])
    elif _kind(link) != "ifb":
        raise AlreadyExists(f"interface {name!r} exists and is not an IFB device")
    else:
        index = int(link["index"])
    # The TAP's frames pass through the IFB: it must take frames as large.
    ip.link("set", index=index, mtu=mtu, state="up")
    return index


def _redirect(ip: Any, index: int, ifb_index: int) -> None:
    """Send every frame arriving on the TAP to the IFB's egress (and its htb) first."""
    ip.tc("add", "ingress", index, handle=_INGRESS)
    action = {
        "kind": "mirred",
        "direction": "egress",
        "action": "redirect",
        "ifindex": ifb_index,
    }
    ip.tc(
        "add-filter",
        "u32",
        index,
        parent=_INGRESS,
        protocol=_ETH_P_ALL,
        target=0,
        keys=["0x0/0x0+0"],
        action=action,
    )


def _redirect_target(ip: Any, index: int) -> int | None:
    """The IFB the TAP's ingress redirects all frames to, when that is all it does."""
    qdisc = _qdisc(ip, index, TC_H_INGRESS)
    if qdisc is None or qdisc.get("TCA_KIND") != "ingress":
        return None
    rules = []
    for flt in ip.get_filters(index=index, parent=_INGRESS):
        keys = flt.get(("TCA_OPTIONS", "TCA_U32_SEL", "keys"))
        if flt.get("TCA_KIND") != "u32" or keys is None:
            continue  # u32's hash tables: no rule of their own
        actions = flt.get(("TCA_OPTIONS", "TCA_U32_ACT"))
        parms = [
            act.get(("TCA_ACT_OPTIONS", "TCA_MIRRED_PARMS"))
            for _, act in (actions["attrs"] if actions is not None else [])
        ]
        match_all = all(key["key_mask"] == 0 for key in keys)
        all_protocols = flt["info"] & 0xFFFF == htons(_ETH_P_ALL)
        rules.append((match_all and all_protocols, parms))
    if len(rules) != 1 or not rules[0][0] or len(rules[0][1]) != 1:
        return None
    parms = rules[0][1][0]
    if parms is None or parms["eaction"] != _MIRRED_EGRESS_REDIRECT:
        return None
    return int(parms["ifindex"])


def _clear_quietly(ip: Any, index: int, ifb: str) -> None:
    for step in (_clear_root, _clear_ingress):
        with suppress(NetlinkError):  # best effort while already failing
            step(ip, index)
    with suppress(NetlinkError):
        _remove_ifb(ip, ifb)


def _remove_ifb(ip: Any, name: str) -> None:
    """Delete the IFB; an interface of another kind by that name is not ours: leave it."""
    link = _link(ip, name)
    if link is not None and _kind(link) == "ifb":
        ip.link("del", index=link["index"])


def _delete_ifb(ip: Any, name: str) -> bool:
    link = _link(ip, name)
    if link is None:
        return False
    if _kind(link) != "ifb":
        raise InvalidArgument("ifb", f"{name!r} is not an IFB device")
    ip.link("del", index=link["index"])
    return True


def _read_htb(ip: Any, index: int, dev: str) -> Bandwidth | None:
    if not _is_our_htb(_qdisc(ip, index, TC_H_ROOT)):
        return None
    for msg in ip.get_classes(index):
        if msg["handle"] != _HTB_CLASS or msg.get("TCA_KIND") != "htb":
            continue
        parms = msg.get(("TCA_OPTIONS", "TCA_HTB_PARMS"))
        rate = msg.get(("TCA_OPTIONS", "TCA_HTB_RATE64")) or parms["rate"]
        ceil = msg.get(("TCA_OPTIONS", "TCA_HTB_CEIL64")) or parms["ceil"]
        cls = _HtbClass(int(rate), int(ceil), int(parms["buffer"]), int(parms["cbuffer"]))
        try:
            return _bandwidth_of(cls)
        except ValidationError as exc:  # set by hand, out of the model's range
            reason = f"rate {rate} B/s, ceil {ceil} B/s"
            raise BackendError(f"{dev}: htb class 1:1 is not thinvisor's ({reason})") from exc
    return None


def shaping_of(tap: str) -> NicShaping | None:
    """The TAP's shaping as the kernel holds it; None when it has none.

    Inbound is read from the TAP's htb, outbound from its IFB's, and only while the TAP's
    ingress redirects to that IFB. Values read back as they were applied, but for the
    equivalents the module docstring names (a peak equal to the average reads back as None).
    """
    with _netlink(f"shaping of {tap!r}") as ip:
        link = _tap_link(ip, tap, required=True)
        index = int(link["index"])
        inbound = _read_htb(ip, index, tap)
        outbound = None
        ifb = _link(ip, ifb_name(tap))
        if ifb is not None and _redirect_target(ip, index) == ifb["index"]:
            outbound = _read_htb(ip, int(ifb["index"]), ifb_name(tap))
        if inbound is None and outbound is None:
            return None
        return NicShaping(inbound=inbound, outbound=outbound)


def stale_ifbs(taps: set[str]) -> list[str]:
    """The IFB devices (``tvf...``) whose TAP is not among ``taps``, sorted.

    ``taps`` are the TAPs that should exist; an IFB left behind by a crash or by a TAP
    deleted without ``apply_shaping(tap, None)`` is stale.
    """
    with _netlink("list IFB devices") as ip:
        return sorted(
            name
            for link in ip.get_links()
            if _kind(link) == "ifb"
            and (name := str(link.get("ifname"))).startswith(IFB_PREFIX)
            and _tap_of(name) not in taps
        )


def delete_ifb(name: str) -> bool:
    """Remove an IFB device; False when there is none. Refuses other kinds of interface."""
    with _netlink(f"delete IFB {name!r}") as ip:
        return _delete_ifb(ip, name)
