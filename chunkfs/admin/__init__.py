"""The operator's tools over a running cluster: ``stats`` (status, file
info), ``gc``, ``fsck`` and ``replicas`` (repair, rebalance, drain).
"""
