"""The studies: what the notebooks compute, kept here so they stay short and the logic is tested.

    common                   the config, policies, episodes, recorded runs, tables and figures every study shares
    mechanism_equivalence    H0-H4 of the design
    cache_behaviour          reuse, savings and drift per method
    long_horizon_stability   drift over long episodes, parameter sweeps, where drift jumps
    libero_benchmark         closed-loop LIBERO success per method (BenchmarkConfig, evaluate, success_table)
    stability_cliff          pi0 / pi0.5 K/V reuse across inferences per mode, gate and threshold
    cliff_success            its closed-loop trials, success table and hypotheses (success_trials, success_table)
    speed                    the timing units (every run interleaved per frame) behind every speed column
    summary                  what `dcvla studies` prints: the tables, and how their speed was measured
"""
