//! Credentials: password hashing (argon2, in `app::auth`, DESIGN.md §5) and API keys (random,
//! shown once, stored as a SHA-256 hash: a key has 256 bits of entropy, so a fast
//! hash is enough and lookups stay O(1)).

pub mod arguments;
pub mod middleware;
pub mod sessions;

use rand::RngCore;
use sha2::{Digest, Sha256};

/// Prefix of every Tollgate API key, so that leaked keys are recognisable.
pub const API_KEY_PREFIX: &str = "tg_";

pub use app::auth::{
    dummy_password_hash, hash_password, verify_password, CredentialError, MAX_PASSWORD_CHARS,
    MIN_PASSWORD_CHARS,
};

/// A new API key: `(the key, its hash)`. The key is shown once and never stored.
pub fn new_api_key() -> (String, String) {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let key = format!("{API_KEY_PREFIX}{}", hex::encode(bytes));
    let hash = hash_api_key(&key);
    (key, hash)
}

/// The stored form of an API key: SHA-256, hex.
pub fn hash_api_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_verify_only_against_their_hash() {
        let hash = hash_password("correct horse battery").unwrap();
        assert!(hash.starts_with("$argon2id$"));
        assert!(verify_password("correct horse battery", &hash));
        assert!(!verify_password("correct horse batterY", &hash));
        assert!(!verify_password("anything", "not a phc string"));
        assert!(matches!(
            hash_password("short"),
            Err(CredentialError::PasswordTooShort)
        ));
        // Counted in characters, as the shortest is.
        assert!(hash_password(&"é".repeat(MAX_PASSWORD_CHARS)).is_ok());
        assert!(matches!(
            hash_password(&"p".repeat(MAX_PASSWORD_CHARS + 1)),
            Err(CredentialError::PasswordTooLong)
        ));
    }

    #[test]
    fn api_keys_are_random_and_hashed() {
        let (a, hash_a) = new_api_key();
        let (b, _) = new_api_key();
        assert_ne!(a, b);
        assert!(a.starts_with(API_KEY_PREFIX) && a.len() == API_KEY_PREFIX.len() + 64);
        assert_eq!(hash_api_key(&a), hash_a);
        assert!(!hash_a.contains(&a[API_KEY_PREFIX.len()..]));
    }
}
