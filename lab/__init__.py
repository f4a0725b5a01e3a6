"""The Bobry lab: build a three-host cluster, break it on purpose and report what happened.

Backends (embedded network namespaces, Vagrant VMs) differ only in how a command reaches a host;
everything else (faults, status, experiments) is written once against the Backend interface.
"""
