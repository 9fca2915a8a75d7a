"""Fault injection for the persistence tests lives in tests/agent/conftest.py
(`FaultyDisk`, the `faulty_disk` fixture): the daemon tests use it too."""
