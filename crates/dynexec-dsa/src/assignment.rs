//! Exact minimum-cost assignment (Hungarian algorithm with potentials, O(n³)), for matching
//! two eigenvalue sets in the Wasserstein score.

/// For a row-major `n × n` cost matrix, returns `assignment[row] = column` of a minimum-cost
/// perfect matching and its total cost.
pub fn min_cost_assignment(cost: &[f64], n: usize) -> (Vec<usize>, f64) {
    assert_eq!(cost.len(), n * n, "cost matrix must be n × n");
    if n == 0 {
        return (Vec::new(), 0.0);
    }
    // 1-based arrays with a sentinel column 0, as in the classical formulation.
    let mut u = vec![0.0; n + 1];
    let mut v = vec![0.0; n + 1];
    let mut row_of = vec![0usize; n + 1];
    let mut way = vec![0usize; n + 1];
    for row in 1..=n {
        row_of[0] = row;
        let mut col0 = 0usize;
        let mut min_reduced = vec![f64::INFINITY; n + 1];
        let mut used = vec![false; n + 1];
        loop {
            used[col0] = true;
            let r = row_of[col0];
            let mut delta = f64::INFINITY;
            let mut next = 0usize;
            for col in 1..=n {
                if used[col] {
                    continue;
                }
                let reduced = cost[(r - 1) * n + col - 1] - u[r] - v[col];
                if reduced < min_reduced[col] {
                    min_reduced[col] = reduced;
                    way[col] = col0;
                }
                if min_reduced[col] < delta {
                    delta = min_reduced[col];
                    next = col;
                }
            }
            for col in 0..=n {
                if used[col] {
                    u[row_of[col]] += delta;
                    v[col] -= delta;
                } else {
                    min_reduced[col] -= delta;
                }
            }
            col0 = next;
            if row_of[col0] == 0 {
                break;
            }
        }
        // Augment along the alternating path.
        loop {
            let prev = way[col0];
            row_of[col0] = row_of[prev];
            col0 = prev;
            if col0 == 0 {
                break;
            }
        }
    }
    let mut assignment = vec![0usize; n];
    for col in 1..=n {
        assignment[row_of[col] - 1] = col - 1;
    }
    let total = assignment
        .iter()
        .enumerate()
        .map(|(r, &c)| cost[r * n + c])
        .sum();
    (assignment, total)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Brute force over all permutations for small n.
    fn brute(cost: &[f64], n: usize) -> f64 {
        fn rec(cost: &[f64], n: usize, row: usize, used: &mut Vec<bool>) -> f64 {
            if row == n {
                return 0.0;
            }
            let mut best = f64::INFINITY;
            for c in 0..n {
                if !used[c] {
                    used[c] = true;
                    best = best.min(cost[row * n + c] + rec(cost, n, row + 1, used));
                    used[c] = false;
                }
            }
            best
        }
        rec(cost, n, 0, &mut vec![false; n])
    }

    #[test]
    fn matches_brute_force() {
        let mut rng = crate::small::SplitMix64::new(7);
        for n in 1..=7 {
            for _ in 0..20 {
                let cost: Vec<f64> = (0..n * n).map(|_| rng.uniform() * 10.0).collect();
                let (assignment, total) = min_cost_assignment(&cost, n);
                let mut seen = assignment.clone();
                seen.sort();
                assert_eq!(seen, (0..n).collect::<Vec<_>>());
                assert!((total - brute(&cost, n)).abs() < 1e-9);
            }
        }
    }
}
