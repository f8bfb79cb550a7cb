//! `sluice bench`: runs the benchmark matrix and writes raw samples, a table and plots.
