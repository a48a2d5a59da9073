"""Small models and helpers for tests, the demo and the benchmarks; never imported by the probe."""
