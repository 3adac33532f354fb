//! Weighted round robin as a precomputed, interleaved schedule walked by an atomic cursor, so
//! picking stays lock-free. Over one pass of the schedule each endpoint appears exactly as
//! often as its weight (divided by the weights' common divisor); the `k`-th appearance of an
//! endpoint of weight `w` is placed at `(2k+1)/(2w)` of the pass, spreading each endpoint
//! evenly instead of sending it a burst.
//!
//! Schedules are capped at [`MAX_SCHEDULE`] entries: larger weight sums are scaled down
//! proportionally (each weight stays at least 1), which keeps proportions to within rounding.

use std::cmp::Ordering;

/// Longest schedule.
pub(crate) const MAX_SCHEDULE: u64 = 1 << 16;

/// Builds the schedule for `weights` (all at least 1): indices into `weights`.
pub(crate) fn schedule(weights: &[u32]) -> Vec<u32> {
    let divisor = weights.iter().copied().fold(0, gcd).max(1);
    let mut w: Vec<u64> = weights.iter().map(|&x| u64::from(x / divisor)).collect();
    let total: u64 = w.iter().sum();
    if total > MAX_SCHEDULE {
        for x in &mut w {
            *x = (*x * MAX_SCHEDULE / total).max(1);
        }
    }
    let mut slots: Vec<(u64, u64, u32)> = Vec::with_capacity(w.iter().sum::<u64>() as usize);
    for (i, &weight) in w.iter().enumerate() {
        for k in 0..weight {
            slots.push((2 * k + 1, 2 * weight, i as u32));
        }
    }
    // Order by position (a/b) and then by index, comparing fractions exactly.
    slots.sort_unstable_by(|x, y| match (x.0 * y.1).cmp(&(y.0 * x.1)) {
        Ordering::Equal => x.2.cmp(&y.2),
        other => other,
    });
    slots.into_iter().map(|(_, _, i)| i).collect()
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_follow_weights_and_interleave() {
        let s = schedule(&[3, 1, 2]);
        assert_eq!(s.len(), 6);
        for (i, want) in [3, 1, 2].into_iter().enumerate() {
            assert_eq!(s.iter().filter(|&&x| x == i as u32).count(), want);
        }
        // No endpoint of weight 3 of 6 gets two slots in a row.
        assert!(s.windows(2).all(|p| !(p[0] == 0 && p[1] == 0)));
    }

    #[test]
    fn common_divisor_is_removed() {
        assert_eq!(schedule(&[100, 200]).len(), 3);
    }

    #[test]
    #[cfg_attr(miri, ignore = "builds 65,536-entry schedules: minutes under Miri")]
    fn large_sums_are_capped_and_keep_every_endpoint() {
        let weights = vec![65_535u32; 40];
        let s = schedule(&weights);
        assert!(s.len() as u64 <= MAX_SCHEDULE);
        let mut w = vec![65_535u32; 3];
        w.push(1);
        let s = schedule(&w);
        assert!(
            s.contains(&3),
            "a weight-1 endpoint keeps a slot after scaling"
        );
    }
}
