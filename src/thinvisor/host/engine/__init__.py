"""The engine: QEMU command lines, processes and QMP. Knows QEMU, nothing about HTTP."""
