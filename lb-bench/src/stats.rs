//! Small statistics: the chi-square goodness-of-fit test (with its p-value from
//! the regularized incomplete gamma function), medians, and the interval that
//! holds a median at a stated confidence without assuming any distribution.

/// `ln Γ(x)` for `x > 0` (Lanczos, g = 7, 9 terms; ~15 significant digits).
pub fn ln_gamma(x: f64) -> f64 {
    const G: f64 = 7.0;
    const C: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // Reflection: Γ(x)Γ(1-x) = π / sin(πx).
        let pi = std::f64::consts::PI;
        return (pi / (pi * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut a = C[0];
    let t = x + G + 0.5;
    for (i, c) in C.iter().enumerate().skip(1) {
        a += c / (x + i as f64);
    }
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + a.ln()
}

/// The regularized upper incomplete gamma function `Q(a, x) = Γ(a, x) / Γ(a)`.
pub fn gamma_q(a: f64, x: f64) -> f64 {
    if x <= 0.0 {
        return 1.0;
    }
    if !x.is_finite() {
        return 0.0;
    }
    let ln_prefix = -x + a * x.ln() - ln_gamma(a);
    if x < a + 1.0 {
        // Series for P(a, x).
        let mut sum = 1.0 / a;
        let mut term = sum;
        let mut n = a;
        for _ in 0..10_000 {
            n += 1.0;
            term *= x / n;
            sum += term;
            if term.abs() < sum.abs() * 1e-15 {
                break;
            }
        }
        (1.0 - sum * ln_prefix.exp()).clamp(0.0, 1.0)
    } else {
        // Continued fraction for Q(a, x) (modified Lentz).
        const TINY: f64 = 1e-300;
        let mut b = x + 1.0 - a;
        let mut c = 1.0 / TINY;
        let mut d = 1.0 / b;
        let mut h = d;
        for i in 1..10_000 {
            let an = -(i as f64) * (i as f64 - a);
            b += 2.0;
            d = an * d + b;
            if d.abs() < TINY {
                d = TINY;
            }
            c = b + an / c;
            if c.abs() < TINY {
                c = TINY;
            }
            d = 1.0 / d;
            let delta = d * c;
            h *= delta;
            if (delta - 1.0).abs() < 1e-15 {
                break;
            }
        }
        (h * ln_prefix.exp()).clamp(0.0, 1.0)
    }
}

/// The chi-square survival function: P(X ≥ `stat`) for `df` degrees of freedom.
pub fn chi_square_sf(stat: f64, df: u32) -> f64 {
    if df == 0 {
        return 1.0;
    }
    gamma_q(f64::from(df) / 2.0, stat / 2.0)
}

/// A chi-square goodness-of-fit test.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct ChiSquare {
    pub statistic: f64,
    pub df: u32,
    pub p_value: f64,
}

/// Tests `observed` counts against `expected` shares (same order; shares need
/// not sum to 1, they are normalized). A category with an expected share of 0
/// that has observations makes the fit impossible (p = 0). `None` when fewer
/// than two categories are expected or nothing was observed.
pub fn chi_square(observed: &[u64], expected_shares: &[f64]) -> Option<ChiSquare> {
    assert_eq!(observed.len(), expected_shares.len());
    let total: u64 = observed.iter().sum();
    let share_sum: f64 = expected_shares.iter().filter(|s| **s > 0.0).sum();
    let categories = expected_shares.iter().filter(|s| **s > 0.0).count();
    if total == 0 || categories < 2 || share_sum <= 0.0 {
        return None;
    }
    let df = (categories - 1) as u32;
    let mut statistic = 0.0;
    for (&o, &s) in observed.iter().zip(expected_shares) {
        if s <= 0.0 {
            if o > 0 {
                return Some(ChiSquare {
                    statistic: f64::INFINITY,
                    df,
                    p_value: 0.0,
                });
            }
            continue;
        }
        let e = total as f64 * s / share_sum;
        statistic += (o as f64 - e).powi(2) / e;
    }
    Some(ChiSquare {
        statistic,
        df,
        p_value: chi_square_sf(statistic, df),
    })
}

/// The median of the finite values (mean of the middle two for an even count).
pub fn median(values: &[f64]) -> Option<f64> {
    let v = sorted_finite(values)?;
    let mid = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    })
}

/// An interval for a median, and how sure it is.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MedianInterval {
    pub low: f64,
    pub high: f64,
    /// The probability that the interval holds the median.
    pub confidence: f64,
}

/// An interval that holds the true median of what `values` were drawn from
/// with at least `confidence`, whatever the distribution (the sign test's
/// interval): the `k`-th lowest and `k`-th highest values, with `k` as large
/// as `confidence` allows. Each value falls below the median with probability
/// ½, so the interval misses only when fewer than `k` fall on one side.
/// Where too few values are finite for `confidence` (fewer than 5 at 90 %),
/// the lowest and highest, with what they do hold.
pub fn median_interval(values: &[f64], confidence: f64) -> Option<MedianInterval> {
    let v = sorted_finite(values)?;
    let n = v.len();
    // Coverage of the k-th values from each end: 1 - 2 P(Bin(n, ½) < k).
    let coverage = |k: usize| 1.0 - 2.0 * binomial_half_cdf(n, k);
    let k = (1..=n.div_ceil(2))
        .take_while(|&k| coverage(k) >= confidence)
        .last()
        .unwrap_or(1);
    Some(MedianInterval {
        low: v[k - 1],
        high: v[n - k],
        confidence: coverage(k).max(0.0),
    })
}

