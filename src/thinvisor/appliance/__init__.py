"""The quick-start appliance: a tiny Linux guest built from Debian packages.

Debian's cloud kernel boots a busybox initramfs that thinvisor writes itself. The guest
prints ``THINVISOR-APPLIANCE-READY uptime=<s>`` on ttyS0 when it is up, offers a shell
there, takes a DHCP lease on eth0 and powers off cleanly on the ACPI power button
(printing ``THINVISOR-APPLIANCE-POWEROFF`` first).
"""

from thinvisor.appliance._build import build_appliance, find_appliance
from thinvisor.appliance._cache import Appliance

__all__ = ["Appliance", "build_appliance", "find_appliance"]
