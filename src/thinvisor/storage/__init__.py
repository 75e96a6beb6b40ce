"""Storage: datastores and disk images (through qemu-img)."""
