//! Medians, spreads and table rows.

use std::time::Duration;

pub fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub fn median(samples: &[Duration]) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort();
    sorted[sorted.len() / 2]
}

pub fn summary(samples: &[Duration]) -> String {
    let min = samples.iter().min().copied().unwrap_or_default();
    let max = samples.iter().max().copied().unwrap_or_default();
    format!(
        "{:.0} ms ({:.0}–{:.0})",
        millis(median(samples)),
        millis(min),
        millis(max)
    )
}

pub fn row(name: &str, ours: &[Duration], plain: &[Duration]) {
    let ratio = median(ours).as_secs_f64() / median(plain).as_secs_f64();
    println!(
        "| {name} | {} | {} | {ratio:.2}× |",
        summary(ours),
        summary(plain)
    );
}

/// The `p`-th percentile (0-100) of `samples`, nearest rank.
pub fn percentile(samples: &[Duration], p: usize) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort();
    let rank = (p * sorted.len()).div_ceil(100).clamp(1, sorted.len());
    sorted[rank - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_nearest_rank_percentiles() {
        let samples: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();

        assert_eq!(percentile(&samples, 50), Duration::from_millis(50));
        assert_eq!(percentile(&samples, 99), Duration::from_millis(99));
        assert_eq!(median(&samples), Duration::from_millis(51));
    }
}
