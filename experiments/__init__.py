"""Paper-claim experiments (docs/science.md), run from a checkout: python -m experiments.<name>.

Throughput and memory tables live in bench/; both use the package's public functions only.
"""
