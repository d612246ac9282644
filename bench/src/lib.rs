//! `bench`: benchmarks against real baselines in the same run (placeholder).
//!
//! It will hold `am-bench` (Active Messages round trips, bandwidth and message rate) and
//! `fs-bench`, reporting HdrHistogram percentiles as JSON and Markdown. Nothing here yet.
