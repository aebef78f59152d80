//! Small statistics shared by the bench binaries (included with `#[path]`).

/// The median of `values` (not empty; the mean of the middle two for an even count). Sorts
/// `values`.
pub fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}