/// The finite values, in order; `None` when there are none.
fn sorted_finite(values: &[f64]) -> Option<Vec<f64>> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    v.sort_by(f64::total_cmp);
    (!v.is_empty()).then_some(v)
}

/// `P(X < k)` for `X ~ Bin(n, ½)`.
fn binomial_half_cdf(n: usize, k: usize) -> f64 {
    let mut term = 0.5f64.powi(n as i32); // C(n, 0) / 2^n
    let mut sum = 0.0;
    for i in 0..k.min(n + 1) {
        sum += term;
        term *= (n - i) as f64 / (i + 1) as f64;
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol
    }

    #[test]
    fn ln_gamma_matches_factorials() {
        assert!(close(ln_gamma(1.0), 0.0, 1e-12));
        assert!(close(ln_gamma(5.0), 24f64.ln(), 1e-12));
        assert!(close(
            ln_gamma(0.5),
            std::f64::consts::PI.sqrt().ln(),
            1e-12
        ));
    }

    #[test]
    fn chi_square_critical_values_give_their_p_values() {
        // Textbook 5% and 1% critical values.
        assert!(close(chi_square_sf(3.841_459, 1), 0.05, 1e-6));
        assert!(close(chi_square_sf(5.991_465, 2), 0.05, 1e-6));
        assert!(close(chi_square_sf(9.210_340, 2), 0.01, 1e-6));
        assert!(close(chi_square_sf(18.307_04, 10), 0.05, 1e-6));
        assert!(close(chi_square_sf(0.0, 3), 1.0, 1e-12));
        // df = 2 has the closed form exp(-x/2).
        for x in [0.1, 1.0, 7.5, 40.0] {
            assert!(close(chi_square_sf(x, 2), (-x / 2.0f64).exp(), 1e-12));
        }
    }

    #[test]
    fn goodness_of_fit() {
        let fit = chi_square(&[100, 100, 100], &[1.0, 1.0, 1.0]).unwrap();
        assert_eq!(fit.df, 2);
        assert!(close(fit.statistic, 0.0, 1e-12) && close(fit.p_value, 1.0, 1e-12));
        let skewed = chi_square(&[300, 0, 0], &[1.0, 1.0, 1.0]).unwrap();
        assert!(skewed.p_value < 1e-100);
        let impossible = chi_square(&[5, 5], &[1.0, 0.0]);
        assert!(impossible.is_none(), "one expected category is no test");
        let impossible = chi_square(&[5, 5, 1], &[1.0, 1.0, 0.0]).unwrap();
        assert_eq!(impossible.p_value, 0.0);
        assert!(chi_square(&[0, 0], &[0.5, 0.5]).is_none());
    }

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[f64::NAN]), None);
    }

    #[test]
    fn a_median_interval_takes_the_widest_k_its_confidence_allows() {
        let v: Vec<f64> = (1..=8).map(f64::from).rev().collect();
        // n = 8: k = 2 holds the median with 1 - 2·9/256 = 0.93; k = 3 only 0.71.
        let i = median_interval(&v, 0.90).unwrap();
        assert_eq!((i.low, i.high), (2.0, 7.0));
        assert!(close(i.confidence, 1.0 - 18.0 / 256.0, 1e-12), "{i:?}");
        // n = 14: k = 4 holds it with 1 - 2·470/16384 = 0.943.
        let v: Vec<f64> = (1..=14).map(f64::from).collect();
        let i = median_interval(&v, 0.90).unwrap();
        assert_eq!((i.low, i.high), (4.0, 11.0));
        assert!(close(i.confidence, 1.0 - 940.0 / 16384.0, 1e-12), "{i:?}");
    }

    #[test]
    fn too_few_values_for_the_confidence_give_the_range_and_what_it_holds() {
        // n = 4: even the range holds the median only 1 - 2/16 of the time.
        let i = median_interval(&[3.0, f64::NAN, 1.0, 4.0, 2.0], 0.90).unwrap();
        assert_eq!((i.low, i.high), (1.0, 4.0));
        assert!(close(i.confidence, 0.875, 1e-12), "{i:?}");
        let one = median_interval(&[5.0], 0.90).unwrap();
        assert_eq!((one.low, one.high, one.confidence), (5.0, 5.0, 0.0));
        assert_eq!(median_interval(&[f64::NAN], 0.90), None);
    }

    #[test]
    fn the_interval_holds_the_median_as_often_as_it_says() {
        // Draws from a skewed distribution whose median is 1.0: the 90 %
        // interval of 8 draws must hold it in about 93 % of 20,000 trials.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut uniform = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 11) as f64 / (1u64 << 53) as f64
        };
        let trials = 20_000;
        let held = (0..trials)
            .filter(|_| {
                // Exponential with median 1: -ln(U) / ln 2.
                let v: Vec<f64> = (0..8).map(|_| -uniform().ln() / 2f64.ln()).collect();
                let i = median_interval(&v, 0.90).unwrap();
                i.low <= 1.0 && 1.0 <= i.high
            })
            .count();
        let rate = held as f64 / trials as f64;
        assert!((0.92..0.94).contains(&rate), "{rate}");
    }
}
