"""The center: one inventory and one API over many hosts, from several vendors."""
