"""The fault-injection suite (issue 11): faults x moments x storages, disks, study files,
and a kill -9 loop. A package, so that its conftest does not shadow tests/conftest.py."""
