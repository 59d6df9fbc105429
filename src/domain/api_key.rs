//! API keys: generated with 256 bits of randomness, shown once, stored only as a SHA-256 digest.
//!
//! A fast hash is the right tool here (as for GitHub or Stripe tokens): the secret is random, not a
//! password, so there is nothing to brute-force and lookups stay a single indexed query.

use sha2::{Digest, Sha256};

use crate::ids::random_alphanumeric;

/// Every key starts with this, so secret scanners and humans can recognise it.
pub const KEY_PREFIX: &str = "ft-";

/// A freshly generated key: the secret (to show once) and what is stored.
pub struct GeneratedKey {
    pub secret: String,
    pub hash: String,
    /// The first characters of the secret, stored to help people tell keys apart.
    pub display_prefix: String,
}

/// Generates a key of 43 random alphanumerics (~256 bits).
pub fn generate_key() -> GeneratedKey {
    let secret = format!("{KEY_PREFIX}{}", random_alphanumeric(43));
    GeneratedKey { hash: hash_key(&secret), display_prefix: secret[..KEY_PREFIX.len() + 6].to_string(), secret }
}

/// The stored form of a key: lowercase hex SHA-256.
pub fn hash_key(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_key_hashes_to_its_stored_hash_and_is_not_stored_in_clear() {
        let key = generate_key();
        assert!(key.secret.starts_with(KEY_PREFIX));
        assert_eq!(hash_key(&key.secret), key.hash);
        assert!(!key.hash.contains(&key.secret[KEY_PREFIX.len()..]));
        assert_ne!(generate_key().secret, key.secret);
    }
}
