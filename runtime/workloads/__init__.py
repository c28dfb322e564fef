"""Workloads: code that runs as (or inside) a job, not a way of running one.

`serve` is the serve supervisor the agent starts as a serve run's job; `federate` is the FedAvg library federated
jobs import. Both import only the contract (or nothing): they run with the job's privileges, beside its code.
"""
