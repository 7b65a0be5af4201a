//! Kubernetes resource quantities (`100m`, `0.5`, `128Mi`, `1G`, `1e3`) as numbers.

/// Parses a quantity into its value in base units (cores for CPU, bytes for memory).
pub fn parse(q: &str) -> Result<f64, String> {
    let q = q.trim();
    let bad = || format!("{q:?} is not a Kubernetes quantity");
    let split = q
        .find(|c: char| c.is_ascii_alphabetic() && c != 'e' && c != 'E')
        .unwrap_or(q.len());
    let (num, suffix) = q.split_at(split);
    // `1e3` is an exponent; `1E` (exa) never parses as a number and is handled as a suffix.
    let (num, suffix) = match num.parse::<f64>() {
        Ok(_) => (num, suffix),
        Err(_) if num.ends_with(['E', 'e']) && suffix.is_empty() => {
            (&num[..num.len() - 1], &q[num.len() - 1..])
        }
        Err(_) => return Err(bad()),
    };
    let n: f64 = num.parse().map_err(|_| bad())?;
    let m = match suffix {
        "" => 1.0,
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        _ => return Err(bad()),
    };
    if n < 0.0 || !n.is_finite() {
        return Err(bad());
    }
    Ok(n * m)
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn parses_the_suffixes_kubectl_users_write() {
        assert_eq!(parse("100m").unwrap(), 0.1);
        assert_eq!(parse("2").unwrap(), 2.0);
        assert_eq!(parse("0.5").unwrap(), 0.5);
        assert_eq!(parse("128Mi").unwrap(), 134_217_728.0);
        assert_eq!(parse("1G").unwrap(), 1e9);
        assert_eq!(parse("1e3").unwrap(), 1000.0);
        assert_eq!(parse("2E").unwrap(), 2e18);
        for bad in ["", "abc", "1x", "-1", "1.2.3Mi"] {
            assert!(
                parse(bad)
                    .unwrap_err()
                    .contains("not a Kubernetes quantity"),
                "{bad}"
            );
        }
    }
}
