"""The gemu GPU's published hardware interface: the only part of gemu.device a driver imports.

- :mod:`.enums`: interrupt sources, CP states and errors, opcodes, MMU commands and faults;
- :mod:`.regs`: the register map, declared as data;
- :mod:`.pte`: the page-table entry format and the walk;
- :mod:`.packets`: command-stream packets (construct), builders and a disassembler;
- :mod:`.protocol`: the wire protocol between a machine and the device model (construct);
- :mod:`.link`: transport specs and connections (UNIX, loopback TCP, serial) for the client;
- :mod:`.client`: the client side of that protocol (register access, IRQs, guest memory).

``docs/hardware.md`` is rendered from these declarations by :mod:`.docgen`.
"""
