//! Random identifiers for resources and secrets (`file-…`, API keys).

use rand::distr::{Alphanumeric, SampleString};

/// A new resource id: `prefix` + `-` + 24 random alphanumerics, like OpenAI's `file-…`.
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}-{}", random_alphanumeric(24))
}

/// `len` characters from `[A-Za-z0-9]`, drawn from the OS-seeded thread RNG.
pub fn random_alphanumeric(len: usize) -> String {
    Alphanumeric.sample_string(&mut rand::rng(), len)
}

/// Seconds since the Unix epoch, the unit of every `created_at` in the API.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_have_prefix_and_are_distinct() {
        let a = new_id("file");
        let b = new_id("file");
        assert!(a.starts_with("file-") && a.len() == 29);
        assert_ne!(a, b);
    }
}
