"""Deterministic simulation of the three Bobry agents: the real Agent, DbAgent and ArbiterAgent
code of agent.py, in one process, on a seeded single-threaded scheduler, against an in-memory
world (network, PostgreSQL, the kernel's fence, disks, clocks, clients). See README.md,
"Simulation and chaos", and `python -m tests.sim --help`."""
